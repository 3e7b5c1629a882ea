"""Jakab et al. (seed 003) and C3 (seed 004) as Prefect flows: crops -> train -> predict -> evaluate.

::

    condgen (flow, named after the method)
      load-crops      train + test crops from the manifests (the features flow's crop rule)
      train           the estimator, with periodic checkpoints (resumable)
      predict         K landmarks on both splits -> keypoints.parquet
      evaluate        flows.results.evaluate_keypoints -> metrics.parquet, errors.parquet
      contact-sheet   figures/<method>-test-landmarks.png

Unlike ZeroShot / D-ULD these methods read images, not the feature store: the
crops are made from the manifests by :func:`pipeline.datasets.crop.load_crops`,
the same square box, margin and padding rule (``CROP_RULE``) that
``uld features`` uses, so keypoints and crop boxes mean the same as for every
other method.

Run folder ``runs/<run_id>/``: ``config.json``, ``train-log.parquet`` (losses
per step), ``checkpoints/step-NNNNNN/`` (``model.safetensors``,
``optimizer.pt``, ``state.json`` written last: a folder without it is
unfinished and ignored; older finished checkpoints are removed once a newer
one is complete), ``keypoints.parquet``, ``metrics.parquet``, ``errors.parquet``,
``figures/``. ``resume=True`` continues from the last finished checkpoint; as
every step seeds its own batch and warps (:func:`pipeline.methods.condgen.estimators.step_generator`)
the resumed run gives the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline.errors import ConfigError, StoreError
from pipeline.methods.condgen import CondGenConfig, CondGenLandmarks, make_estimator
from storage.atomic import atomic_path
from storage import step_checkpoints
from storage.layout import Workspace
from storage.locks import claim, releases_claims

STAGE = "train"
STATE_NAME = step_checkpoints.STATE_NAME
WEIGHTS_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
# Settings that must match for --resume to continue a run.
_RESUME_KEYS = ("method", "dataset", "condgen", "size", "crop_margin")


@dataclass(frozen=True)
class CropSet:
    """Crops of one dataset's train + test images, with what ``write_keypoints`` reads from a store."""

    images: np.ndarray  # (N, S, S, 3) uint8
    image_ids: np.ndarray  # (N,) str
    splits: np.ndarray  # (N,) str
    crop_boxes: np.ndarray  # (N, 4) original pixels
    image_size: int

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)


# ----------------------------------------------------------------- checkpoints (no Prefect)
def checkpoint_root(home: Path, run_id: str) -> Path:
    return Workspace(home).run_dir(run_id) / "checkpoints"


def save_checkpoint(root: Path, est: CondGenLandmarks) -> Path:
    """``step-NNNNNN/``: weights (safetensors), Adam state, then ``state.json`` last (storage.step_checkpoints)."""
    from safetensors.torch import save_file

    path = step_checkpoints.begin(root, est.step_)
    state = est.state_dict()
    with atomic_path(path / WEIGHTS_NAME) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state["net"].items()}, str(tmp))
    with atomic_path(path / OPTIMIZER_NAME) as tmp:
        torch.save(state["optimizer"], tmp)
    return step_checkpoints.finish(path, {"step": int(est.step_), "image_size": int(est.image_size_), "method": est.method})


def last_checkpoint(root: Path) -> Path | None:
    """The finished checkpoint with the most steps, or None."""
    return step_checkpoints.last(root)


def load_checkpoint(path: Path, est: CondGenLandmarks) -> CondGenLandmarks:
    from safetensors.torch import load_file

    meta = step_checkpoints.read_state(path)
    return est.load_state_dict({
        "net": load_file(str(path / WEIGHTS_NAME)),
        "optimizer": torch.load(path / OPTIMIZER_NAME, weights_only=True),
        "step": meta["step"], "image_size": meta["image_size"],
    })


def append_train_log(home: Path, run_id: str, records: list[dict]) -> None:
    """Losses per step into ``train-log.parquet``; a resumed run replaces rows of steps it re-ran."""
    if not records:
        return
    path = Workspace(home).run_file(run_id, "train-log.parquet")
    new = pd.DataFrame(records)
    if path.exists():
        old = pd.read_parquet(path)
        new = pd.concat([old[~old["step"].isin(new["step"])], new], ignore_index=True).sort_values("step")
    with atomic_path(path) as tmp:
        new.to_parquet(tmp, index=False)


