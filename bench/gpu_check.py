"""One short GPU session: continue the face backbone and check the CUDA paths, in one command.

    python bench/pack_crops.py --home WS --dataset mtfl --n 4000 --out gpu/crops.npy     # here, once
    python bench/gpu_check.py --crops gpu/crops.npy --backbone pipeline/assets/ddpm-mtfl-64 \\
        --minutes 6 --batch-size 128 --out OUT                                            # on the GPU machine

What it does, in order, each part timed and written to ``OUT/gpu_check.json``:

1. **Backbone training** (``pipeline.backbones.training.train_ddpm``, the code
   ``uld backbone train`` runs): continue ``--backbone`` on the packed crops
   with bf16 autocast (``precision="auto"``: bf16 on a CUDA GPU that has it)
   for ``--steps`` or until ``--minutes`` are spent, resumable from
   ``OUT/checkpoints``; records steps/s, images/s and the loss; exports the EMA
   weights (float16) to ``OUT/backbone`` and a ``loss.png``.
2. **fp16 extraction**: hyperfeatures of 64 crops on the GPU (fp16 autocast,
   ``CategoryDDPM.extract``) against the CPU's fp32 ones, per feature key the
   largest error relative to the feature's scale; then GPU extraction
   throughput (images/s) at batch 256.
3. **GPU FAISS**: k-means with ``use_gpu=True`` against the CPU one on the
   same descriptors (objective and time), when the FAISS build has GPUs;
   otherwise recorded as not available.

The D-ULD heads train on the CPU in this version (``uld train`` says so), so
there is no bf16 heads check here. Everything imported is ``pipeline``, not
``flows``: the GPU machine needs torch, numpy, safetensors and diffusers
(carry a diffusers wheel where it is missing), not Prefect or Zarr. Run it on
the CPU first (``--device cpu --steps 5 --minutes 1``): the same code path,
smaller.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.backbones.ddpm import CategoryDDPM
from pipeline.backbones.defaults import default_timesteps
from pipeline.backbones.training import TrainConfig, autocast_dtype, plot_losses, train_ddpm, weights_fingerprint


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
                            "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported(),
                    cuda=torch.version.cuda)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_part(args: argparse.Namespace, crops: np.ndarray, device: torch.device) -> dict[str, Any]:
    model = CategoryDDPM.from_pretrained(args.backbone, device="cpu")
    init = weights_fingerprint(model.unet)
    model = model.to(device)
    deadline = time.perf_counter() + 60.0 * args.minutes
    losses: list[float] = []

    class OutOfTime(Exception):
        pass

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        if time.perf_counter() > deadline:
            raise OutOfTime

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, init_weights=init,
                      checkpoint_every=args.checkpoint_every, precision="auto")
    t0 = time.perf_counter()
    try:
        result = train_ddpm(model, crops, cfg, checkpoint_dir=args.out / "checkpoints", progress=not args.no_progress, on_step=on_step,
                            segment_meta={"device": str(device), "machine": device_info(device).get("gpu", "cpu")})
        extra: dict[str, Any] = {"segments": result.segments, "resumed_from": result.resumed_from}
    except OutOfTime:
        # --minutes ran out: train_ddpm keeps the EMA weights in model.unet, so they are exported
        # all the same; the checkpoints (every --checkpoint-every steps) resume the run.
        extra = {"note": "stopped by --minutes; re-run the same command to continue from OUT/checkpoints"}
    sync(device)
    wall = time.perf_counter() - t0
    n = len(losses)
    out: dict[str, Any] = {"steps_target": args.steps, "steps_this_call": n, "batch_size": args.batch_size, "wall_seconds": round(wall, 1),
                           "precision": "bf16" if autocast_dtype("auto", device) is not None else "fp32",
                           "steps_per_second": round(n / max(wall, 1e-9), 2), "images_per_second": round(n * args.batch_size / max(wall, 1e-9), 1),
                           "loss_mean_last_100": round(float(np.mean(losses[-100:])), 5) if losses else None, **extra}
    model.to("cpu").save_pretrained(args.out / "backbone", dtype=torch.float16, extra_meta={"gpu_check": {k: v for k, v in out.items() if k != "segments"}})
    if losses:
        plot_losses(losses, args.out / "loss.png", f"{Path(args.backbone).name} continued on {device}: {n} steps")
    return out


def extraction_part(args: argparse.Namespace, crops: np.ndarray, device: torch.device) -> dict[str, Any]:
    model = CategoryDDPM.from_pretrained(args.backbone, device="cpu")
    layers, timesteps = model.default_layers(), list(default_timesteps(args.backbone))
    x = torch.from_numpy(crops[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    seeds = list(range(len(x)))
    ref = model.extract(x, timesteps, layers, noise_seeds=seeds)
    out: dict[str, Any] = {"layers": layers, "timesteps": timesteps}
    if device.type != "cuda":
        out["note"] = "no CUDA device: only the CPU reference ran"
        return out
    gpu = model.to(device)
    got = gpu.extract(x, timesteps, layers, noise_seeds=seeds)
    errors = {}
    for key, r in ref.items():
        g = got[key].float().cpu()
        errors[key] = {"dtype": str(got[key].dtype).replace("torch.", ""),
                       "max_abs_error_over_std": round(float((g - r).abs().max() / r.std().clamp_min(1e-12)), 4),
                       "mean_abs_error_over_std": round(float((g - r).abs().mean() / r.std().clamp_min(1e-12)), 5)}
    out["fp16_vs_fp32"] = errors
    big = torch.from_numpy(np.resize(crops, (256, *crops.shape[1:]))).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    gpu.extract(big[:32], timesteps, layers, noise_seeds=list(range(32)))  # warm-up
    sync(device)
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        gpu.extract(big, timesteps, layers, noise_seeds=list(range(256)))
    sync(device)
    out["gpu_images_per_second_batch256"] = round(reps * 256 / (time.perf_counter() - t0), 1)
    return out


def faiss_part(seed: int = 0) -> dict[str, Any]:
    try:
        import faiss
    except ImportError:
        return {"available": False, "note": "faiss is not installed on this machine"}
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n_gpus < 1:
        return {"available": False, "note": f"this FAISS build sees no GPU (faiss {getattr(faiss, '__version__', '?')})"}
    from pipeline.clustering import FaissKMeans

    x = np.random.default_rng(seed).normal(size=(200_000, 64)).astype(np.float32)
    res: dict[str, Any] = {"available": True, "gpus": n_gpus, "n": len(x), "dim": 64, "k": 100}
    for name, use_gpu in (("cpu", False), ("gpu", True)):
        t0 = time.perf_counter()
        km = FaissKMeans(n_clusters=100, n_init=1, max_iter=20, seed=seed, use_gpu=use_gpu).fit(x)
        res[name] = {"seconds": round(time.perf_counter() - t0, 2), "inertia": float(km.inertia_)}
    res["inertia_ratio_gpu_over_cpu"] = round(res["gpu"]["inertia"] / res["cpu"]["inertia"], 4)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crops", type=Path, required=True, help="uint8 (N, S, S, 3) .npy from bench/pack_crops.py")
    ap.add_argument("--backbone", default="pipeline/assets/ddpm-mtfl-64", help="the DDPM folder to continue")
    ap.add_argument("--steps", type=int, default=20000, help="total steps of this continuation (resumes up to it)")
    ap.add_argument("--minutes", type=float, default=6.0, help="stop training after this long (the checkpoints resume)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    args.out.mkdir(parents=True, exist_ok=True)
    crops = np.load(args.crops)
    if crops.dtype != np.uint8 or crops.ndim != 4:
        raise SystemExit(f"{args.crops}: expected uint8 (N, S, S, 3) crops, got {crops.dtype} {crops.shape}")
    report: dict[str, Any] = {"machine": device_info(device), "crops": list(crops.shape), "backbone": Path(args.backbone).name}
    path = args.out / "gpu_check.json"

    def save() -> None:
        path.write_text(json.dumps(report, indent=2) + "\n")

    for name, part in (("train", None if args.skip_train else lambda: train_part(args, crops, device)),
                       ("extraction", lambda: extraction_part(args, crops, device)),
                       ("faiss", faiss_part)):
        if part is None:
            continue
        t0 = time.perf_counter()
        try:
            report[name] = part()
        except Exception as exc:  # a failed part must not lose the others' figures
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        report[name]["part_seconds"] = round(time.perf_counter() - t0, 1)
        save()
        print(f"{name}: {json.dumps(report[name])[:400]}", flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
