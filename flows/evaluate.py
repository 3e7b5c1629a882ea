"""The evaluate stage: forward/backward NME (and friends) of every (method, stage, round) in a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.results import evaluate_keypoints, metrics_table, read_keypoints, read_run_config
from storage.layout import Workspace
from storage.locks import claim, releases_claims


@task(name="evaluate-keypoints", task_run_name="evaluate-{method}-{stage}-{round_}", cache_policy=NO_CACHE, persist_result=False)
def _evaluate_one(home: Path, run_id: str, dataset: str, method: str, stage: str, round_: int, kwargs: dict[str, Any]) -> int:
    return len(evaluate_keypoints(home, run_id, dataset, method, stage, round_, **kwargs))


@flow(name="evaluate", validate_parameters=False, log_prints=True)
@releases_claims
def evaluate(
    run_id: str,
    home: str | Path = "workspace",
    dataset: str | None = None,
    *,
    protocol: str = "paper",
    box: str = "landmarks",
    n_regressor_images: int | None = None,
    repeats: int | None = None,
    seed: int = 0,
    forward_lambda: float | None = None,
    backward_lambda: float | None = None,
    missing: str = "impute",
    stage: str | None = None,
    round_: int | None = None,
) -> pd.DataFrame:
    """Evaluate the keypoints of run ``run_id``; the dataset comes from the run's config.json unless given.

    Every (method, stage, round) found in keypoints.parquet is evaluated
    (optionally only ``stage`` / ``round_``) under the regressor ``protocol`` and
    ``box`` rule (see ``flows.results.evaluate_keypoints``; None settings are the
    protocol's). Returns the run's metrics table.
    """
    home = Path(home)
    dataset = dataset or read_run_config(home, run_id).get("dataset")
    claim(Workspace(home).run_dir(run_id), "run")  # appends to the run's metrics: not while its method writes
    if not dataset:
        from pipeline.errors import ConfigError

        raise ConfigError(f"run {run_id!r} does not record its dataset", where="config.json", fix="pass --dataset")
    kp = read_keypoints(home, run_id)
    groups = kp[["method", "stage", "round"]].drop_duplicates().sort_values(["method", "stage", "round"])
    if stage is not None:
        groups = groups[groups["stage"] == stage]
    if round_ is not None:
        groups = groups[groups["round"] == int(round_)]
    kwargs = dict(protocol=protocol, box=box, n_regressor_images=n_regressor_images, repeats=repeats, seed=seed,
                  forward_lambda=forward_lambda, backward_lambda=backward_lambda, missing=missing)
    for m, s, r in groups.itertuples(index=False):
        _evaluate_one(home, run_id, dataset, m, s, int(r), kwargs)
    return metrics_table(home, run_id)
