"""``uld ablation``: the paper's Table 2 ablation (seed 001, Sec 5) as one Prefect flow.

For every seed, on one feature store, the flow calls the existing method flows as subflows
(nothing of their loops is repeated here)::

    ablation (flow)
      zeroshot   abl-<id>-zeroshot-paper-s<seed>   ZeroShot, n_candidates = K (the paper's K-means)
      zeroshot   abl-<id>-zeroshot-s<seed>         ZeroShot, the project's cluster choice (K of 4 K)
      duld       abl-<id>-duld-s<seed>             D-ULD: bootstrap + R rounds
      duld       abl-<id>-duldpp-s<seed>           D-ULD++: the same R D-ULD rounds, the proxy stage
                                                   (the "+ PP" row), then T TSC rounds ("+ TSC")
      duld       abl-<id>-duldpp-fullvae-s<seed>   the same D-ULD++ run with the TSC rounds trained by
                                                   the full VAE's ELBO instead of Eq. 3 ("+ TSC w/ full VAE")
      duld       abl-<id>-mallis-d-s<seed>         Mallis (D): bootstrap + R rounds

then reads the rows (:mod:`flows.ablation_table`) into ``<home>/ablations/<id>/ablation.parquet``
(table kind ``ablation``) and renders ``ablation.md``. Run ids are derived from (ablation id,
method, seed), and the ablation id from the dataset, K and every setting that changes a run,
so running the same command again resumes each run where it stopped (a finished one returns at
once: the engine finds its last checkpoint, ZeroShot skips every step whose file exists), and
``--seeds`` can be extended later without redoing the seeds already run.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from prefect import flow

from flows.ablation_table import ROWS, collect, render_markdown, run_id_for
from pipeline.backbones.base import FeatureSpec
from pipeline.datasets.augment_views import ViewAugmentConfig
from pipeline.errors import ConfigError
from storage.atomic import write_json
from storage.layout import Workspace, check_name
from storage.tables import write_table

TABLE_NAME, MARKDOWN_NAME, CONFIG_NAME = "ablation.parquet", "ablation.md", "config.json"


@dataclass(frozen=True)
class AblationResult:
    """What the flow wrote: the long table, its Parquet file and the Markdown rendering."""

    ablation_id: str
    frame: pd.DataFrame
    parquet: Path
    markdown: Path
    text: str


def ablation_settings(store_hash: str, dataset: str, k: int, rounds: int, steps_per_round: int, bootstrap_steps: int, q: int,
                      proxy_steps: int, tsc_rounds: int, lr: float, batch_size: int, views: ViewAugmentConfig | None,
                      evaluation: dict, zeroshot_options: dict) -> dict:
    """Everything that changes one of the ablation's runs (seeds excluded: each seed is its own run)."""
    return {"dataset": dataset, "feature_config_hash": store_hash, "k": int(k), "rounds": int(rounds), "steps_per_round": int(steps_per_round),
            "bootstrap_steps": int(bootstrap_steps), "q": int(q), "proxy_steps": int(proxy_steps), "tsc_rounds": int(tsc_rounds),
            "lr": float(lr), "batch_size": int(batch_size), "views": None if views is None else views.to_json(),
            "evaluation": dict(evaluation), "zeroshot": dict(zeroshot_options)}


def default_ablation_id(settings: dict) -> str:
    """``<dataset>-k<K>-<hash of the settings>``: the same command names the same ablation."""
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{settings['dataset']}-k{settings['k']}-{digest}"


def _check_settings(ws: Workspace, ablation_id: str, settings: dict) -> None:
    """An existing ablation folder must have been made with the same settings (else its runs cannot be resumed)."""
    path = ws.ablation_dir(ablation_id) / CONFIG_NAME
    if path.is_file():
        old = json.loads(path.read_text())
        new = json.loads(json.dumps(settings, default=str))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise ConfigError(f"ablation {ablation_id!r} was made with other settings ({', '.join(diff)})", where=str(path),
                              fix="repeat its options (see that config.json), or drop --ablation-id to get an id of its own")
    write_json(path, settings)