# ----------------------------------------------------------------- tasks
@task(name="load-crops", cache_policy=NO_CACHE, persist_result=False)
def load_crops_task(home: Path, dataset: str, size: int, crop_margin: float, progress: bool = True) -> CropSet:
    """Train then test crops of ``dataset`` (the store's row order), cropped like ``uld features``."""
    from flows.datasets import load_manifest
    from pipeline.datasets.crop import load_crops

    parts = []
    for split in ("train", "test"):
        manifest = load_manifest(home, dataset, split)
        images, boxes = load_crops(manifest, size, crop_margin, progress=progress)
        parts.append((images, np.asarray(manifest.image_ids).astype(str), np.full(len(images), split), boxes))
    images, ids, splits, boxes = (np.concatenate(x) for x in zip(*parts))
    if not (splits == "train").any() or not (splits == "test").any():
        raise ConfigError(f"dataset {dataset!r} needs train and test images", where="manifests", fix="rebuild the manifests (`uld datasets manifest`)")
    return CropSet(images, ids, splits, boxes.astype(np.float32), int(size))


def fit_with_checkpoints(home: Path, run_id: str, est: Any, images: np.ndarray, save: Callable[[Path, Any], Path],
                         checkpoint_every: int, stop_after: int | None, progress: bool, label: str) -> Any:
    """``est.fit(images)`` from ``est.step_`` with a checkpoint (``save(root, est)``) every
    ``checkpoint_every`` steps and at the end; the train log is appended before each checkpoint,
    so a checkpoint never points past the log. Shared by every image-trained method."""
    root = checkpoint_root(home, run_id)
    start, logged = est.step_, len(est.history_)

    def on_checkpoint(e: Any) -> None:
        nonlocal logged
        append_train_log(home, run_id, e.history_[logged:])
        logged = len(e.history_)
        save(root, e)

    t0 = time.perf_counter()
    est.fit(images, stop_after=stop_after, checkpoint_every=checkpoint_every, on_checkpoint=on_checkpoint, progress=progress)
    if est.step_ > start:
        print(f"{label}: steps {start}..{est.step_} in {time.perf_counter() - t0:.0f} s, last loss {est.history_[-1]['loss']:.4f}")
    return est


@task(name="train", cache_policy=NO_CACHE, persist_result=False)
def train_task(home: Path, run_id: str, est: CondGenLandmarks, crops: CropSet, checkpoint_every: int,
               stop_after: int | None, progress: bool) -> CondGenLandmarks:
    """Fit on the training crops from ``est.step_``; a checkpoint every ``checkpoint_every`` steps and at the end."""
    return fit_with_checkpoints(home, run_id, est, crops.images[crops.indices("train")], save_checkpoint,
                                checkpoint_every, stop_after, progress, est.method)


@task(name="predict", cache_policy=NO_CACHE, persist_result=False)
def predict_task(home: Path, run_id: str, est: CondGenLandmarks, crops: CropSet) -> None:
    """K landmarks of every train and test crop -> keypoints.parquet (original pixels + crop boxes)."""
    from flows.results import write_keypoints

    for split in ("train", "test"):
        rows = crops.indices(split)
        write_keypoints(home, run_id, est.method, STAGE, 0, crops, rows, est.predict(crops.images[rows]))


@task(name="evaluate", cache_policy=NO_CACHE, persist_result=False)
def evaluate_task(home: Path, run_id: str, dataset: str, method: str, seed: int, evaluation: dict) -> pd.DataFrame:
    from flows.results import evaluate_keypoints

    return evaluate_keypoints(home, run_id, dataset, method, STAGE, 0, seed=seed, plot=True, **evaluation)


@task(name="contact-sheet", cache_policy=NO_CACHE, persist_result=False)
def contact_sheet_task(home: Path, run_id: str, dataset: str, method: str, size: int, crop_margin: float) -> Path:
    from flows.figures import landmark_sheet

    title = {"jakab": "Jakab et al.", "c3": "C3"}.get(method, method)
    return landmark_sheet(home, run_id, dataset, size, crop_margin, Workspace(home).figures_dir(run_id) / f"{method}-test-landmarks.png",
                          title=f"{title}: landmarks on test crops", stage=STAGE, round_=0)


