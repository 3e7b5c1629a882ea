"""The self-training engine as Prefect flows: bootstrap, then self-training rounds.

One loop for every method that trains detector/descriptor heads on cached
features; the method (``config.json``'s ``method``: ``duld`` | ``mallis-d`` | ``duld++``,
see :data:`ENGINE_METHODS`) picks the pseudo-labeller
(``pipeline.labelling``): D-ULD's K-means, Mallis (D)'s over-clustering; and the
schedule of stages (``RunContext.stage_of``): D-ULD and Mallis (D) run bootstrap +
rounds, D-ULD++ adds its proxy-task stage and two-stage-clustering rounds after
its D-ULD rounds (``flows.duldpp_stages``, which also lists its extra checkpoint files).

::

    duld (flow)
      bootstrap (subflow)  train-bootstrap -> evaluate (round 0: k-means on the bootstrapped descriptors)
      round-1 (subflow)    pseudo-labels -> train-round -> evaluate

A round's step 1 (keypoints + descriptors of every train image with the current
heads) and the k-means of step 2 are the previous evaluation's work: it runs the
same heads over the same images, so its keypoints and centroids are kept in the
checkpoint and the round starts from them instead of recomputing both.
      round-2 ...

Everything a step produces lands in ``runs/<run_id>/``:

* ``config.json``                          the full configuration (checked on --resume)
* ``checkpoints/bootstrap-000/``, ``checkpoints/round-NNN/``
  ``config.json`` + ``model.safetensors`` (the heads), ``optimizer.pt`` (Adam
  state), ``centroids.npy`` (the K landmark centroids of the evaluation clustering),
  ``labeller.npz`` (the fitted pseudo-labeller: its training-label centroids), ``train-keypoints.npz``
  (the train keypoints it clustered) and ``state.json``,
  written *last*: a checkpoint without it is unfinished and ignored;
* ``round-NNN-keypoints.parquet``          step 1: NMS keypoints + descriptors of every train image;
* ``pseudolabels.parquet``                 step 2 (table kind ``pseudolabels``, one ``round`` per round;
  ``landmark_id`` = the label's landmark, extra column ``label`` = the training label);
* ``train-log.parquet``                    step 3: one row per optimisation step (losses);
* ``keypoints.parquet``, ``metrics.parquet``, ``errors.parquet``  step 4 (via ``flows.results``).

Resuming: the flow finds the last checkpoint with a ``state.json`` and starts
the next round from it. Every stage seeds its own generators from
``(seed, stage, round)`` and reloads the model and optimizer from the previous
checkpoint even in an uninterrupted run, so a killed-and-resumed run follows
exactly the same computation (same numbers on CPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline.backbones.base import FeatureSpec
from pipeline.backbones.defaults import method_defaults
from pipeline.datasets.augment_views import ViewAugmentConfig
from pipeline.errors import ConfigError, StoreError
from pipeline.evaluation.protocols import check_box, get_protocol
from pipeline.heads.model import ULDHeads, ULDHeadsConfig
from pipeline.labelling import KeypointSet, PseudoLabeller, PseudoLabels, make_labeller
from pipeline.methods.duld import (
    DULDConfig,
    build_model,
    extract_keypoints,
    make_optimizer,
    predict_landmarks,
    seeded_generator,
    train_bootstrap,
    train_self_round,
)
from flows.artifacts import publish_round_artifacts
from flows.keypoints_dask import round_task_runner
from storage.atomic import atomic_path, write_json
from storage.features import FeatureStore
from storage.feature_loader import make_loader
from storage.layout import Workspace
from storage.locks import claim, releases_claims
from storage.run_mirror import RunMirror
from storage.tables import append_table

log = logging.getLogger(__name__)

METHOD = "duld"
BOOTSTRAP = "bootstrap"
ROUND = "round"
# D-ULD++'s stages after its D-ULD rounds (flows.duldpp_stages): the pose-guided proxy task, then TSC rounds.
PROXY = "proxy"
DULDPP = "duldpp"
STATE_NAME = "state.json"
OPTIMIZER_NAME = "optimizer.pt"
CENTROIDS_NAME = "centroids.npy"
KEYPOINTS_NAME = "train-keypoints.npz"
LABELLER_NAME = "labeller.npz"
# Hyper-parameters that must match for --resume to continue a run ("labeller" only when the
# run recorded one: runs made before labellers existed were all D-ULD's k-means, whose
# settings are part of "duld").
_RESUME_KEYS = ("method", "dataset", "backbone", "feature_config_hash", "duld", "heads", "seed", "roi", "labeller", "duldpp")


def _kmeans_labeller(cfg: DULDConfig, params: dict) -> dict:
    return {"name": "kmeans", "k": cfg.k, "n_init": cfg.kmeans_n_init, "max_iter": cfg.kmeans_max_iter}


def _overcluster_labeller(cfg: DULDConfig, params: dict) -> dict:
    m = params.get("m")
    return {"name": "overcluster", "k": cfg.k, "m": 100 if m is None else int(m), "n_init": cfg.kmeans_n_init, "max_iter": cfg.kmeans_max_iter}


# Methods this engine runs: name -> (DULDConfig, method params) -> labeller spec for make_labeller.
# A method that differs from D-ULD only in its pseudo-labels adds one entry here.
# D-ULD++ (paper 001, Sec 3.3) runs D-ULD's k-means rounds first, then its own stages (``RunContext.duldpp``).
ENGINE_METHODS = {"duld": _kmeans_labeller, "mallis-d": _overcluster_labeller, "duld++": _kmeans_labeller}
# How logs and figure titles name them.
METHOD_TITLES = {"duld": "D-ULD", "mallis-d": "Mallis (D)", "duld++": "D-ULD++"}


def duldpp_settings(params: dict, steps_per_round: int) -> dict:
    """D-ULD++'s schedule and step settings from the method params (``q``, ``proxy_steps``, ``duld_rounds``,
    ``tsc_loss``; CPU-sized defaults: Q = 5, the proxy stage as long as a round, 2 D-ULD rounds, Eq. 3 in the
    TSC rounds; ``tsc_loss="elbo"`` trains them with the full VAE instead). Recorded in config.json."""
    from pipeline.methods.duldpp import check_tsc_loss

    q = 5 if params.get("q") is None else int(params["q"])
    proxy = int(steps_per_round) if params.get("proxy_steps") is None else int(params["proxy_steps"])
    rounds = 2 if params.get("duld_rounds") is None else int(params["duld_rounds"])
    if q < 1:
        raise ConfigError(f"--q must be >= 1, got {q}", where="--q")
    if proxy < 0 or rounds < 0:
        raise ConfigError(f"--proxy-steps and --duld-rounds must be >= 0, got {proxy}, {rounds}", where="--proxy-steps / --duld-rounds")
    return {"q": q, "proxy_steps": proxy, "duld_rounds": rounds, "tsc_loss": check_tsc_loss(params.get("tsc_loss"))}


# Settings recorded in config.json's ``duldpp`` after runs without them were made, with the value
# those runs used (their TSC rounds all trained with Eq. 3): such a run still resumes.
DULDPP_ADDED = {"tsc_loss": "eq3"}


@dataclass
class RunContext:
    """What every task needs; built once by the flow."""

    home: Path
    run_id: str
    dataset: str
    store: FeatureStore
    train_rows: np.ndarray
    test_rows: np.ndarray
    config: DULDConfig
    heads: ULDHeadsConfig
    seed: int
    progress: bool = True
    eval_batch: int = 32
    rois: np.ndarray | None = None  # (len(store), 4) crop-px object boxes, or None = whole crop
    views: Any = None  # storage.augmented_features.ViewStore of the training crops, or None (feature warps)
    evaluation: dict = field(default_factory=dict)  # evaluate_keypoints settings (protocol, box, ...); {} = its defaults
    method: str = METHOD  # written into every table row
    labeller: dict = field(default_factory=dict)  # make_labeller spec; {} = D-ULD's k-means from ``config``
    duldpp: dict = field(default_factory=dict)  # duldpp_settings of a D-ULD++ run; {} = every round is a D-ULD round
    mirror: RunMirror | None = None  # where the run folder is copied after every round (--runs-url), or None
    dask_address: str | None = None  # scheduler the rounds' keypoint extraction fans out to (flows.keypoints_dask), or None

    def make_labeller(self) -> PseudoLabeller:
        """A fresh (unfitted) pseudo-labeller of this run's method."""
        return make_labeller(self.labeller or _kmeans_labeller(self.config, {}))

    def stage_of(self, round_: int) -> tuple[str, int]:
        """The method's schedule: round 0 bootstraps, then D-ULD rounds; a D-ULD++ run follows its
        ``duld_rounds`` D-ULD rounds with one proxy-task stage and TSC rounds (paper 001, Sec 4)."""
        if round_ == 0 or not self.duldpp or round_ <= int(self.duldpp["duld_rounds"]):
            return stage_of(round_)
        return (PROXY if round_ == int(self.duldpp["duld_rounds"]) + 1 else DULDPP), round_

    def total_rounds(self, rounds: int) -> int:
        """Index of the last round: ``rounds`` for D-ULD; D-ULD rounds + proxy + ``rounds`` TSC rounds for D-ULD++."""
        return int(rounds) if not self.duldpp else int(self.duldpp["duld_rounds"]) + 1 + int(rounds)

    @property
    def ws(self) -> Workspace:
        return Workspace(self.home)


