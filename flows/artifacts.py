"""Prefect artifacts of a method run: what the UI shows for each finished round.

:func:`publish_round_artifacts` is meant to be called at the end of a round's
subflow (D-ULD's ``bootstrap`` and ``round-<r>``, paper Sec 3.2 self-training
rounds): it reads the run's own tables, so the artifacts show exactly what is
on disk, and publishes

* a **table artifact** ``<run>-nme``: forward / backward NME (and the
  no-fallback variant and the fallback share when present) of every stage and
  round evaluated so far, test split, averaged over the regressor repeats;
* a **markdown artifact** ``<run>-<stage>-<round>``: the same table for this
  round, plus the paths of the run's Parquet files and how many of their rows
  belong to this round, and the round's checkpoint folder.

Keys are stable per run, so the UI keeps a history: every round adds a new
version of ``<run>-nme``. Outside a flow or task run Prefect refuses to attach
artifacts to nothing; then this publishes nothing and returns None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import pandas as pd

from storage.layout import Workspace
from storage.tables import read_table

# The NME columns of the table, in order (metrics.parquet names; paper Sec 4.1 protocol).
NME_METRICS = ("nme_forward", "nme_backward", "nme_forward_nofallback", "fallback_fraction")
# Run-level tables with rows of every round (kind = file stem).
RUN_TABLES = ("keypoints", "pseudolabels", "metrics", "errors")
_DEFAULT_PROTOCOL = {"protocol": "paper", "box": "landmarks"}


@dataclass(frozen=True)
class RoundArtifacts:
    """What :func:`publish_round_artifacts` published (ids of the Prefect artifacts) and showed."""

    table_id: UUID
    markdown_id: UUID
    table: list[dict]
    files: dict[str, int]  # parquet path -> rows of this round in it (-1: a file of this round only)


def artifact_key(*parts: object) -> str:
    """A Prefect artifact key from ``parts``: lowercase letters, digits and dashes only."""
    raw = "-".join(str(p) for p in parts).lower()
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", raw)).strip("-")


def nme_table(metrics: pd.DataFrame, split: str = "test") -> list[dict]:
    """One row per (stage, round) in evaluation order: the mean over repeats of each NME metric.

    Uses the summary rows (``repeat == -1``) when the evaluator wrote them, and
    the paper protocol's rows when the table holds several protocols.
    """
    m = metrics[(metrics["split"] == split) & metrics["metric"].isin(NME_METRICS)]
    for col, value in _DEFAULT_PROTOCOL.items():
        if col in m.columns and (m[col] == value).any():
            m = m[m[col] == value]
    if (m["repeat"] == -1).any():
        m = m[m["repeat"] == -1]
    rows = []
    for (stage, round_), g in m.groupby(["stage", "round"], sort=False):
        row: dict = {"stage": str(stage), "round": int(round_)}
        for name in NME_METRICS:
            v = g.loc[g["metric"] == name, "value"]
            if len(v):
                row[name] = round(float(v.mean()), 3)
        rows.append(row)
    return sorted(rows, key=lambda r: r["round"])


def round_files(home: str | Path, run_id: str, stage: str, round_: int) -> dict[str, int]:
    """The run's Parquet files that hold rows of (stage, round), with the row count in each."""
    run_dir = Workspace(Path(home)).run_dir(run_id)
    out: dict[str, int] = {}
    for kind in RUN_TABLES:
        path = run_dir / f"{kind}.parquet"
        if path.is_file():
            df = read_table(path, kind)
            n = int(((df["stage"] == stage) & (df["round"] == int(round_))).sum())
            if n:
                out[str(path)] = n
    # Files written for one round only (e.g. round-003-keypoints.parquet).
    for path in sorted(run_dir.glob(f"*{int(round_):03d}*.parquet")):
        out.setdefault(str(path), -1)
    return out


def _markdown(run_id: str, stage: str, round_: int, table: list[dict], files: dict[str, int], checkpoint: Path) -> str:
    cols = ["stage", "round", *[c for c in NME_METRICS if any(c in r for r in table)]]
    lines = [f"# {run_id}: {stage} round {round_}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table:
        mark = "**" if (r["stage"], r["round"]) == (stage, round_) else ""
        lines.append("| " + " | ".join(f"{mark}{r.get(c, '')}{mark}" for c in cols) + " |")
    lines += ["", "NME in % of the dataset's normaliser, test split, averaged over the regressor repeats.", "", "## Files", ""]
    for path, n in files.items():
        lines.append(f"- `{path}`" + (f" ({n} rows of this round)" if n >= 0 else ""))
    if checkpoint.is_dir():
        lines.append(f"- checkpoint: `{checkpoint}`")
    return "\n".join(lines) + "\n"


def publish_round_artifacts(home: str | Path, run_id: str, stage: str, round_: int) -> RoundArtifacts | None:
    """Publish the NME-per-round table and this round's markdown summary to the current Prefect run.

    Call it inside the round's subflow after its evaluation wrote
    ``metrics.parquet``. Returns None (publishing nothing) when the run has no
    metrics yet or when called outside any flow or task run.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return None
    ws = Workspace(Path(home))
    metrics_path = ws.run_file(run_id, "metrics.parquet")
    if not metrics_path.is_file():
        return None
    table = nme_table(read_table(metrics_path, "metrics"))
    files = round_files(home, run_id, stage, round_)
    table_id = create_table_artifact(
        table=table or [{"stage": stage, "round": int(round_)}],
        key=artifact_key(run_id, "nme"),
        description=f"NME per round of run {run_id} (test split), after {stage} round {round_}",
    )
    markdown_id = create_markdown_artifact(
        markdown=_markdown(run_id, stage, int(round_), table, files, ws.checkpoint_dir(run_id, stage, round_)),
        key=artifact_key(run_id, stage, round_),
        description=f"{stage} round {round_} of run {run_id}: NME and the Parquet files",
    )
    return RoundArtifacts(table_id, markdown_id, table, files)
