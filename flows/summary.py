"""The one run summary every method command prints (zeroshot, duld, evaluate, baselines).

Same columns for every method, so runs can be compared at a glance: forward /
backward NME (% of the normaliser), the same with fallbacks treated as missing,
Hungarian accuracy at 0.2, the regressor size and the cluster quality where
the method has clusters. One row per (method, stage, round, K, protocol, box).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

SUMMARY_COLUMNS: tuple[str, ...] = (
    "nme_forward", "nme_backward", "nme_forward_nofallback", "nme_backward_nofallback",
    "acc0.2_hungarian", "fallback_fraction", "n_imputed_test", "n_regressor_images", "silhouette", "calinski_harabasz",
)
_INDEX = ["method", "stage", "round", "k", "protocol", "box"]


def summary_table(home: str | Path, run_id: str, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """The run's summary: one row per evaluated (method, stage, round, k, protocol, box).

    Metrics that do not depend on the protocol (cluster quality, computed once on
    the training split) are shown on every row of their (method, stage, round).
    """
    from flows.results import metrics_table

    m = metrics_table(home, run_id)
    wanted = [c for c in SUMMARY_COLUMNS + tuple(extra) if c in set(m["metric"])]
    m = m[m["metric"].isin(wanted)]
    if m.empty:
        return pd.DataFrame(columns=_INDEX + wanted)
    scored = m[m["split"] != "train"]
    table = scored.pivot_table(index=_INDEX, columns="metric", values="value", aggfunc="first")
    # Train-split rows (cluster quality) join on the method's run keys, not on the protocol.
    shared = m[m["split"] == "train"].pivot_table(index=["method", "stage", "round"], columns="metric", values="value", aggfunc="first")
    if table.empty:
        table = shared.reset_index().assign(k=-1, protocol="", box="").set_index(_INDEX)
    elif not shared.empty:
        table = table.reset_index().merge(shared.reset_index(), on=["method", "stage", "round"], how="left", suffixes=("", "_train")).set_index(_INDEX)
    # rounds in the order they ran (stage names sort otherwise: D-ULD++'s "duldpp" before "proxy")
    table = table.sort_index(level=["method", "round"], sort_remaining=True)
    return table[[c for c in wanted if c in table.columns]]


def format_summary(table: pd.DataFrame) -> str:
    return table.to_string(float_format=lambda v: f"{v:.4g}")


def print_summary(home: str | Path, run_id: str, extra: tuple[str, ...] = ()) -> None:
    """Print :func:`summary_table` and where the run's files are."""
    import typer

    typer.echo(format_summary(summary_table(home, run_id, extra)))
    typer.echo(f"\nrun: {run_id}  (all metrics: {Path(home) / 'runs' / run_id / 'metrics.parquet'})")