# ----------------------------------------------------------------- helpers (no Prefect)
def endless_batches(store: FeatureStore, rows: np.ndarray, batch_size: int, seed: int) -> Iterator[dict]:
    """Shuffled batches for ever: epoch ``e`` uses the loader's block-shuffle with ``set_epoch(e)``.

    Seeded, so a round that is re-run sees the same batches in the same order.
    ``drop_last`` keeps every batch the same size (when there are enough images).
    """
    loader = make_loader(store, rows, batch_size=batch_size, shuffle=True, seed=seed, drop_last=len(rows) >= batch_size)
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def training_batches(ctx: RunContext, seed: int) -> Iterator[dict]:
    """Endless shuffled training batches, each crop paired with one of its augmented views (if any)."""
    from storage.augmented_features import attach_views

    batches = endless_batches(ctx.store, ctx.train_rows, ctx.config.batch_size, seed=seed)
    return batches if ctx.views is None else attach_views(batches, ctx.views, seed=seed)


def ordered_batches(ctx: RunContext, rows: np.ndarray):
    return make_loader(ctx.store, rows, batch_size=ctx.eval_batch, shuffle=False)


def checkpoint_dir(ctx: RunContext, stage: str, round_: int) -> Path:
    return ctx.ws.checkpoint_dir(ctx.run_id, stage, round_)


