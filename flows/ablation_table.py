"""The rows of the paper's Table 2 ablation (seed 001, Sec 5) and how they are read from runs.

No Prefect here: :mod:`flows.ablation` runs the methods; this module says which run and which
rounds each table row reads (:data:`ROWS`), collects their test-split metrics into the long
``ablation`` table (storage.tables) and renders it as Markdown with mean +- std over seeds.

Paper 001's Table 2 is incremental: ZeroShot, D-ULD, + the pose-guided proxy task (PP),
+ two-stage clustering trained with the full VAE, + TSC with Eq. 3 (= D-ULD++). Here the "+ PP"
and "+ TSC (D-ULD++)" rows are two stages of one D-ULD++ run (its proxy stage's evaluation,
then its last TSC round), whose D-ULD rounds are as many as the D-ULD row's run has, so each
row adds one thing to the row above. "+ TSC w/ full VAE" is a second D-ULD++ run with the same
settings and seed whose TSC rounds train the whole VAE with the ELBO instead of Eq. 3
(``tsc_loss = "elbo"``): up to its proxy stage it is the D-ULD++ run, step for step. ZeroShot is shown twice (the paper's plain K-means and
the project's cluster choice) and Mallis (D) is added as in the paper's Table 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import StoreError
from pipeline.evaluation import yaw_bin_labels

# What the table reports per row: paper protocol, test split (flows.results.evaluate_keypoints).
METRICS = ("nme_forward", "nme_backward", "acc0.2_hungarian")
# Plus, where the dataset has yaw (synthetic heads, LS3D), the evaluator's NME per yaw bin
# (``nme_<direction>_yaw<bin>``, pipeline.evaluation.nme_by_yaw): Fig. 3b's view of each row.
YAW_METRIC = re.compile(r"^nme_(forward|backward)_yaw(.+)$")
LAST, BEST = "last", "best"


@dataclass(frozen=True)
class AblationRow:
    """One line of the table: which run (``key``, part of the run id), which method's rows of
    it, and which of its stages count (the last / best round is taken among them)."""

    label: str
    key: str
    method: str
    stages: tuple[str, ...]
    not_run: str = ""  # why the row has no run (the table lists it with this reason)

ROWS: tuple[AblationRow, ...] = (
    AblationRow("ZeroShot (paper: K-means into K)", "zeroshot-paper", "zeroshot", ("zeroshot",)),
    AblationRow("ZeroShot (K of 4K clusters, project default)", "zeroshot", "zeroshot", ("zeroshot",)),
    AblationRow("D-ULD", "duld", "duld", ("bootstrap", "round")),
    AblationRow("D-ULD + PP (pose proxy)", "duldpp", "duld++", ("proxy",)),
    AblationRow("+ TSC w/ full VAE", "duldpp-fullvae", "duld++", ("duldpp",)),
    AblationRow("+ TSC (D-ULD++)", "duldpp", "duld++", ("duldpp",)),
    AblationRow("Mallis (D)", "mallis-d", "mallis-d", ("bootstrap", "round")),
)


def run_id_for(ablation_id: str, key: str, seed: int) -> str:
    """The run folder of one (ablation, method, seed): a re-run finds and resumes it."""
    return f"abl-{ablation_id}-{key}-s{int(seed)}"


def _test_rows(home: Path, run_id: str, method: str, evaluation: dict) -> pd.DataFrame:
    from flows.results import metrics_table

    m = metrics_table(home, run_id)
    keep = (m["method"] == method) & (m["split"] == "test") & (m["metric"].isin(METRICS) | m["metric"].str.match(YAW_METRIC.pattern))
    keep &= (m["protocol"] == evaluation.get("protocol", "paper")) & (m["box"] == evaluation.get("box", "landmarks"))
    return m[keep]


def row_values(home: str | Path, run_id: str, row: AblationRow, evaluation: dict | None = None) -> list[dict]:
    """The ``last`` and ``best`` (lowest test forward NME; chosen on the test split, so optimistic)
    round of ``row``'s stages in run ``run_id``: one dict per (pick, metric), the metrics being
    :data:`METRICS` and the per-yaw-bin NMEs the run has (:data:`YAW_METRIC`)."""
    m = _test_rows(Path(home), run_id, row.method, dict(evaluation or {}))
    m = m[m["stage"].isin(row.stages)]
    if m.empty:
        raise StoreError(f"run {run_id!r} has no test metrics for {row.label!r} (method {row.method}, stages {', '.join(row.stages)})",
                         where=str(Path(home) / "runs" / run_id / "metrics.parquet"),
                         fix="re-run `uld ablation` with the same options: it resumes the run and evaluates it")
    piv = m.pivot_table(index=["stage", "round"], columns="metric", values="value", aggfunc="first").reset_index()
    last = piv.loc[piv["round"].idxmax()]
    fwd = piv["nme_forward"] if "nme_forward" in piv else pd.Series(np.nan, index=piv.index)
    best = piv.loc[fwd.idxmin()] if fwd.notna().any() else last
    names = list(METRICS) + [c for c in piv.columns if YAW_METRIC.match(str(c))]
    out = []
    for pick, rec in ((LAST, last), (BEST, best)):
        for metric in names:
            out.append({"pick": pick, "stage": str(rec["stage"]), "round": int(rec["round"]), "metric": metric,
                        "value": float(rec[metric]) if metric in rec and pd.notna(rec[metric]) else float("nan")})
    return out


def collect(home: str | Path, ablation_id: str, seeds: list[int], evaluation: dict | None = None) -> pd.DataFrame:
    """The ``ablation`` table of every row and seed (runs named by :func:`run_id_for`)."""
    records = []
    for row in ROWS:
        for seed in seeds:
            base = {"ablation_id": ablation_id, "row": row.label, "method": row.method, "seed": int(seed)}
            if row.not_run:
                records += [{**base, "stage": "", "round": -1, "run_id": "", "pick": pick, "metric": metric, "value": float("nan"),
                             "note": row.not_run} for pick in (LAST, BEST) for metric in METRICS]
                continue
            rid = run_id_for(ablation_id, row.key, seed)
            records += [{**base, **v, "run_id": rid, "note": ""} for v in row_values(home, rid, row, evaluation)]
    return pd.DataFrame.from_records(records)


def _mean_std(values: pd.Series, digits: int) -> str:
    v = values.dropna().to_numpy(np.float64)
    if len(v) == 0:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} +- {v.std(ddof=1):.{digits}f}"


def render_markdown(frame: pd.DataFrame, title: str, notes: list[str] | None = None) -> str:
    """A Markdown table, one line per row of :data:`ROWS` in order: mean +- sample std over
    seeds (a bare mean with one seed) of the last round, and the best round's NME."""
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes or []]
    lines += ["", "| row | forward NME | backward NME | Hungarian acc@0.2 | best-round forward | best-round backward | rounds (last / best) | seeds |",
              "|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        sub = frame[frame["row"] == row.label]
        if row.not_run:
            lines.append(f"| {row.label} | {row.not_run} | | | | | | |")
            continue
        last, best = sub[sub["pick"] == LAST], sub[sub["pick"] == BEST]

        def cell(part: pd.DataFrame, metric: str, digits: int = 2) -> str:
            return _mean_std(part.loc[part["metric"] == metric, "value"], digits)

        def rounds(part: pd.DataFrame) -> str:
            r = part.drop_duplicates("seed")
            return ",".join(f"{s} {n}" for s, n in sorted(set(zip(r["stage"], r["round"])), key=lambda t: t[1]))

        lines.append(f"| {row.label} | {cell(last, 'nme_forward')} | {cell(last, 'nme_backward')} | {cell(last, 'acc0.2_hungarian', 3)} | "
                     f"{cell(best, 'nme_forward')} | {cell(best, 'nme_backward')} | {rounds(last)} / {rounds(best)} | {sub['seed'].nunique()} |")
    lines += yaw_tables(frame)
    return "\n".join(lines) + "\n"


def yaw_bins(frame: pd.DataFrame) -> list[str]:
    """The yaw bins the frame has NME for, in yaw order (the evaluator's bins first, any others after)."""
    found = {m.group(2) for m in (YAW_METRIC.match(str(x)) for x in frame["metric"].unique()) if m}
    known = [b for b in yaw_bin_labels() if b in found]
    return known + sorted(found - set(known))


def yaw_tables(frame: pd.DataFrame) -> list[str]:
    """Markdown lines: forward and backward NME per yaw bin of each row's last round (mean +- std
    over seeds); none when no run has yaw (e.g. MTFL, whose poses are classes, not angles)."""
    bins = yaw_bins(frame)
    if not bins:
        return []
    last = frame[frame["pick"] == LAST]
    out: list[str] = []
    for direction in ("forward", "backward"):
        out += ["", f"{direction.capitalize()} NME per yaw bin (degrees; test split, last round):", "",
                "| row | " + " | ".join(bins) + " |", "|---|" + "---|" * len(bins)]
        for row in ROWS:
            sub = last[last["row"] == row.label]
            if row.not_run:
                out.append(f"| {row.label} | " + " | ".join("" for _ in bins) + " |")
                continue
            out.append(f"| {row.label} | " + " | ".join(_mean_std(sub.loc[sub["metric"] == f"nme_{direction}_yaw{b}", "value"], 2) for b in bins) + " |")
    return out