def check_seeds(seeds: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Distinct seeds, at least one (a repeated seed would count one run twice in the mean +- std)."""
    seeds = tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must name distinct seeds, got {list(seeds)}", where="--seeds", fix="e.g. --seeds 0,1,2")
    return seeds


def _engine_run(home: Path, run_id: str) -> bool:
    """True when the engine run exists: it is then resumed, not started (the engine refuses an existing id otherwise)."""
    return Workspace(home).run_file(run_id, "config.json").is_file()


@flow(name="ablation", validate_parameters=False, log_prints=True)
def ablation(
    dataset: str,
    backbone: Any = "shipped",
    spec: FeatureSpec | None = None,
    *,
    home: str | Path = "workspace",
    store_path: str | Path | None = None,
    seeds: tuple[int, ...] = (0, 1, 2),
    k: int = 10,
    rounds: int = 3,
    steps_per_round: int = 150,
    bootstrap_steps: int = 300,
    q: int = 5,
    proxy_steps: int | None = None,
    tsc_rounds: int = 2,
    lr: float = 1e-3,
    batch_size: int = 12,
    views: ViewAugmentConfig | None = ViewAugmentConfig(),
    evaluation: dict | None = None,
    zeroshot_options: dict | None = None,
    ablation_id: str | None = None,
    out: str | Path | None = None,
    threads: int | None = 1,
    progress: bool = False,
    device: str = "auto",
) -> AblationResult:
    """Run every row of the Table 2 ablation for each seed, write ablation.parquet + the Markdown table.

    ``rounds``: D-ULD rounds of the D-ULD, Mallis (D) and D-ULD++ runs (D-ULD++'s ``duld_rounds``,
    so its first rounds are the D-ULD row's schedule); ``tsc_rounds``: D-ULD++'s TSC rounds after
    its proxy stage (``proxy_steps`` steps, default ``steps_per_round``) with ``q`` pose clusters.
    ``views``: the augmented views of bootstrapping (one view store, shared by every seed: the
    view seed is the config's); None = the feature-warp shortcut. ``zeroshot_options``: extra
    arguments of :func:`flows.zeroshot.zeroshot` (sampling, k-means restarts). ``out``: where the
    Markdown goes besides ``<home>/ablations/<id>/ablation.md``.
    """
    from flows.duld import duld
    from flows.zeroshot import resolve_store, zeroshot

    home = Path(home)
    ws = Workspace(home)
    seeds = check_seeds(seeds)
    if min(rounds, tsc_rounds) < 1:
        raise ConfigError(f"--rounds and --tsc-rounds must be >= 1 (got {rounds}, {tsc_rounds}): the rows read their last round",
                          where="--rounds / --tsc-rounds")
    evaluation = dict(evaluation or {})
    zs_opts = dict(zeroshot_options or {})
    proxy = int(steps_per_round if proxy_steps is None else proxy_steps)
    # one store for every run, resolved once (finding it from backbone + spec loads the backbone)
    store = resolve_store(home, dataset, backbone, spec, store_path, device="cpu")
    settings = ablation_settings(store.config_hash, dataset, k, rounds, steps_per_round, bootstrap_steps, q, proxy, tsc_rounds, lr, batch_size,
                                 views, evaluation, zs_opts)
    ablation_id = check_name("ablation id", ablation_id or default_ablation_id(settings))
    _check_settings(ws, ablation_id, settings)
    print(f"ablation {ablation_id}: {len(ROWS)} rows x {len(seeds)} seed(s) on {store.path}")
    engine = dict(k=k, steps_per_round=steps_per_round, bootstrap_steps=bootstrap_steps, lr=lr, batch_size=batch_size, home=home,
                  progress=progress, threads=threads, store_path=store.path, views=views, evaluation=evaluation, device=device)
    t0 = time.perf_counter()
    for seed in seeds:
        for key, n_candidates in (("zeroshot-paper", k), ("zeroshot", None)):
            rid = run_id_for(ablation_id, key, seed)
            zeroshot.with_options(flow_run_name=rid)(dataset, backbone, spec, k=k, home=home, seed=seed, run_id=rid, store_path=store.path,
                                                     eval_cfg=evaluation, n_candidates=n_candidates, **zs_opts)
        pp = {"q": q, "proxy_steps": proxy, "duld_rounds": rounds}
        for key, method, n_rounds, params in (("duld", "duld", rounds, {}),
                                              ("duldpp", "duld++", tsc_rounds, {**pp, "tsc_loss": "eq3"}),
                                              ("duldpp-fullvae", "duld++", tsc_rounds, {**pp, "tsc_loss": "elbo"}),
                                              ("mallis-d", "mallis-d", rounds, {})):
            rid = run_id_for(ablation_id, key, seed)
            duld.with_options(flow_run_name=rid)(dataset, backbone, spec, rounds=n_rounds, seed=seed, run_id=rid, resume=_engine_run(home, rid),
                                                 method=method, method_params=params, **engine)
    frame = collect(home, ablation_id, list(seeds), evaluation)
    folder = ws.ablation_dir(ablation_id)
    parquet = write_table(frame, folder / TABLE_NAME, "ablation", metadata={"settings": settings, "seeds": list(seeds)})
    where = PurePosixPath(str(store.path))  # a folder or an fsspec URL
    notes = [f"dataset `{dataset}`, feature store `{where.name}` ({where.parent.name}), K = {k}, seeds {', '.join(map(str, seeds))}",
             f"D-ULD / Mallis (D): bootstrap {bootstrap_steps} steps + {rounds} rounds x {steps_per_round} steps; D-ULD++: the same, "
             f"then the proxy stage ({proxy} steps) and {tsc_rounds} TSC rounds (Q = {q}) trained with Eq. 3 on the encoder; "
             "'w/ full VAE': the same run with the TSC rounds trained by the whole VAE's ELBO instead",
             "test split, NME in % of the normaliser (protocol " + str(evaluation.get("protocol", "paper")) + "), mean +- sample std over seeds; "
             "'best round' = the round with the lowest test forward NME (chosen on the test split: optimistic)"]
    text = render_markdown(frame, f"Table 2 ablation `{ablation_id}`", notes)
    markdown = folder / MARKDOWN_NAME
    write_text(markdown, text)
    if out is not None and Path(out).resolve() != markdown.resolve():
        write_text(Path(out), text)
    print(f"ablation {ablation_id}: {markdown}")
    print(f"ablation {ablation_id} finished in {time.perf_counter() - t0:.0f} s: {parquet}")
    return AblationResult(ablation_id, frame, parquet, markdown, text)


def write_text(path: Path, text: str) -> Path:
    """Atomically write ``text`` (the folder is created)."""
    from storage.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return path
