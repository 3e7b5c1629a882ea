"""Prefect deployments of the main flows, so runs can be started and parameterised from the UI.

``uld deploy`` serves these four entry flows from the local process
(``prefect.serve``) against the workspace's ``uld ui`` server; each appears in
the UI under *Deployments* with a form for its parameters:

=================  ==============================================================
``uld-features``   cache hyperfeatures (``uld features``), optionally on Dask workers
``uld-zeroshot``   features (no-op when cached) then ZeroShot with K landmarks
``uld-train``      features then the self-training engine (``--method duld | mallis-d | duld++``, K, rounds)
``uld-demo``       the whole demo on the synthetic dataset (sizes, K, rounds)
=================  ==============================================================

The entry flows take plain parameters only (strings, numbers, lists), so
Prefect can draw a form and validate it; they build the :class:`FeatureSpec`
exactly as the CLI does (:func:`flows.cli_options.feature_spec`) and call the
stage flows, which then appear as their subflows. ``home`` defaults to the
workspace ``uld deploy`` was started for. No algorithms here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

# Deployment name of every entry flow (the UI shows "<flow name>/<deployment name>").
DEPLOYMENT = "local"


def _spec(size: int, timesteps: list[int] | None, layers: list[str] | None, seed: int, backbone: str, home: str) -> Any:
    from flows.cli_options import feature_spec
    from pipeline.datasets.crop import DEFAULT_CROP_MARGIN

    ts = None if not timesteps else ",".join(str(int(t)) for t in timesteps)
    ls = None if not layers else ",".join(layers)
    return feature_spec(size, ts, ls, DEFAULT_CROP_MARGIN, None, seed, backbone=backbone, home=Path(home))


def _features(dataset: str, backbone: str, spec: Any, home: str, device: str, dask_workers: int | None, **options: Any) -> Path:
    if dask_workers:
        from flows.features_dask import extract_features_dask

        return extract_features_dask(dataset, backbone, spec, dask_workers=dask_workers, home=home, device=device, **options)
    from flows.features import extract_features

    return extract_features(dataset, backbone, spec, home=home, device=device, **options)


@flow(name="uld-features", flow_run_name="deploy-features-{dataset}", log_prints=True)
def features_entry(
    dataset: str,
    backbone: str = "shipped",
    size: int = 64,
    timesteps: list[int] | None = None,
    layers: list[str] | None = None,
    batch_size: int = 16,
    shard_size: int = 64,
    skip_bad: bool = False,
    dask_workers: int | None = None,
    seed: int = 0,
    device: str = "auto",
    home: str = "workspace",
) -> str:
    """``uld features`` from the UI; returns the store path. ``dask_workers``: a local Dask cluster of that size."""
    spec = _spec(size, timesteps, layers, seed, backbone, home)
    path = _features(dataset, backbone, spec, home, device, dask_workers, batch_size=batch_size, shard_size=shard_size, skip_bad=skip_bad)
    print(f"feature store: {path}")
    return str(path)


@flow(name="uld-zeroshot", flow_run_name="deploy-zeroshot-{dataset}-k{k}", log_prints=True)
def zeroshot_entry(
    dataset: str,
    k: int = 10,
    backbone: str = "shipped",
    size: int = 64,
    run_id: str | None = None,
    n_samples_per_image: int = 200,
    seed: int = 0,
    device: str = "auto",
    home: str = "workspace",
) -> str:
    """Features (a no-op when cached), then ZeroShot (paper 001, Sec 3.1) with ``k`` landmarks; returns the run id."""
    from flows.zeroshot import zeroshot

    spec = _spec(size, None, None, seed, backbone, home)
    store = _features(dataset, backbone, spec, home, device, None)
    run = zeroshot(dataset, backbone, spec, k=k, n_samples_per_image=n_samples_per_image, home=home, seed=seed, run_id=run_id, store_path=store)
    print(f"run: {run}")
    return run


@flow(name="uld-train", flow_run_name="deploy-{method}-{dataset}-k{k}", log_prints=True)
def train_entry(
    dataset: str,
    method: str = "duld",
    k: int = 10,
    rounds: int = 3,
    steps_per_round: int = 150,
    bootstrap_steps: int = 300,
    backbone: str = "shipped",
    size: int = 64,
    run_id: str | None = None,
    resume: bool = False,
    seed: int = 0,
    device: str = "auto",
    home: str = "workspace",
) -> str:
    """Features, then the self-training engine (``flows.duld``: D-ULD, Mallis (D), D-ULD++); returns the run folder."""
    from flows.duld import ENGINE_METHODS, duld
    from pipeline.errors import ConfigError
    from storage.layout import Workspace

    if method not in ENGINE_METHODS:
        raise ConfigError(f"unknown method {method!r}", where="method", fix=f"use one of {', '.join(sorted(ENGINE_METHODS))}")
    spec = _spec(size, None, None, seed, backbone, home)
    store = _features(dataset, backbone, spec, home, device, None)
    table = duld(dataset, backbone, spec, k=k, rounds=rounds, steps_per_round=steps_per_round, bootstrap_steps=bootstrap_steps,
                 home=home, seed=seed, run_id=run_id, resume=resume, store_path=store, device=device, method=method, progress=False)
    folder = Workspace(Path(home)).run_dir(table.attrs.get("run_id", run_id))  # the engine names a fresh run
    print(f"run folder: {folder}")
    return str(folder)


@flow(name="uld-demo", log_prints=True)
def demo_entry(
    n_train: int = 600,
    n_test: int = 200,
    k: int = 10,
    rounds: int = 3,
    steps_per_round: int = 150,
    bootstrap_steps: int = 300,
    backbone: str = "shipped",
    seed: int = 0,
    device: str = "auto",
    home: str = "workspace",
) -> str:
    """``uld demo`` with its sizes, K and rounds as parameters; returns the comparison table as text."""
    from flows.demo import DemoConfig, demo

    cfg = DemoConfig(n_train=n_train, n_test=n_test, k=k, rounds=rounds, steps_per_round=steps_per_round,
                     bootstrap_steps=bootstrap_steps, backbone=backbone, seed=seed)
    table = demo(home=home, cfg=cfg, device=device)
    return table.to_string(index=False)


ENTRY_FLOWS = {"features": features_entry, "zeroshot": zeroshot_entry, "train": train_entry, "demo": demo_entry}


def build_deployments(home: str | Path, device: str = "auto", only: list[str] | None = None) -> list[Any]:
    """``RunnerDeployment``s of the entry flows (all, or the ``only`` ones) with ``home``/``device`` as defaults."""
    from pipeline.errors import ConfigError

    names = only or list(ENTRY_FLOWS)
    unknown = sorted(set(names) - set(ENTRY_FLOWS))
    if unknown:
        raise ConfigError(f"unknown deployment(s) {unknown}", where="uld deploy --only", fix=f"choose from {', '.join(ENTRY_FLOWS)}")
    defaults = {"home": str(Path(home).expanduser().resolve()), "device": device}
    return [
        ENTRY_FLOWS[n].to_deployment(name=DEPLOYMENT, parameters=defaults, tags=["uld"], description=(ENTRY_FLOWS[n].__doc__ or "").strip())
        for n in names
    ]
