"""Pack a dataset split's crops into one uint8 ``.npy`` file for a machine without the images.

    python bench/pack_crops.py --home WS --dataset mtfl --split train --n 4000 --out gpu/crops.npy

The GPU check (``bench/gpu_check.py``) trains the backbone on a machine that has
neither the dataset folder nor the project's workspace; what travels there is
this array (N, S, S, 3): the same crops ``uld backbone train`` would read (crop
rule of :func:`pipeline.datasets.crop.load_crops`), a seeded subset of ``--n``
images so that it fits a transfer limit (4,000 x 64 px = 49 MB). The images
are research data: keep the file out of the repository (an ignored folder).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline.datasets.base import Manifest
from pipeline.datasets.crop import load_crops
from storage.layout import Workspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True, help="workspace holding manifests/<dataset>/<split>.parquet")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--n", type=int, default=4000, help="seeded subset of this many images (0 = all)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--crop-margin", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    path = Workspace(args.home).manifest(args.dataset, args.split)
    if not path.is_file():
        raise SystemExit(f"no manifest {path}: run `uld --home {args.home} datasets manifest {args.dataset} --root ...` first")
    manifest = Manifest.load(path)
    n = len(manifest)
    idx = np.arange(n)
    if 0 < args.n < n:
        idx = np.sort(np.random.default_rng(args.seed).choice(n, size=args.n, replace=False))
    images, _ = load_crops(manifest, args.size, args.crop_margin, indices=idx)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, images)
    print(f"wrote {args.out}: {images.shape} uint8, {images.nbytes / 2**20:.1f} MiB ({len(idx)} of {n} {args.split} images)")


if __name__ == "__main__":
    main()
