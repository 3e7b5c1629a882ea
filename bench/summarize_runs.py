"""Markdown table of runs' headline test metrics (mean +- spread over the runs of a group).

    python bench/summarize_runs.py --home WS --group "ZeroShot, box=mtfl-zs-box-s0,mtfl-zs-box-s1" ...

Each ``--group LABEL=RUN[,RUN...]`` becomes one row per (stage, round) of those
runs; several runs (seeds) give mean and standard deviation. Reads only the
runs' metrics.parquet (through flows.results.metrics_table's source table).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = {
    "nme_forward": "forward NME",
    "nme_backward": "backward NME",
    "acc0.2_hungarian": "Hungarian acc@0.2",
    "fallback_fraction": "fallback share",
}


def run_rows(home: Path, run_id: str) -> pd.DataFrame:
    m = pd.read_parquet(home / "runs" / run_id / "metrics.parquet")
    m = m[(m.split == "test") & (m.repeat == -1) & m.metric.isin(list(COLUMNS))]
    return m.pivot_table(index=["stage", "round"], columns="metric", values="value", aggfunc="last").reset_index()


def fmt(values: np.ndarray, digits: int) -> str:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--group", action="append", required=True, help="LABEL=RUN[,RUN...]")
    ap.add_argument("--last-round-only", action="store_true", help="one row per group: its last (stage, round)")
    args = ap.parse_args()
    lines = ["| method | stage | round | runs | " + " | ".join(COLUMNS.values()) + " |", "|---" * (4 + len(COLUMNS)) + "|"]
    for group in args.group:
        label, runs = group.split("=", 1)
        frames = []
        for rid in runs.split(","):
            path = args.home / "runs" / rid / "metrics.parquet"
            if not path.is_file():
                print(f"(skipped {rid}: no metrics)")
                continue
            frames.append(run_rows(args.home, rid).assign(run=rid))
        if not frames:
            continue
        df = pd.concat(frames)
        keys = sorted(set(zip(df["stage"], df["round"])), key=lambda k: (k[1], k[0]))
        if args.last_round_only:
            keys = keys[-1:]
        for stage, rnd in keys:
            sub = df[(df["stage"] == stage) & (df["round"] == rnd)]
            cells = [fmt(sub[c].to_numpy(np.float64), 3 if c.startswith(("acc", "fallback")) else 2) if c in sub else "" for c in COLUMNS]
            lines.append(f"| {label} | {stage} | {rnd} | {len(sub)} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
