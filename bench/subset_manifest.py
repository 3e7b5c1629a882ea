"""Copy a dataset's manifests into another workspace, keeping a seeded subset of one split.

    python bench/subset_manifest.py --src WS --dst WS2 --dataset mtfl --split train --n 2000

For CPU benchmarks that cannot afford every training image (the regressors of
the protocol use 300); the test split is copied whole unless it is the one
subset. The subset is a seeded choice, kept in manifest order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline.datasets.base import Manifest
from storage.layout import Workspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--dst", type=Path, required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src, dst = Workspace(args.src), Workspace(args.dst)
    for split in ("train", "test"):
        m = Manifest.load(src.manifest(args.dataset, split))
        if split == args.split and args.n < len(m):
            idx = np.sort(np.random.default_rng(args.seed).choice(len(m), args.n, replace=False))
            m = Manifest(m.frame.iloc[idx].reset_index(drop=True), m.meta)
        m.save(dst.manifest(args.dataset, split))
        print(f"{args.dataset}/{split}: {len(m)} images -> {dst.manifest(args.dataset, split)}")


if __name__ == "__main__":
    main()
