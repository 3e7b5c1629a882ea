"""The backbone stage: train a category DDPM on a dataset's training crops.

``train_backbone`` is a Prefect flow: load the train manifest, crop the images
(the same square crop the features stage uses), train with
:func:`pipeline.backbones.training.train_ddpm` (resumable: checkpoints under
``<home>/backbones/<name>/checkpoints/``), then ``save_pretrained`` the EMA
weights to ``<home>/backbones/<name>/`` (and optionally a copy to ``out``, e.g.
to ship it) with a loss-curve PNG and the training record in
``uld_backbone.json``. Re-running a finished run only re-exports it.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.datasets.crop import DEFAULT_CROP_MARGIN
from pipeline.errors import ConfigError
from storage.layout import Workspace

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def default_name(dataset: str, image_size: int) -> str:
    """Workspace name of a backbone trained by this flow, e.g. ``ddpm-synthetic-64``."""
    return f"ddpm-{dataset}-{image_size}"


def machine_description() -> str:
    """A one-line description of where training ran (for the model card)."""
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    model = platform.processor() or platform.machine()
    try:  # Linux: the real CPU model name
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


@task(name="load-training-crops", cache_policy=NO_CACHE)
def load_training_crops(home: Path, dataset: str, image_size: int, margin: float, limit: int | None) -> np.ndarray:
    """uint8 (N, S, S, 3) crops of the train split (the first ``limit`` images when set)."""
    from flows.datasets import load_manifest
    from pipeline.datasets.crop import load_crops

    manifest = load_manifest(home, dataset, "train")
    indices = None if limit is None else np.arange(min(int(limit), len(manifest)))
    crops, _boxes = load_crops(manifest, image_size, margin, indices=indices)
    get_run_logger().info("%s/train: %d crops at %d px (margin %.2f)", dataset, len(crops), image_size, margin)
    return crops


def load_init_model(spec: str, home: Path, image_size: int, channels: tuple[int, ...] | None):
    """The DDPM or context-DDPM a warm-started run continues (fp32), checked against the run's settings."""
    from pipeline.backbones.context_ddpm import ContextDDPM, load_context_ddpm
    from pipeline.backbones.ddpm import CategoryDDPM
    from pipeline.backbones.loading import load_backbone

    model = load_context_ddpm(spec, home)
    if model is None:
        model = load_backbone(spec, home=home)
    if not isinstance(model, (CategoryDDPM, ContextDDPM)):
        raise ConfigError(
            f"--init-from {spec!r} is a {model.kind!r} backbone; only a DDPM or a context-DDPM can be trained further",
            where="--init-from",
            fix="pass a folder written by `uld backbone train` (or `shipped`)",
        )
    if model.image_size != image_size:
        raise ConfigError(
            f"--init-from {spec!r} was trained at {model.image_size} px, not {image_size}",
            where="--size",
            fix=f"use --size {model.image_size}",
        )
    have = tuple(int(c) for c in (model.unet.net if isinstance(model, ContextDDPM) else model.unet).config.block_out_channels)
    if channels is not None and tuple(channels) != have:
        raise ConfigError(
            f"--channels {','.join(map(str, channels))} differs from the initial model's {','.join(map(str, have))}",
            where="--channels",
            fix="leave --channels out: a warm start keeps the initial model's architecture",
        )
    return model


@task(name="train-ddpm", cache_policy=NO_CACHE)
def fit_ddpm(model, crops: np.ndarray, config, checkpoint_dir: Path, segment_meta: dict | None = None):
    from pipeline.backbones.training import train_ddpm

    return train_ddpm(model, crops, config, checkpoint_dir=checkpoint_dir, progress=True, segment_meta=segment_meta)