def stage_of(round_: int) -> tuple[str, int]:
    return (BOOTSTRAP, 0) if round_ == 0 else (ROUND, round_)


def save_checkpoint(path: Path, model: ULDHeads, optimizer: torch.optim.Optimizer, labeller: PseudoLabeller, keypoints: KeypointSet, state: dict,
                    extra: Callable[[Path], None] | None = None) -> None:
    """Weights, optimizer, the fitted labeller (K landmark centroids in ``centroids.npy``, which
    the predictor reads, and its whole state in ``labeller.npz``), the train keypoints it was
    fitted on, ``extra(path)`` (a stage's own files: D-ULD++'s VAE and pose codes), then
    ``state.json`` last (the completion marker)."""
    marker = path / STATE_NAME
    if marker.exists():
        marker.unlink()  # rewriting a checkpoint: it must not look finished half-way
    model.save_pretrained(path)
    with atomic_path(path / OPTIMIZER_NAME) as tmp:
        torch.save(optimizer.state_dict(), tmp)
    with atomic_path(path / CENTROIDS_NAME) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(labeller.landmark_centers_, np.float32))
    with atomic_path(path / LABELLER_NAME) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **labeller.get_state())
    with atomic_path(path / KEYPOINTS_NAME) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **keypoints.arrays())
    if extra is not None:
        extra(path)
    write_json(marker, state)


def load_checkpoint(path: Path, lr: float, labeller: PseudoLabeller,
                    optimizer_for: Callable[[ULDHeads], torch.optim.Optimizer | None] | None = None) -> tuple[ULDHeads, torch.optim.Optimizer | None, PseudoLabeller, KeypointSet]:
    """The checkpoint's heads, optimizer, ``labeller`` restored to its fitted state, train keypoints.

    ``optimizer_for(model)`` builds the optimizer whose state ``optimizer.pt`` holds (default:
    D-ULD's Adam over all heads); returning None skips it (a stage that starts a new optimizer)."""
    if not (path / STATE_NAME).is_file():
        raise StoreError("checkpoint is unfinished (no state.json)", where=str(path), fix="re-run with --resume to redo that stage")
    model = ULDHeads.from_pretrained(path)
    optimizer = make_optimizer(model, lr) if optimizer_for is None else optimizer_for(model)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / OPTIMIZER_NAME, weights_only=True))
    if (path / LABELLER_NAME).is_file():
        with np.load(path / LABELLER_NAME) as z:
            labeller.set_state({name: z[name] for name in z.files})
    else:  # written before labellers existed: D-ULD's k-means, its centroids are the whole state
        labeller.set_state({"landmark_centers": np.load(path / CENTROIDS_NAME)})
    with np.load(path / KEYPOINTS_NAME) as z:
        keypoints = KeypointSet.from_arrays(z)
    return model, optimizer, labeller, keypoints


def completed_rounds(ctx: RunContext, rounds: int) -> int:
    """-1 when even the bootstrap is unfinished, else the last finished round (0 = bootstrap)."""
    last = -1
    for r in range(rounds + 1):
        stage, rr = ctx.stage_of(r)
        if (checkpoint_dir(ctx, stage, rr) / STATE_NAME).is_file():
            last = r
        else:
            break
    return last


