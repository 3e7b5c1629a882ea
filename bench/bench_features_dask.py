"""Feature extraction in one process vs fanned out over a local Dask cluster (``uld features --dask-workers``).

Runs ``uld features`` on the same synthetic images twice, each in a fresh
process and its own workspace: once plainly, once with ``--dask-workers N``;
reports wall time, the command's own "time:" line, and whether the two stores
are bit-identical. Also prints the bytes per image of the shipped backbone's
default spec (what the README's Scaling arithmetic uses).

    nice -n 10 python bench/bench_features_dask.py --images 256 --workers 2 --out bench/results/features_dask.md
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _uld(home: Path, *args: str) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", "--home", str(home), *args],
                         capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"uld {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return wall, out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    from pipeline.datasets.registry import get_loader
    from pipeline.datasets.synthetic import generate_synthetic
    from storage.features import FeatureStore
    from storage.layout import Workspace

    base = Path(tempfile.mkdtemp(prefix="bench-dask-"))
    n_test = a.images // 4
    root = generate_synthetic(base / "synthetic", a.images - n_test, n_test, 128, 0)
    rows, stores = [], {}
    for label, extra in (("1 process", []), (f"{a.workers} Dask workers (LocalCluster)", ["--dask-workers", str(a.workers)])):
        home = base / label.split()[0]
        ws = Workspace(home)
        for split in ("train", "test"):
            get_loader("synthetic").load(root, split)[0].save(ws.manifest("synthetic", split))
        wall, out = _uld(home, "features", "--dataset", "synthetic", "--backbone", "shipped", "--shard-size", str(a.shard_size), *extra)
        inner = float(re.search(r"time:\s+([\d.]+) s", out).group(1))
        store_path = Path(re.search(r"store:\s+(\S+)", out).group(1))
        bpi = re.search(r"bytes/image: (.*)", out).group(1)
        stores[label] = FeatureStore.open(store_path)
        rows.append((label, wall, inner, bpi))
    ref, other = stores.values()
    ra, rb = ref.read(0, len(ref)), other.read(0, len(other))
    same = all(np.array_equal(ra[k].view(np.uint16), rb[k].view(np.uint16)) for k in ref.keys)
    load = os.getloadavg()
    lines = [
        "# Feature extraction: one process vs a local Dask cluster",
        "",
        f"`{' '.join(['python', *sys.argv])}`: {a.images} synthetic images, shipped DDPM, default spec, shard size {a.shard_size}, "
        f"each `uld features` a fresh process with Prefect's temporary server. Machine: 2-core CPU shared with other jobs, no GPU; "
        f"load average at the end {load[0]:.1f}.",
        "",
        "| run | wall (s) | `uld features` time line (s) | bytes / image |",
        "|---|---|---|---|",
        *[f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[3]} |" for r in rows],
        "",
        f"Stores bit-identical: **{same}** (keys {', '.join(f'{k} {ref.shapes[k]}' for k in ref.keys)}).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