@flow(name="train-backbone", flow_run_name="train-backbone-{dataset}")
def train_backbone(
    dataset: str,
    home: Path = Path("workspace"),
    steps: int = 3000,
    batch_size: int = 32,
    image_size: int = 64,
    margin: float = DEFAULT_CROP_MARGIN,
    lr: float = 5e-4,
    seed: int = 0,
    name: str | None = None,
    out: Path | None = None,
    save_dtype: str = "float32",
    checkpoint_every: int = 250,
    limit: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
    channels: tuple[int, ...] | None = None,
    flip: bool = False,
    init_from: str | None = None,
    kind: str = "ddpm",
    context_tokens: int = 4,
    precision: str = "auto",
) -> dict:
    """Train (or resume, or re-export) a DDPM backbone on ``dataset``; returns a summary dict.

    ``init_from`` (a backbone spec: a folder, ``shipped``, a workspace backbone
    name) continues training from that model's exported weights with a fresh
    optimiser, for when its resumable checkpoints are gone (only the exported
    EMA weights travel with a shipped backbone). The architecture is the
    initial model's; ``steps`` counts the steps of this run only.

    ``kind="context-ddpm"`` trains a pixel ``UNet2DConditionModel`` whose
    cross-attention reads ``context_tokens`` learned constant tokens
    (:mod:`pipeline.backbones.context_ddpm`: the CPU model StableKeypoints
    optimises its tokens against), with the same trainer, checkpoints and export.
    """
    import torch

    from pipeline.backbones.ddpm import CategoryDDPM, unet_arch
    from pipeline.backbones.loading import backbone_name
    from pipeline.backbones.training import TrainConfig, list_checkpoints, plot_losses, weights_fingerprint

    log = get_run_logger()
    if save_dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {save_dtype!r}", where="--save-dtype", fix="use float32 or float16")
    if threads:
        torch.set_num_threads(int(threads))
    ws = Workspace(Path(home))
    name = name or default_name(dataset, image_size)
    target = ws.backbone_dir(name)
    ckpt_dir = target / "checkpoints"
    init = None
    if kind not in ("ddpm", "context-ddpm"):
        raise ConfigError(f"unknown backbone kind {kind!r}", where="--kind", fix="use ddpm or context-ddpm")
    if init_from is not None:
        model = load_init_model(init_from, Path(home), image_size, channels).to(device)
        source_meta = model.meta
        transfer = None
        if model.kind == "context-ddpm" and kind != "context-ddpm":
            raise ConfigError(f"--init-from {init_from!r} is a context-DDPM; it continues only as one", where="--kind",
                              fix="add --kind context-ddpm")
        if kind == "context-ddpm" and model.kind == "ddpm":
            # A context-DDPM grown from the DDPM's convolutions (ContextDDPM.from_ddpm): the
            # cross-attention is new, the features already know the category.
            from pipeline.backbones.context_ddpm import ContextDDPM

            model, transfer = ContextDDPM.from_ddpm(model, n_context=context_tokens, seed=seed, name=name)
            model = model.to(device)
        else:
            # The feature spec carries over (re-probe to change it); method settings measured on the
            # starting model's category do not describe the new training data.
            model.meta.pop("method_defaults", None)
        model.name = name
        init = {
            "backbone": backbone_name(init_from),  # the folder's name, never a machine path
            "weights": weights_fingerprint(model.unet),
            "steps": (source_meta.get("training") or {}).get("steps"),
            "train_wall_seconds_total": (source_meta.get("training") or {}).get("train_wall_seconds_total"),
            **({} if transfer is None else {"kind": "ddpm -> context-ddpm", "transfer": transfer}),
        }
    config = TrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=checkpoint_every, flip=flip,
        init_weights=None if init is None else init["weights"], precision=precision,
    )
    config.validate()

    crops = load_training_crops(Path(home), dataset, image_size, margin, limit)
    torch.manual_seed(seed)  # the UNet's random init
    if kind == "context-ddpm" and init is None:
        from pipeline.backbones.context_ddpm import ContextDDPM

        model = ContextDDPM.create(image_size=image_size, channels=channels or (32, 64), n_context=context_tokens, seed=seed,
                                   name=name).to(device)
    elif init is None:
        arch = {} if channels is None else unet_arch(channels)
        model = CategoryDDPM.create(image_size=image_size, name=name, **arch).to(device)
    had = list_checkpoints(ckpt_dir)
    if had:
        log.info("resuming from %s", had[-1][1])
    t0 = time.perf_counter()
    segment = {"device": str(device), "threads": threads, "machine": machine_description(), "torch": torch.__version__,
               "init_from": None if init is None else init["backbone"]}
    result = fit_ddpm(model, crops, config, ckpt_dir, segment_meta=segment)
    wall = time.perf_counter() - t0

    record_path = target / "training_record.json"
    training = {
        "dataset": dataset,
        "split": "train",
        "n_images": int(len(crops)),
        "image_size": image_size,
        "crop_margin": margin,
        "steps": result.steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "ema_decay": config.ema_decay,
        "flip": config.flip,
        "kind": kind,
        **({"context_tokens": int(context_tokens)} if kind == "context-ddpm" else {}),
        "final_loss_mean_last_100": round(result.final_loss(100), 5),
        **({} if init is None else {"init_from": init}),
        # None when the run was resumed from checkpoints that predate time tracking
        "train_wall_seconds_total": None if result.total_wall_seconds is None else round(result.total_wall_seconds, 1),
        "machine": machine_description(),
        "torch": torch.__version__,
        # Every call that trained this backbone (a resumed run has several): step range,
        # target steps, device, machine; the top-level fields are the last call's.
        "segments": result.segments,
    }
    from storage.atomic import write_json

    write_json(record_path, training)
    extra = {"training": training, "training_data": {"dataset": dataset, "split": "train", "n_images": int(len(crops)), "data_fingerprint": result.config["data_fingerprint"]}}
    model.save_pretrained(target, dtype=getattr(torch, _DTYPES[save_dtype]), extra_meta=extra)
    plot_losses(result.losses, target / "loss.png", f"DDPM {name}: {len(crops)} images, {result.steps} steps")
    summary = {"name": name, "dir": str(target), **training, "wall_seconds_this_run": round(wall, 1)}
    if out is not None:
        out = Path(out)
        model.save_pretrained(out, dtype=getattr(torch, _DTYPES[save_dtype]), extra_meta=extra)
        plot_losses(result.losses, out / "loss.png", f"DDPM {name}: {len(crops)} images, {result.steps} steps")
        summary["out"] = str(out)
    log.info("backbone %s: %d steps, final loss %.4f -> %s", name, result.steps, result.final_loss(100), target)
    return summary
