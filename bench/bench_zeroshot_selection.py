"""ZeroShot's cluster choice, measured on a validation part of the *train* split (never the test split).

For each number of candidate clusters M (M = K is the paper's plain K-means) and
each seed: fit ZeroShot on the train images outside the validation subset, predict
landmarks on both, fit the NME regressors on the former and score forward /
backward NME and per-landmark Hungarian accuracy on the validation subset.

    python bench/bench_zeroshot_selection.py --home WS --dataset synthetic --store STORE \\
        --candidates 10,20,40,60 --seeds 0,1,2 --out bench/results/zeroshot_selection.md

Prints one row per (M, min_presence, seed) and the mean +- std per setting.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def machine() -> str:
    """CPU model and core count, for the results table."""
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", required=True, type=Path)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--store", required=True, type=Path)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--candidates", default="10,20,40,60")
    ap.add_argument("--min-presence", default="0.8")
    ap.add_argument("--min-coherence", default="0", help="comma list: ZeroShot(min_coherence=...) values to compare")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-val", type=int, default=150, help="validation images taken from the train split")
    ap.add_argument("--roi", default="box", choices=["box", "foreground"], help="pixels sampled: the object box, or also the unsupervised foreground (uld zeroshot --roi)")
    ap.add_argument("--out", type=Path, default=None, help="append a Markdown section here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from flows.probe import ground_truth, validation_rows
    from flows.zeroshot import iter_batches, object_masks, store_rois
    from pipeline.datasets.crop import to_original
    from pipeline.evaluation import EvalData, evaluate_nme, hungarian_accuracy
    from pipeline.methods.zeroshot import ZeroShot
    from storage.features import FeatureStore

    store = FeatureStore.open(args.store)
    S = store.image_size
    val, fit = validation_rows(store, args.n_val, 0)
    parts = [
        (rows, ground_truth(args.home, args.dataset, store, rows), store_rois(args.home, args.dataset, store, rows), object_masks(store, rows, args.roi))
        for rows in (fit, val)
    ]
    rows_out = []
    presences = [float(v) for v in args.min_presence.split(",")]
    coherences = [float(v) for v in args.min_coherence.split(",")]
    for m, pres, coh in itertools.product((int(v) for v in args.candidates.split(",")), presences, coherences):
        if m == args.k and (pres, coh) != (presences[0], coherences[0]):
            continue  # presence and coherence play no part without candidates
        for seed in (int(v) for v in args.seeds.split(",")):
            t0 = time.perf_counter()
            model = ZeroShot(n_clusters=args.k, crop_size=S, seed=seed, n_candidates=m, min_presence=pres, min_coherence=coh, use_gpu=False)
            model.fit(iter_batches(store, fit, 32), parts[0][2], progress=False, masks=parts[0][3])
            data = []
            for rows, gt, rois, masks in parts:
                lms = model.predict(iter_batches(store, rows, 32), rois, progress=False, masks=masks)
                coords = to_original(lms.coords, gt["boxes"], S)
                data.append(EvalData.from_pixels(coords, lms.present, gt["landmarks"], gt["norm"], gt["boxes"], yaw=gt["yaw"], image_ids=gt["ids"]))
            rep = evaluate_nme(data[0], data[1], n_regressor_images=300, repeats=5, seed=seed)
            hung = hungarian_accuracy(data[0], data[1], 0.2)
            row = {"candidates": m, "min_presence": pres if m > args.k else float("nan"),
                   "min_coherence": coh if m > args.k else float("nan"), "seed": seed,
                   "nme_forward": rep.forward.mean, "nme_backward": rep.backward.mean, "hungarian": hung.mean,
                   "seconds": time.perf_counter() - t0}
            print(row, flush=True)
            rows_out.append(row)
    df = pd.DataFrame(rows_out)
    agg = df.groupby(["candidates", "min_presence", "min_coherence"], dropna=False).agg(
        n=("seed", "size"),
        fwd=("nme_forward", "mean"), fwd_sd=("nme_forward", "std"),
        bwd=("nme_backward", "mean"), bwd_sd=("nme_backward", "std"),
        hung=("hungarian", "mean"), hung_sd=("hungarian", "std"),
    ).reset_index()
    lines = [
        f"\n## {args.dataset}: store {args.store.name}, K = {args.k}, RoI {args.roi}, {len(val)} validation / {len(fit)} fit images of the train split",
        f"\nMachine: {machine()}, {torch.get_num_threads()} torch thread; seeds {args.seeds} (mean +- std).\n",
        "| candidates M | min presence | min coherence | seeds | forward NME | backward NME | Hungarian acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in agg.itertuples():
        label = f"{r.candidates}" + (" (paper: K-means)" if r.candidates == args.k else "")
        pres = "" if np.isnan(r.min_presence) else f"{r.min_presence:g}"
        coh = "" if np.isnan(r.min_coherence) else f"{r.min_coherence:g}"
        lines.append(f"| {label} | {pres} | {coh} | {r.n} | {r.fwd:.2f} +- {r.fwd_sd:.2f} | {r.bwd:.2f} +- {r.bwd_sd:.2f} | {r.hung:.3f} +- {r.hung_sd:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