# ----------------------------------------------------------------- the flow
def resolve_run(home: Path, method: str, run_id: str | None, resume: bool, config: dict,
                keys: tuple[str, ...] = _RESUME_KEYS) -> tuple[str, bool]:
    """Pick the run id; refuse to overwrite a run or to resume one whose ``keys`` settings differ."""
    from flows.results import new_run_id, read_run_config

    ws = Workspace(home)
    if run_id is None:
        if resume:
            raise ConfigError("--resume needs the --run-id of the run to continue", where="--resume", fix="pass --run-id <id> (see `ls <home>/runs`)")
        return new_run_id(method), False
    cfg_path = ws.run_file(run_id, "config.json")
    if not cfg_path.exists():
        if resume:
            raise ConfigError(f"no run {run_id!r} to resume", where=str(ws.run_dir(run_id)),
                              fix="drop --resume to start a new run with this id, or give the --run-id of an existing run")
        return run_id, False
    if not resume:
        raise ConfigError(f"run {run_id!r} already exists", where=str(ws.run_dir(run_id)), fix="pass --resume to continue it, or choose a new --run-id")
    old = read_run_config(home, run_id)
    diff = [k for k in keys if json.loads(json.dumps(old.get(k), default=str)) != json.loads(json.dumps(config.get(k), default=str))]
    if diff:
        raise ConfigError(f"run {run_id!r} was made with different settings ({', '.join(diff)}); it cannot be resumed with these",
                          where=str(cfg_path), fix="resume with the run's original options (see its config.json) or start a new run")
    return run_id, True


@flow(name="condgen", validate_parameters=False, log_prints=True)
@releases_claims
def condgen(
    method: str,
    dataset: str,
    config: CondGenConfig = CondGenConfig(),
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
    """Train ``method`` (``jakab`` | ``c3``) on ``dataset``'s crops, predict both splits, evaluate.

    ``config``: the estimator's settings (``CondGenConfig``; its seed seeds
    everything). ``stop_after``: stop training at that step without predicting
    (an interrupted run, for tests; ``resume=True`` continues it).
    ``threads``: torch CPU threads (None = leave as is). ``evaluation``:
    settings for ``flows.results.evaluate_keypoints``. Returns the metric rows
    (``attrs["run_id"]`` holds the run id); empty when stopped early.
    """
    from flows.results import write_run_config
    from pipeline.settings import resolve_device

    home = Path(home)
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    if checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every must be >= 0, got {checkpoint_every}", where="--checkpoint-every")
    est = make_estimator(method, config, device=resolve_device(device))
    run_cfg = {"method": method, "dataset": dataset, "condgen": config.to_json(), "size": int(size), "crop_margin": float(crop_margin),
               **({"evaluation": dict(evaluation)} if evaluation else {})}
    run_id, resuming = resolve_run(home, method, run_id, resume, run_cfg)
    claim(Workspace(home).run_dir(run_id), "run")
    crops = load_crops_task(home, dataset, size, crop_margin, progress)
    run_cfg.update(n_train=int(len(crops.indices("train"))), n_test=int(len(crops.indices("test"))))
    write_run_config(home, run_id, run_cfg)
    ckpt = last_checkpoint(checkpoint_root(home, run_id)) if resuming else None
    if ckpt is not None:
        load_checkpoint(ckpt, est)
        print(f"resuming run {run_id} at step {est.step_} of {config.steps}")
    else:
        print(f"run {run_id}: {method}, {run_cfg['n_train']} train / {run_cfg['n_test']} test crops of {size} px, K = {config.k}")
    t0 = time.perf_counter()
    train_task(home, run_id, est, crops, checkpoint_every, stop_after, progress)
    rows = pd.DataFrame()
    if est.step_ >= config.steps:
        predict_task(home, run_id, est, crops)
        rows = evaluate_task(home, run_id, dataset, method, config.seed, dict(evaluation or {}))
        sheet = contact_sheet_task(home, run_id, dataset, method, size, crop_margin)
        print(f"{method} run {run_id} finished in {time.perf_counter() - t0:.0f} s; landmarks on test crops: {sheet}")
    rows.attrs["run_id"] = run_id
    return rows