def _write_parquet(df: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path


def append_train_log(ctx: RunContext, stage: str, round_: int, records: list[dict]) -> None:
    """Losses per step into ``train-log.parquet`` (a re-run replaces its own rows)."""
    path = ctx.ws.run_file(ctx.run_id, "train-log.parquet")
    new = pd.DataFrame(records)
    new.insert(0, "round", int(round_))
    new.insert(0, "stage", stage)
    if path.exists():
        old = pd.read_parquet(path)
        old = old[~((old["stage"] == stage) & (old["round"] == int(round_)))]
        new = pd.concat([old, new], ignore_index=True)
    _write_parquet(new, path)


def keypoints_parquet(ctx: RunContext, round_: int, kp: KeypointSet, labels: np.ndarray, sq: np.ndarray) -> Path:
    path = ctx.ws.run_file(ctx.run_id, f"round-{round_:03d}-keypoints.parquet")
    df = pd.DataFrame(
        {
            "round": int(round_),
            "image_id": ctx.store.image_ids[kp.rows],
            "row": kp.rows,
            "x": kp.xy[:, 0],
            "y": kp.xy[:, 1],
            "score": kp.score,
            "cluster": labels.astype(np.int32),
            "sq_distance": sq.astype(np.float32),
            "descriptor": list(kp.desc),
        }
    )
    return _write_parquet(df, path)


def pseudolabels_frame(ctx: RunContext, round_: int, pl: PseudoLabels, stage: str = "self-training",
                       pose: np.ndarray | None = None, codes: np.ndarray | None = None) -> pd.DataFrame:
    """One row per present pseudo-label: ``landmark_id`` its landmark (0..K-1), ``label`` its
    training label (= landmark_id for D-ULD, one of M for Mallis (D), the TSC label ``u * K + c``
    for D-ULD++; an extra column). D-ULD++'s TSC rounds also give each row its image's pose
    cluster and pose code (``pose`` (N,), ``codes`` (N, 64), aligned with ``pl.rows``); other
    rows have pose_cluster -1 and a null pose_code."""
    img, lab = np.nonzero(pl.present)
    df = pd.DataFrame(
        {
            "run_id": ctx.run_id,
            "method": ctx.method,
            "stage": stage,
            "round": int(round_),
            "image_id": ctx.store.image_ids[pl.rows[img]],
            "landmark_id": pl.landmarks()[lab].astype(np.int32),
            "pose_cluster": -1 if pose is None else np.asarray(pose)[img].astype(np.int32),
            "x": pl.coords[img, lab, 0],
            "y": pl.coords[img, lab, 1],
            "distance": pl.distance[img, lab],
            "label": lab.astype(np.int32),
        }
    )
    if codes is not None:
        df.insert(7, "pose_code", list(np.asarray(codes, np.float32)[img]))
    return df


# ----------------------------------------------------------------- tasks
@task(name="pseudo-labels", cache_policy=NO_CACHE, persist_result=False)
def pseudo_labels_task(ctx: RunContext, round_: int, kp: KeypointSet, labeller: PseudoLabeller) -> PseudoLabels:
    """Steps 1-2: the current heads' train keypoints and the labeller fitted on them
    (both by the previous round's evaluation, kept in its checkpoint) -> exemplar
    assignment per training label -> round-NNN-keypoints.parquet + pseudolabels.parquet."""
    labels, sq = labeller.assign(kp)
    pl = labeller.predict(kp, ctx.train_rows)
    keypoints_parquet(ctx, round_, kp, labels, sq)
    stage = ctx.stage_of(round_)[0]
    frame = pseudolabels_frame(ctx, round_, pl, stage="self-training" if stage == ROUND else stage)
    append_table(frame, ctx.ws.run_file(ctx.run_id, "pseudolabels.parquet"), "pseudolabels", replace_on=["run_id", "round"])
    print(f"round {round_}: {len(kp)} keypoints, {pl.present.mean():.1%} of the {pl.n_labels} pseudo-labels present per image")
    return pl


@task(name="train-bootstrap", cache_policy=NO_CACHE, persist_result=False)
def train_bootstrap_task(ctx: RunContext) -> tuple[ULDHeads, torch.optim.Optimizer]:
    model = build_model(ctx.heads, ctx.seed)
    optimizer = make_optimizer(model, ctx.config.lr)
    batches = training_batches(ctx, seed=ctx.seed)
    t0 = time.perf_counter()
    records = train_bootstrap(model, optimizer, batches, ctx.config.bootstrap_steps, ctx.config, seeded_generator(ctx.seed, BOOTSTRAP, 0), ctx.progress)
    append_train_log(ctx, BOOTSTRAP, 0, records)
    dt = time.perf_counter() - t0
    if records:
        print(f"bootstrap: {len(records)} steps in {dt:.0f} s, last loss {records[-1]['loss']:.3f}")
    return model, optimizer


@task(name="train-round", cache_policy=NO_CACHE, persist_result=False)
def train_round_task(ctx: RunContext, round_: int, model: ULDHeads, optimizer: torch.optim.Optimizer, pl: PseudoLabels) -> None:
    """Step 3: detector MSE to pseudo-label heatmaps + contrastive descriptors, on crop / view pairs."""
    batches = training_batches(ctx, seed=ctx.seed + 7919 * round_)
    t0 = time.perf_counter()
    records = train_self_round(
        model, optimizer, batches, pl, ctx.config.steps_per_round, ctx.config, seeded_generator(ctx.seed, ROUND, round_), ctx.progress, desc=f"round {round_}"
    )
    append_train_log(ctx, ROUND, round_, records)
    if records:
        print(f"round {round_}: {len(records)} steps in {time.perf_counter() - t0:.0f} s, last loss {records[-1]['loss']:.3f}")


def train_keypoints(ctx: RunContext, model: ULDHeads) -> KeypointSet:
    """Step 1 of a round: the heads' keypoints and descriptors on every training image; in
    blocks over the Dask cluster when the run has one (same keypoints, see flows.keypoints_dask).
    Called from a subflow, not a task: the blocks are tasks of that subflow's runner."""
    if ctx.dask_address is None:
        return extract_keypoints(model, ordered_batches(ctx, ctx.train_rows), ctx.config, ctx.progress, rois=ctx.rois)
    from flows.keypoints_dask import fan_out_keypoints

    return fan_out_keypoints(ctx.store, model, ctx.train_rows, ctx.config, ctx.rois, ctx.eval_batch)


@task(name="evaluate", cache_policy=NO_CACHE, persist_result=False)
def evaluate_task(ctx: RunContext, round_: int, model: ULDHeads, kp: KeypointSet) -> tuple[PseudoLabeller, KeypointSet, pd.DataFrame]:
    """Step 4: fit the labeller on the trained heads' train keypoints ``kp`` (:func:`train_keypoints`),
    predict K landmarks (its ``landmark_centers_``) on both splits, NME.

    The centroids used for prediction come from the *trained* heads (the
    pseudo-label centroids of step 2 live in the descriptor space before
    training). Returns the fitted labeller and the train keypoints it was fitted on (both
    saved with the checkpoint: the next round's pseudo-labels start from them) and the
    metric rows.
    """
    labeller = ctx.make_labeller().fit(kp.peaks(), ctx.train_rows, seed=labeller_seed(ctx, round_))
    centers = labeller.landmark_centers_
    rows = write_predictions(ctx, round_, lambda split, rows: predict_landmarks(model, ordered_batches(ctx, rows), centers, ctx.config, ctx.progress, rois=ctx.rois))
    return labeller, kp, rows


def labeller_seed(ctx: RunContext, round_: int) -> int:
    """Seed of the labeller fitted by round ``round_``'s evaluation."""
    return ctx.seed + 1000 * round_ + 500


def write_predictions(ctx: RunContext, round_: int, predict: Callable[[str, np.ndarray], Any]) -> pd.DataFrame:
    """``predict(split, rows) -> Prediction`` on both splits -> keypoints.parquet, the fallback share, NME (metric rows)."""
    from flows.results import evaluate_keypoints, write_keypoints, write_metrics

    stage, _ = ctx.stage_of(round_)
    extra = []
    for split, rows in (("train", ctx.train_rows), ("test", ctx.test_rows)):
        pred = predict(split, rows)
        write_keypoints(ctx.home, ctx.run_id, ctx.method, stage, round_, ctx.store, pred.rows, pred.landmarks)
        extra.append(
            {"run_id": ctx.run_id, "method": ctx.method, "stage": stage, "round": int(round_), "dataset": ctx.dataset, "split": split,
             "metric": "fallback_fraction", "value": float(pred.fallback.mean()), "k": ctx.config.k, "n_regressor_images": -1, "repeat": -1,
             # part of the metrics row key (flows.results.METRIC_KEYS): the same rule as the round's other rows
             "protocol": get_protocol(ctx.evaluation.get("protocol")).name, "box": check_box(ctx.evaluation.get("box"))}
        )
    write_metrics(ctx.home, ctx.run_id, extra)
    return evaluate_keypoints(ctx.home, ctx.run_id, ctx.dataset, ctx.method, stage, round_, seed=ctx.seed, plot=True, **ctx.evaluation)


def detector_gates(backbone: Any, method: str, home: str | Path | None, **given: float | int | None) -> dict[str, float | int]:
    """The DULDConfig detector gates of a run: those ``given`` (not None), then, for the ones left
    unset, what the backbone's folder records for ``method`` (``method_defaults`` in its
    uld_backbone.json: measured on its category, e.g. the face DDPM's D-ULD keypoint rule in
    bench/results/faces.md; D-ULD++ reads D-ULD's entry, see
    ``pipeline.backbones.defaults.METHOD_DEFAULT_ENTRY``); the rest stay DULDConfig's defaults.
    Recorded values are printed."""
    def typed(name: str, v: float | int) -> float | int:
        return float(v) if name.endswith("threshold") else int(v)

    gates = {name: typed(name, v) for name, v in given.items() if v is not None}
    recorded = {name: v for name, v in method_defaults(backbone if isinstance(backbone, str) else None, method, home).items() if name not in gates}
    if recorded:
        print(f"{method} settings recorded with the backbone: " + ", ".join(f"{k}={v}" for k, v in sorted(recorded.items())))
        gates.update({name: typed(name, v) for name, v in recorded.items()})
    return gates


def round_finished(ctx: RunContext, stage: str, round_: int) -> None:
    """A round's checkpoint is written: show it in the UI (Prefect artifacts) and copy the run to
    ``--runs-url`` (while this flow still holds the run's lock)."""
    publish_round_artifacts(ctx.home, ctx.run_id, stage, round_)
    if ctx.mirror is not None:
        from flows.run_mirror import push_after_round

        push_after_round(ctx.mirror)


# ----------------------------------------------------------------- subflows
@flow(name="duld-bootstrap", validate_parameters=False)
def bootstrap_flow(ctx: RunContext) -> None:
    """Bootstrap the heads, evaluate them as round 0, checkpoint ``bootstrap-000``."""
    model, optimizer = train_bootstrap_task(ctx)
    labeller, kp, rows = evaluate_task(ctx, 0, model, train_keypoints(ctx, model))
    save_checkpoint(checkpoint_dir(ctx, BOOTSTRAP, 0), model, optimizer, labeller, kp, _state(ctx, 0, rows))
    round_finished(ctx, BOOTSTRAP, 0)


@flow(name="duld-round", validate_parameters=False)
def round_flow(ctx: RunContext, round_: int) -> None:
    """One self-training round, starting from the previous round's checkpoint (D-ULD++'s own
    stages, ``ctx.stage_of``, run from ``flows.duldpp_stages``)."""
    stage, stage_round = ctx.stage_of(round_)
    if stage != ROUND:
        from flows.duldpp_stages import run_stage

        run_stage(ctx, round_)
        round_finished(ctx, stage, stage_round)
        return
    prev_stage, prev_round = ctx.stage_of(round_ - 1)
    # The previous round's evaluation already ran these heads over the train images and
    # clustered their descriptors: its checkpoint holds both, so nothing is recomputed.
    model, optimizer, labeller, kp = load_checkpoint(checkpoint_dir(ctx, prev_stage, prev_round), ctx.config.lr, ctx.make_labeller())
    pl = pseudo_labels_task(ctx, round_, kp, labeller)
    train_round_task(ctx, round_, model, optimizer, pl)
    labeller, kp, rows = evaluate_task(ctx, round_, model, train_keypoints(ctx, model))
    save_checkpoint(checkpoint_dir(ctx, ROUND, round_), model, optimizer, labeller, kp, _state(ctx, round_, rows))
    # the UI shows NME per round and the round's files (a Prefect artifact; nothing outside a flow run)
    round_finished(ctx, ROUND, round_)


def _state(ctx: RunContext, round_: int, rows: pd.DataFrame) -> dict:
    nme = {}
    if len(rows):
        m = rows[rows["repeat"] == -1]
        for name in ("nme_forward", "nme_backward"):
            v = m.loc[m["metric"] == name, "value"]
            if len(v):
                nme[name] = float(v.iloc[0])
    return {"round": int(round_), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **nme}


# ----------------------------------------------------------------- the flow
def resolve_run(home: Path, run_id: str | None, resume: bool, config: dict) -> tuple[str, bool]:
    """Pick the run id and decide whether this is a fresh run or a resumption."""
    from flows.results import new_run_id, read_run_config

    ws = Workspace(home)
    if run_id is None:
        if resume:
            raise ConfigError("--resume needs the --run-id of the run to continue", where="--resume", fix="pass --run-id <id> (see `ls <home>/runs`)")
        return new_run_id(str(config.get("method", METHOD))), False
    cfg_path = ws.run_file(run_id, "config.json")
    if not cfg_path.exists():
        if resume:
            # Starting afresh here would hide a typo in the id behind a brand-new run.
            raise ConfigError(
                f"no run {run_id!r} to resume",
                where=str(ws.run_dir(run_id)),
                fix="drop --resume to start a new run with this id, or give the --run-id of an existing run (see `ls <home>/runs`)",
            )
        return run_id, False
    if not resume:
        raise ConfigError(
            f"run {run_id!r} already exists",
            where=str(ws.run_dir(run_id)),
            fix="pass --resume to continue it, or choose a new --run-id",
        )
    old = read_run_config(home, run_id)
    if isinstance(old.get("duldpp"), dict):
        old = {**old, "duldpp": {**DULDPP_ADDED, **old["duldpp"]}}
    keys = [k for k in _RESUME_KEYS if k != "labeller" or "labeller" in old]
    diff = [k for k in keys if json.loads(json.dumps(old.get(k), default=str)) != json.loads(json.dumps(config.get(k), default=str))]
    if diff:
        raise ConfigError(
            f"run {run_id!r} was made with different settings ({', '.join(diff)}); it cannot be resumed with these",
            where=str(cfg_path),
            fix="resume with the run's original options (see its config.json) or start a new run",
        )
    return run_id, True


@flow(name="duld", validate_parameters=False, log_prints=True)
@releases_claims
def duld(
    dataset: str,
    backbone: Any = "shipped",
    spec: FeatureSpec | None = None,
    k: int = 10,
    rounds: int = 3,
    steps_per_round: int = 150,
    bootstrap_steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 12,
    home: str | Path = "workspace",
    seed: int = 0,
    run_id: str | None = None,
    resume: bool = False,
    resolution: int | None = None,
    channels: int = 64,
    descriptor_dim: int = 32,
    bottleneck: str = "conv1x1",
    max_rounds: int | None = None,
    progress: bool = True,
    threads: int | None = None,
    roi: bool = True,
    store_path: str | Path | None = None,
    views: ViewAugmentConfig | None = ViewAugmentConfig(),
    threshold: float | None = None,
    relative_threshold: float | None = None,
    nms_radius: int | None = None,
    top_k: int | None = None,
    cluster_nms_radius: int | None = None,
    device: str = "auto",
    evaluation: dict | None = None,
    method: str = METHOD,
    method_params: dict | None = None,
    runs_url: str | None = None,
    dask_address: str | None = None,
    dask_workers: int | None = None,
    eval_batch: int = 32,
) -> pd.DataFrame:
    """Train D-ULD (or another :data:`ENGINE_METHODS` method) on a dataset's cached features and evaluate every round.

    ``method``: ``duld`` (k-means pseudo-labels) or ``mallis-d`` (over-clustering into
    ``method_params["m"]`` training clusters, default 100); recorded in config.json and in
    every table row, and part of what a ``resume`` must match. ``duld++`` (paper 001, Sec 3.3):
    ``method_params["duld_rounds"]`` D-ULD rounds (default 2), the proxy-task stage
    (``proxy_steps``, default ``steps_per_round``), then ``rounds`` TSC rounds with ``q`` pose
    clusters (default 5); see :mod:`flows.duldpp_stages`.

    ``dask_address`` / ``dask_workers``: fan each round's keypoint extraction over the training
    images out to that Dask scheduler, or to a LocalCluster of that many workers started for the
    run (:mod:`flows.keypoints_dask`; the keypoints are the same as in one process).
    ``eval_batch``: images per batch of the keypoint / landmark passes (bounds their memory).

    ``runs_url``: copy the run folder to ``<runs_url>/<run id>`` after every round
    (:mod:`storage.run_mirror`; the command copies it once more when it ends).

    ``evaluation``: settings passed to ``flows.results.evaluate_keypoints``
    (``protocol``, ``box``, ``n_regressor_images``, ``repeats``); None = its defaults.

    ``resolution``: heatmap / descriptor map size (default: crop/4, at most
    the largest cached map). ``max_rounds`` stops after that many completed
    rounds (used to simulate an interrupted run; a later ``resume=True`` call
    continues). ``roi``: keep keypoints inside each image's object box (the
    manifest box mapped into the crop), as ZeroShot samples only RoI pixels.
    ``threads``: torch CPU threads for this run (None = leave as
    is); on a loaded 2-core machine 1 thread was ~25x faster per step than 2
    (OpenMP oversubscription, measured in bench/results/heads.md). Returns the
    per-round NME table.
    ``store_path``: read this feature store directly instead of
    looking it up from ``backbone`` and ``spec``.
    ``views``: how the augmented training views are drawn; their features are
    extracted once into a view store next to the feature store (a subflow,
    resumable; ``backbone`` must be the store's backbone, loaded on ``device``).
    ``None`` warps the cached maps instead (the shortcut, for comparison).
    ``threshold`` / ``relative_threshold`` / ``nms_radius`` / ``top_k``: the detector gates of
    :func:`pipeline.heads.detector.nms_keypoints`; ``cluster_nms_radius``: which of those keypoints
    the pseudo-labeller is fitted on (default: DULDConfig's).
    Writes ``figures/duld-test-landmarks.png``, the last round's landmarks on test crops.
    """
    from flows.features import open_features
    from flows.results import write_run_config

    home = Path(home)
    if method not in ENGINE_METHODS:
        raise ConfigError(f"the self-training engine has no method {method!r}", where="--method", fix=f"use one of: {', '.join(ENGINE_METHODS)}")
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    if rounds < 0:
        raise ConfigError(f"rounds must be >= 0, got {rounds}", where="--rounds")
    gates = detector_gates(backbone, method, home, threshold=threshold, relative_threshold=relative_threshold, nms_radius=nms_radius,
                           top_k=top_k, cluster_nms_radius=cluster_nms_radius)
    cfg = DULDConfig(k=k, lr=lr, batch_size=batch_size, bootstrap_steps=bootstrap_steps, steps_per_round=steps_per_round, views=views, **gates)
    # A caller that already has the store (the demo, after extracting it) passes its path:
    # finding it from (backbone, spec) means loading and hashing the backbone again.
    store = FeatureStore.open(store_path) if store_path is not None else open_features(home, dataset, backbone, spec)
    biggest = max(s[-1] for s in store.shapes.values())
    res = int(resolution) if resolution else min(biggest, max(store.image_size // 4, 8))
    heads = ULDHeadsConfig.from_feature_shapes(
        store.shapes, crop_size=store.image_size, out_size=res, channels=channels, descriptor_dim=descriptor_dim, bottleneck=bottleneck,
        hidden=channels,
    )
    train_rows, test_rows = store.indices("train"), store.indices("test")
    backbone_name = backbone if isinstance(backbone, str) else getattr(backbone, "name", str(backbone))
    labeller_spec = ENGINE_METHODS[method](cfg, dict(method_params or {}))
    make_labeller(labeller_spec)  # bad settings (e.g. M < K) fail here, before any work
    pp = duldpp_settings(dict(method_params or {}), steps_per_round) if method == "duld++" else {}
    if pp:
        from pipeline.methods.duldpp import pose_vae_config

        pose_vae_config(heads.out_size, k)  # an odd heatmap size fails here, before any work
    config = {
        "method": method,
        "dataset": dataset,
        "backbone": backbone_name,
        "feature_store": str(store.path),
        "feature_config_hash": store.config_hash,
        "duld": cfg.to_json(),
        "heads": heads.to_json(),
        "labeller": labeller_spec,
        **({"duldpp": pp} if pp else {}),
        "rounds": int(rounds),
        "seed": int(seed),
        "roi": bool(roi),
        "n_train": int(len(train_rows)),
        "n_test": int(len(test_rows)),
    }
    if evaluation:
        config["evaluation"] = dict(evaluation)
    run_id, resuming = resolve_run(home, run_id, resume, config)
    claim(Workspace(home).run_dir(run_id), "run")  # one writer per run folder, until this flow returns
    rois = None
    if roi:
        from flows.zeroshot import store_rois

        rois = np.zeros((len(store), 4), np.float32)
        for rows in (train_rows, test_rows):
            rois[rows] = store_rois(home, dataset, store, rows)
    view_store = None
    if cfg.views is not None:
        from flows.augmented_features import extract_view_features
        from storage.augmented_features import ViewStore

        path = extract_view_features(dataset, backbone, store.path, cfg.views, home=home, device=device)
        view_store = ViewStore.open(path)
    # The run exists (config.json) only once its inputs check out: a command that fails on them
    # (e.g. views of another backbone) leaves no run behind that the corrected command would trip over.
    write_run_config(home, run_id, config)
    ctx = RunContext(home, run_id, dataset, store, train_rows, test_rows, cfg, heads, int(seed), progress, eval_batch=int(eval_batch), rois=rois, views=view_store,
                     evaluation=dict(evaluation or {}), method=method, labeller=labeller_spec, duldpp=pp,
                     mirror=RunMirror.for_run(runs_url, Workspace(home).run_dir(run_id)) if runs_url else None)
    total = ctx.total_rounds(rounds)
    done = completed_rounds(ctx, total)
    if resuming:
        print(f"resuming run {run_id}: " + ("nothing finished yet" if done < 0 else f"rounds 0..{done} finished"))
    else:
        print(f"run {run_id}: {len(train_rows)} train / {len(test_rows)} test images, heads at {res}x{res}")
    t0 = time.perf_counter()
    limit = total if max_rounds is None else min(total, int(max_rounds))
    with contextlib.ExitStack() as stack:
        if (dask_address, dask_workers) != (None, None) and done < limit:
            from flows.keypoints_dask import dask_scheduler

            ctx.dask_address = stack.enter_context(dask_scheduler(dask_address, dask_workers))
            print(f"keypoint extraction of the rounds fanned out to the Dask scheduler {ctx.dask_address}")
        runner = round_task_runner(ctx.dask_address)
        if done < 0 and limit >= 0:
            bootstrap_flow.with_options(flow_run_name="bootstrap", **runner)(ctx)
            done = 0
        for r in range(done + 1, limit + 1):
            name = f"round-{r}" if ctx.stage_of(r)[0] == ROUND else f"{ctx.stage_of(r)[0]}-{r}"
            round_flow.with_options(name=name, flow_run_name=name, **runner)(ctx, r)
        ctx.dask_address = None
    title = METHOD_TITLES.get(method, method)
    if method == "duld++":
        from flows.duldpp_stages import ensure_pose_analysis

        ensure_pose_analysis(home, run_id, store)  # Fig. 7's pose analysis of stages that lack it (runs made before it existed)
    print(f"{title} run {run_id} finished in {time.perf_counter() - t0:.0f} s")
    last = completed_rounds(ctx, total)
    if last >= 0:
        from flows.figures import landmark_sheet

        stage, _ = ctx.stage_of(last)
        sheet = landmark_sheet(home, run_id, dataset, store.image_size, float(store.config["spec"]["crop_margin"]),
                               ctx.ws.figures_dir(run_id) / "duld-test-landmarks.png", title=f"{title} {stage} {last}: landmarks on test crops",
                               stage=stage, round_=last)
        print(f"landmarks on test crops: {sheet}")
    table = nme_table(home, run_id)
    table.attrs["run_id"] = run_id
    return table


# What the per-round table shows: NME as written and with fallback landmarks treated as missing,
# and the per-landmark Hungarian accuracy at 0.2 of the normaliser (both ways).
NME_TABLE_METRICS = ["nme_forward", "nme_backward", "nme_forward_nofallback", "nme_backward_nofallback", "acc0.2_hungarian", "acc0.2_hungarian_nofallback"]


def nme_table(home: str | Path, run_id: str) -> pd.DataFrame:
    """Per-round forward / backward NME (%), Hungarian accuracy and fallback share of an engine run, from metrics.parquet."""
    from flows.results import metrics_table, read_run_config

    try:
        method = str(read_run_config(home, run_id).get("method", METHOD))
    except StoreError:
        method = METHOD

    try:
        m = metrics_table(home, run_id)
    except StoreError:
        return pd.DataFrame(columns=["stage", "round", *NME_TABLE_METRICS, "fallback_train", "fallback_test"])
    m = m[m["method"] == method]
    piv = m[m["metric"].isin(NME_TABLE_METRICS)].pivot_table(index=["stage", "round"], columns="metric", values="value")
    piv = piv[[c for c in NME_TABLE_METRICS if c in piv.columns]]
    fb = m[m["metric"] == "fallback_fraction"].pivot_table(index=["stage", "round"], columns="split", values="value")
    fb.columns = [f"fallback_{c}" for c in fb.columns]
    out = piv.join(fb, how="left").reset_index().sort_values("round").reset_index(drop=True)
    out.columns.name = None
    return out
