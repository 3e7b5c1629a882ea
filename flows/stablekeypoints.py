"""StableKeypoints (seed 002) as a Prefect flow: crops -> optimise tokens -> select K -> predict -> evaluate.

::

    stablekeypoints (flow)
      load-crops      train + test crops from the manifests (flows.condgen's task: the features flow's crop rule)
      load-unet       the frozen text-conditioned UNet (Stable Diffusion, a context-DDPM, or a DDPM grown into one)
      train           optimise the N tokens, checkpoints every ``checkpoint_every`` steps (resumable)
      select          K of the N tokens on the train crops -> selection.json
      predict         K landmarks on both splits -> keypoints.parquet
      evaluate        flows.results.evaluate_keypoints -> metrics.parquet, errors.parquet
      contact-sheet   figures/stablekeypoints-test-landmarks.png

Run folder ``runs/<run_id>/`` as for Jakab / C3 (:mod:`flows.condgen`):
``config.json``, ``train-log.parquet``, ``checkpoints/step-NNNNNN/``
(``tokens.safetensors``: the tokens and Adam's moments, ``state.json`` written
last), ``selection.json``, ``keypoints.parquet``, ``metrics.parquet``,
``errors.parquet``, ``figures/``, and ``resources.json`` (peak RSS, times).
Every step draws its batch, warps, noise and token chunk from ``(seed, step)``,
so a resumed run ends with the same tokens as an uninterrupted one.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.condgen import CropSet, fit_with_checkpoints, load_crops_task, resolve_run
from pipeline.errors import ConfigError, StoreError
from pipeline.methods.stablekeypoints import ConditionedUNet, StableKeypoints, StableKeypointsConfig
from storage.atomic import atomic_path, write_json
from storage import step_checkpoints
from storage.layout import Workspace
from storage.locks import claim, releases_claims

METHOD = "stablekeypoints"
STAGE = "train"
STATE_NAME = step_checkpoints.STATE_NAME
TOKENS_NAME = "tokens.safetensors"
_RESUME_KEYS = ("method", "dataset", "stablekeypoints", "backbone_identity", "size", "crop_margin")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


# ----------------------------------------------------------------- checkpoints (no Prefect)
def checkpoint_root(home: Path, run_id: str) -> Path:
    return Workspace(home).run_dir(run_id) / "checkpoints"


def save_checkpoint(root: Path, est: StableKeypoints) -> Path:
    """``step-NNNNNN/``: tokens + Adam tensors (safetensors, nothing pickled), then ``state.json`` last
    (storage.step_checkpoints)."""
    from safetensors.torch import save_file

    from pipeline.backbones.training import optimizer_state_to_flat

    path = step_checkpoints.begin(root, est.step_)
    state = est.state_dict()
    opt_tensors, opt_meta = optimizer_state_to_flat(state["optimizer"])
    with atomic_path(path / TOKENS_NAME) as tmp:
        save_file({"tokens": state["tokens"].contiguous(), **opt_tensors}, str(tmp))
    return step_checkpoints.finish(path, {"step": int(est.step_), "optimizer": opt_meta, "method": METHOD})


def last_checkpoint(root: Path) -> Path | None:
    """The finished checkpoint with the most steps, or None."""
    return step_checkpoints.last(root)


def load_checkpoint(path: Path, est: StableKeypoints) -> StableKeypoints:
    from safetensors.torch import load_file

    from pipeline.backbones.training import optimizer_state_from_flat

    meta = step_checkpoints.read_state(path)
    tensors = load_file(str(path / TOKENS_NAME))
    return est.load_state_dict({"tokens": tensors["tokens"], "optimizer": optimizer_state_from_flat(tensors, meta["optimizer"]),
                                "step": meta["step"]})


# ----------------------------------------------------------------- tasks
@task(name="load-unet", cache_policy=NO_CACHE, persist_result=False)
def load_unet_task(backbone: str, home: Path, device: str) -> ConditionedUNet:
    from pipeline.methods.stablekeypoints import load_conditioned_unet

    return load_conditioned_unet(backbone, device=device, home=home)


@task(name="train", cache_policy=NO_CACHE, persist_result=False)
def train_task(home: Path, run_id: str, est: StableKeypoints, crops: CropSet, checkpoint_every: int,
               stop_after: int | None, progress: bool) -> StableKeypoints:
    """Optimise the tokens on the training crops from ``est.step_``, with checkpoints (flows.condgen.fit_with_checkpoints)."""
    return fit_with_checkpoints(home, run_id, est, crops.images[crops.indices("train")], save_checkpoint,
                                checkpoint_every, stop_after, progress, METHOD)


@task(name="select", cache_policy=NO_CACHE, persist_result=False)
def select_task(home: Path, run_id: str, dataset: str, est: StableKeypoints, crops: CropSet) -> np.ndarray:
    rows = crops.indices("train")
    selected = est.select(crops.images[rows], object_boxes(home, dataset, crops, rows, est.config.roi))
    write_json(Workspace(home).run_file(run_id, "selection.json"), {"tokens": [int(t) for t in selected], "n_tokens": est.config.n_tokens,
                                                                    "images": int(min(len(rows), est.config.select_images))})
    print(f"{METHOD}: selected tokens {list(map(int, selected))} of {est.config.n_tokens}")
    return selected


@task(name="predict", cache_policy=NO_CACHE, persist_result=False)
def predict_task(home: Path, run_id: str, dataset: str, est: StableKeypoints, crops: CropSet, progress: bool = True) -> None:
    from flows.results import write_keypoints

    for split in ("train", "test"):
        rows = crops.indices(split)
        rois = object_boxes(home, dataset, crops, rows, est.config.roi)
        write_keypoints(home, run_id, METHOD, STAGE, 0, crops, rows,
                        est.predict(crops.images[rows], rows, progress=f"{METHOD} predict {split}" if progress else None, rois=rois))


def object_boxes(home: Path, dataset: str, crops: CropSet, rows: np.ndarray, roi: bool) -> np.ndarray | None:
    """The object boxes of ``rows`` in crop pixels (the RoI rule of every other method), or None without ``roi``."""
    from flows.zeroshot import store_rois

    return store_rois(home, dataset, crops, rows) if roi else None


@task(name="evaluate", cache_policy=NO_CACHE, persist_result=False)
def evaluate_task(home: Path, run_id: str, dataset: str, seed: int, evaluation: dict) -> pd.DataFrame:
    from flows.results import evaluate_keypoints

    return evaluate_keypoints(home, run_id, dataset, METHOD, STAGE, 0, seed=seed, plot=True, **evaluation)


@task(name="contact-sheet", cache_policy=NO_CACHE, persist_result=False)
def contact_sheet_task(home: Path, run_id: str, dataset: str, size: int, crop_margin: float) -> Path:
    from flows.figures import landmark_sheet

    return landmark_sheet(home, run_id, dataset, size, crop_margin, Workspace(home).figures_dir(run_id) / f"{METHOD}-test-landmarks.png",
                          title="StableKeypoints: landmarks on test crops", stage=STAGE, round_=0)


# ----------------------------------------------------------------- the flow
@flow(name="stablekeypoints", validate_parameters=False, log_prints=True)
@releases_claims
def stablekeypoints(
    dataset: str,
    config: StableKeypointsConfig,
    home: str | Path = "workspace",
    size: int = 64,
    crop_margin: float = 0.15,
    run_id: str | None = None,
    resume: bool = False,
    checkpoint_every: int = 50,
    stop_after: int | None = None,
    progress: bool = True,
    threads: int | None = None,
    device: str = "cpu",
    evaluation: dict | None = None,
) -> pd.DataFrame:
    """Optimise StableKeypoints tokens against ``config.backbone`` on ``dataset``'s crops, predict both splits, evaluate.

    ``config.backbone``: a Stable Diffusion folder, a context-DDPM folder
    (:mod:`pipeline.backbones.context_ddpm`) or a DDPM folder (cross-attention grown on it,
    :func:`pipeline.methods.stablekeypoints.model.grown_from_ddpm`). ``stop_after``: stop training at
    that step without predicting (an interrupted run; ``resume=True``
    continues it). Returns the metric rows (``attrs["run_id"]``); empty when stopped early.
    """
    from flows.results import write_run_config
    from pipeline.settings import resolve_device

    home = Path(home)
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    if checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every must be >= 0, got {checkpoint_every}", where="--param checkpoint_every")
    if not config.backbone:
        raise ConfigError("StableKeypoints needs a text-conditioned UNet", where="--backbone",
                          fix="pass a Stable Diffusion, context-DDPM or DDPM folder (e.g. --backbone shipped)")
    config.validate()
    t_start = time.perf_counter()
    unet = load_unet_task(config.backbone, home, resolve_device(device))
    run_cfg = {"method": METHOD, "dataset": dataset, "stablekeypoints": config.to_json(), "backbone_identity": unet.identity,
               "size": int(size), "crop_margin": float(crop_margin), **({"evaluation": dict(evaluation)} if evaluation else {})}
    run_id, resuming = resolve_run(home, METHOD, run_id, resume, run_cfg, keys=_RESUME_KEYS)
    claim(Workspace(home).run_dir(run_id), "run")
    crops = load_crops_task(home, dataset, size, crop_margin, progress)
    run_cfg.update(n_train=int(len(crops.indices("train"))), n_test=int(len(crops.indices("test"))))
    write_run_config(home, run_id, run_cfg)
    est = StableKeypoints(unet, config)
    ckpt = last_checkpoint(checkpoint_root(home, run_id)) if resuming else None
    if ckpt is not None:
        load_checkpoint(ckpt, est)
        print(f"resuming run {run_id} at step {est.step_} of {config.steps}")
    else:
        print(f"run {run_id}: {METHOD} ({unet.kind}), {run_cfg['n_train']} train / {run_cfg['n_test']} test crops of {size} px, "
              f"{config.n_tokens} tokens, K = {config.k}")
    t0 = time.perf_counter()
    train_task(home, run_id, est, crops, checkpoint_every, stop_after, progress)
    train_s = time.perf_counter() - t0
    rows = pd.DataFrame()
    if est.step_ >= config.steps:
        select_task(home, run_id, dataset, est, crops)
        predict_task(home, run_id, dataset, est, crops, progress)
        rows = evaluate_task(home, run_id, dataset, config.seed, dict(evaluation or {}))
        sheet = contact_sheet_task(home, run_id, dataset, size, crop_margin)
        write_json(Workspace(home).run_file(run_id, "resources.json"),
                   {"peak_rss_mb": round(peak_rss_mb(), 1), "train_seconds_this_call": round(train_s, 1),
                    "total_seconds_this_call": round(time.perf_counter() - t_start, 1), "threads": torch.get_num_threads()})
        print(f"{METHOD} run {run_id} finished in {time.perf_counter() - t_start:.0f} s (peak RSS {peak_rss_mb():.0f} MiB); "
              f"landmarks on test crops: {sheet}")
    rows.attrs["run_id"] = run_id
    return rows
