"""A round's keypoint extraction in one process vs fanned out over a local Dask cluster.

Takes the trained heads of a finished D-ULD run (``--run``, a folder under
``<home>/runs``) and its feature store, and runs the round's step 1 (keypoints
and descriptors of every training image, ``flows.duld.train_keypoints``) twice:
in this process, and as ``keypoints-block`` tasks of a Prefect flow on a
``distributed.LocalCluster`` of ``--workers`` single-threaded processes (the
path ``uld train --dask-workers N`` takes). Reports the times (the cluster's
start separately) and whether the two keypoint sets are bit-identical.

    nice -n 10 python bench/bench_rounds_dask.py --home WS --run mtfl-duld-cnms1-top60-s0 --workers 2 --out bench/results/rounds_dask.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--run", required=True, help="a finished D-ULD run of that workspace")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    import torch
    from prefect import flow

    torch.set_num_threads(1)
    from flows.keypoints_dask import BATCHES_PER_BLOCK, dask_scheduler, fan_out_keypoints, round_task_runner
    from pipeline.heads.model import ULDHeads
    from pipeline.methods.duld import DULDConfig, extract_keypoints
    from storage.feature_loader import make_loader
    from storage.features import FeatureStore
    from storage.run_models import locate_run_model

    run = locate_run_model(a.home / "runs" / a.run)
    cfg = json.loads((run.run_dir / "config.json").read_text())
    config = DULDConfig.from_json(cfg["duld"])
    store = FeatureStore.open(run.store_path)
    model = ULDHeads.from_pretrained(run.model_dir)
    rows = store.indices("train")
    batch = 32  # the engine's evaluation batch (RunContext.eval_batch)
    rois = None
    if cfg.get("roi", True):  # keypoints inside each image's object box, as the run had them
        from flows.zeroshot import store_rois

        rois = np.zeros((len(store), 4), np.float32)
        rois[rows] = store_rois(a.home, cfg["dataset"], store, rows)

    t0 = time.perf_counter()
    one = extract_keypoints(model, make_loader(store, rows, batch_size=batch, shuffle=False), config, progress=False, rois=rois)
    single_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    with dask_scheduler(None, a.workers) as address:
        start_s = time.perf_counter() - t0

        @flow(name="bench-round-keypoints", **round_task_runner(address))
        def fanned():
            return fan_out_keypoints(store, model, rows, config, rois, batch)

        t1 = time.perf_counter()
        many = fanned()  # the first flow of this process also starts Prefect's temporary server; workers import torch
        first_s = time.perf_counter() - t1
        t1 = time.perf_counter()
        again = fanned()  # warm: what every later round of a run pays
        fan_s = time.perf_counter() - t1
    def identical(x, y) -> bool:
        return all(np.array_equal(getattr(x, f), getattr(y, f)) for f in ("rows", "xy", "score", "desc")) and (
            (x.peak is None and y.peak is None) or np.array_equal(x.peak, y.peak))

    same = identical(one, many) and identical(one, again)
    blocks = -(-len(rows) // (batch * BATCHES_PER_BLOCK))
    load = os.getloadavg()[0]
    lines = [
        "# A round's keypoint extraction: one process vs a local Dask cluster",
        "",
        f"`python bench/bench_rounds_dask.py --home WS --run {a.run} --workers {a.workers}`: the trained heads of `{a.run}` "
        f"({run.stage}-{run.round}), {len(rows)} training images of its store, batches of {batch}, {blocks} blocks of "
        f"{batch * BATCHES_PER_BLOCK} images. Machine: {os.cpu_count()}-core {platform.processor() or platform.machine()} CPU, "
        f"no GPU, shared with other jobs (load average {load:.1f} at the end).",
        "",
        "| run | time (s) |",
        "|---|---|",
        f"| 1 process (`extract_keypoints`) | {single_s:.1f} |",
        f"| LocalCluster start, {a.workers} workers | {start_s:.1f} |",
        f"| {a.workers} Dask workers, first round (`keypoints-block` tasks in a flow; includes Prefect's temporary server start and the workers' imports) | {first_s:.1f} |",
        f"| {a.workers} Dask workers, a later round (warm workers and server) | {fan_s:.1f} |",
        "",
        f"{len(one)} keypoints; bit-identical: **{same}**.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out is not None:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
