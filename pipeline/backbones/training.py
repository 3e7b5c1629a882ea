"""Training a category DDPM on unlabelled crops (no Prefect, no workspace layout).

Standard DDPM objective (Ho et al. 2020): draw t ~ U{0..T-1} and eps ~ N(0, I),
noise the image with the scheduler, regress eps with an MSE. AdamW with a
linear warm-up then a constant learning rate (constant, so a finished run can
be *extended* with more steps and stay identical to a longer run), gradient
clipping, and an exponential moving average (EMA) of the weights, which is what
gets saved and used for features (EMA weights give smoother, better samples and
steadier features than the raw iterate).

Resumable: every ``checkpoint_every`` steps the trainable weights, the EMA
weights, the optimizer tensors and the state of the one random generator that
drives batches, timesteps and noise (safetensors), plus the step, the loss
history and the optimizer's hyper-parameters (JSON) are written atomically to
``checkpoint_dir/step-XXXXXXX/``. A run that was killed continues from the
newest complete checkpoint and, on the CPU, ends bit for bit where an
uninterrupted run would.

Nothing in a checkpoint is unpickled: a checkpoint folder is a file anyone with
write access to the workspace could plant, and ``torch.load`` of a pickle runs
arbitrary code. Checkpoints of older versions (``state.pt``) are still read,
with ``weights_only=True`` (tensors and plain containers only).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.backbones.common import atomic_dir
from pipeline.errors import ConfigError, DatasetError

_CKPT = re.compile(r"^step-(\d{7})$")
STATE_JSON = "state.json"  # step, losses, settings, optimizer hyper-parameters
STATE_TENSORS = "state.safetensors"  # optimizer tensors + generator state
LEGACY_STATE = "state.pt"  # checkpoints written before the pickle-free format


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def autocast_dtype(precision: str, device: "torch.device") -> "torch.dtype | None":
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32); see TrainConfig.precision."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the training trajectory (except ``steps``, which may grow)."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    # Random horizontal flips: OFF by default. A flip-augmented DDPM learns a
    # mirror-symmetric image distribution, so it can no longer tell a face from
    # its mirror image and its features for the subject's left and right eye
    # (mouth corner, ear) become mirror copies of each other; the landmark
    # methods downstream need those to differ. The training sets here (a few
    # thousand crops of one category) are large enough for a small UNet without
    # the extra data. Turn it on only for categories whose landmarks are
    # symmetric-agnostic.
    flip: bool = False
    # Fingerprint of the weights the run started from (``weights_fingerprint``)
    # when it continues an exported backbone instead of a random init; part of
    # the trajectory, so a checkpoint of a warm-started run never resumes a
    # run with another start (or none).
    init_weights: str | None = None
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    # Autocast precision of the forward pass: "auto" = bf16 where the hardware computes it
    # natively (CUDA with bf16; CPUs with AVX512-BF16 or AMX-BF16: 1.6x the fp32 step rate of
    # the 2.7 M UNet here, bench/results/train_speed.md), fp32 elsewhere (CPUs without them
    # emulate bf16 15-35x slower). Not part of the trajectory: a run may continue on another
    # machine; each training segment records the precision it used.
    precision: str = "auto"

    def trajectory(self) -> dict:
        """The fields a resumed run must share with the run that wrote the checkpoint."""
        d = asdict(self)
        for k in ("steps", "checkpoint_every", "keep_checkpoints", "precision"):
            d.pop(k)
        return d

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, "steps must be >= 1", "--steps"),
            (self.batch_size >= 1, "batch size must be >= 1", "--batch-size"),
            (self.lr > 0, "learning rate must be > 0", "--lr"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}", "--precision"),
            (0.0 <= self.ema_decay < 1.0, "EMA decay must be in [0, 1)", "ema_decay"),
            (self.checkpoint_every >= 1, "checkpoint interval must be >= 1", "--checkpoint-every"),
            (self.keep_checkpoints >= 1, "keep at least one checkpoint", "keep_checkpoints"),
            (self.warmup_steps >= 0, "warm-up steps must be >= 0", "warmup_steps"),
        ]
        for ok, what, where in checks:
            if not ok:
                raise ConfigError(what, where=where, fix="see `uld backbone train --help`")


@dataclass
class TrainResult:
    """What a training run did. ``losses[k]`` is the loss of step ``k + 1``."""

    losses: list[float]
    steps: int
    resumed_from: int | None
    wall_seconds: float  # of this call only
    config: dict = field(default_factory=dict)
    # Training time summed over this call and every interrupted call before it
    # (carried in the checkpoints); None when an older checkpoint did not record it.
    total_wall_seconds: float | None = None
    # One entry per call that trained this trajectory, oldest first (carried in the
    # checkpoints): step range, the settings that may change between calls (target
    # steps, checkpoint interval) and the caller's ``segment_meta`` (device, machine).
    # A checkpoint from before segments were recorded gives one entry with unknown settings.
    segments: list[dict] = field(default_factory=list)

    def final_loss(self, window: int = 100) -> float:
        """Mean loss over the last ``window`` steps (single-step losses are very noisy)."""
        tail = self.losses[-window:]
        return float(np.mean(tail)) if tail else math.nan


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's parameters and buffers (names, dtypes, shapes and values)."""
    h = hashlib.blake2b(digest_size=8)
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def crops_fingerprint(crops: np.ndarray) -> str:
    """A hash of the training images, so a resumed run refuses different data."""
    h = hashlib.sha256()
    h.update(str(crops.shape).encode())
    h.update(np.ascontiguousarray(crops).tobytes())
    return h.hexdigest()[:16]


def _to_model_input(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [-1, 1]."""
    return batch_u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def _ema_decay_at(step: int, cfg: TrainConfig) -> float:
    # Short warm-up of the EMA (as in common DDPM code bases): early on the
    # average follows the fast-changing weights instead of the random init.
    return min(cfg.ema_decay, (1.0 + step) / (10.0 + step))


def list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (incomplete ones are temporary folders)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for p in checkpoint_dir.iterdir():
        m = _CKPT.match(p.name)
        has_state = (p / STATE_JSON).is_file() and (p / STATE_TENSORS).is_file() or (p / LEGACY_STATE).is_file()
        if m and has_state and (p / "model.safetensors").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _save_checkpoint(
    checkpoint_dir: Path, step: int, net: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
    gen: torch.Generator, losses: list[float], cfg: TrainConfig, fingerprint: str, arch: dict,
    wall_seconds: float | None = None, segments: list[dict] | None = None,
) -> Path:
    from safetensors.torch import save_file

    def flat(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}

    target = Path(checkpoint_dir) / f"step-{step:07d}"
    opt_tensors, opt_meta = optimizer_state_to_flat(opt.state_dict())
    with atomic_dir(target) as tmp:
        save_file(flat(net), str(tmp / "model.safetensors"))
        save_file(flat(ema), str(tmp / "ema.safetensors"))
        save_file({**opt_tensors, "generator": gen.get_state()}, str(tmp / STATE_TENSORS))
        meta = {
            "step": step,
            "optimizer": opt_meta,
            "losses": [float(v) for v in losses],
            "trajectory": cfg.trajectory(),
            "data": fingerprint,
            "arch": arch,
            "wall_seconds": wall_seconds,
            "segments": list(segments or []),
        }
        (tmp / STATE_JSON).write_text(json.dumps(meta))
    for _, old in list_checkpoints(checkpoint_dir)[: -cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def optimizer_state_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer ``state_dict`` into tensors (for safetensors) and JSON.

    Tensor entries of the per-parameter state become ``opt.<param>.<name>``;
    every other value (hyper-parameters, python scalars) goes to the JSON part.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    meta = {"param_groups": state["param_groups"], "scalars": scalars, "params": [str(k) for k in state["state"]]}
    return tensors, meta


def optimizer_state_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`optimizer_state_to_flat`."""
    state: dict[int, dict] = {int(pid): dict(meta["scalars"].get(pid, {})) for pid in meta["params"]}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state[int(pid)][name] = value
    groups = [{**g, **({"betas": tuple(g["betas"])} if "betas" in g else {})} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def read_checkpoint_state(path: Path) -> dict:
    """The non-weight state of a checkpoint folder, without unpickling anything.

    Returns a dict with ``step, optimizer (a state_dict), generator, losses,
    trajectory, data, arch, wall_seconds``.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if (path / STATE_JSON).is_file():
        meta = json.loads((path / STATE_JSON).read_text())
        tensors = load_file(str(path / STATE_TENSORS))
        return {**meta, "optimizer": optimizer_state_from_flat(tensors, meta["optimizer"]), "generator": tensors["generator"]}
    try:  # an older checkpoint: tensors and plain containers only, never arbitrary objects
        return torch.load(path / LEGACY_STATE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - the unpickler refuses anything but plain data
        raise ConfigError(
            f"refusing to load the checkpoint state {path / LEGACY_STATE}: {type(err).__name__}: {str(err).splitlines()[0][:200]}",
            where=str(path),
            fix="the file is not a checkpoint this project wrote (it may hold code); delete that checkpoint folder",
        ) from None


def _arch(unet: torch.nn.Module) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet.config).items() if not k.startswith("_")}


def train_ddpm(
    model: "CategoryDDPM",  # noqa: F821 - imported lazily to keep this module light
    crops: np.ndarray,
    config: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    segment_meta: dict | None = None,
) -> TrainResult:
    """Train ``model`` (a :class:`~pipeline.backbones.ddpm.CategoryDDPM`) in place.

    ``crops``: uint8 (N, S, S, 3) with S the model's image size. On return
    ``model.unet`` holds the EMA weights (what features and samples should
    use). With ``checkpoint_dir`` the run is resumable: calling again with the
    same arguments continues from the newest checkpoint; a checkpoint written
    with other data or another trajectory-relevant setting raises
    :class:`ConfigError` instead of silently mixing two runs.
    ``on_step(step, loss)`` is called after every step (tests use it to
    simulate a crash). ``segment_meta`` (JSON-able) is recorded with this call's
    entry in ``TrainResult.segments`` (and in the checkpoints, so a later resume
    reports every call's settings, not only its own).
    """
    from safetensors.torch import load_file

    config.validate()
    crops = np.asarray(crops)
    S = model.image_size
    if crops.ndim != 4 or crops.shape[1:] != (S, S, 3) or crops.dtype != np.uint8:
        raise DatasetError(
            f"training crops must be uint8 (N, {S}, {S}, 3), got {crops.dtype} {crops.shape}",
            where="train_ddpm(crops)",
            fix=f"load crops at the model's image size ({S}) with pipeline.datasets.crop.load_crops",
        )
    if len(crops) < 1:
        raise DatasetError("no training images", where="train_ddpm(crops)", fix="check the dataset's train split")

    device = model.device
    fingerprint = crops_fingerprint(crops)
    arch = _arch(model.unet)
    data = torch.from_numpy(np.ascontiguousarray(crops))  # stays uint8 on the CPU; batches move
    ema = model.unet  # the backbone's UNet becomes the EMA copy
    net = copy.deepcopy(ema).train().requires_grad_(True)
    ema.eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(int(config.seed))
    scheduler = model.scheduler
    T = int(scheduler.config.num_train_timesteps)
    losses: list[float] = []
    step = 0
    resumed_from = None
    wall_before: float | None = 0.0
    earlier: list[dict] = []  # the segments of the calls before this one

    if checkpoint_dir is not None:
        ckpts = list_checkpoints(Path(checkpoint_dir))
        if ckpts:
            last_step, path = ckpts[-1]
            state = read_checkpoint_state(path)
            problems = []
            if state["data"] != fingerprint:
                problems.append("the training images differ")
            # A field added after a checkpoint was written reads as its default (None).
            diff = {k: (state["trajectory"].get(k), v) for k, v in config.trajectory().items() if state["trajectory"].get(k) != v}
            if diff:
                problems.append(f"settings differ (checkpoint, now): {diff}")
            if state["arch"] != arch:
                problems.append("the UNet architecture differs")
            if last_step > config.steps:
                problems.append(f"it is at step {last_step}, beyond the requested {config.steps} steps")
            if problems:
                raise ConfigError(
                    f"cannot resume from the checkpoint in {path}: " + "; ".join(problems),
                    where=str(checkpoint_dir),
                    fix="train into a new --name/--out, or delete that checkpoint folder to start over",
                )
            net.load_state_dict(load_file(str(path / "model.safetensors")))
            ema.load_state_dict(load_file(str(path / "ema.safetensors")))
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            losses = list(state["losses"])
            step = resumed_from = int(state["step"])
            wall_before = state.get("wall_seconds")
            earlier = list(state.get("segments") or [{"from_step": 0, "to_step": step, "settings": "not recorded (older checkpoint)"}])
            # The checkpoint's last segment ended at its step (a crash after it is lost work).
            if earlier and earlier[-1].get("to_step", step) != step:
                earlier[-1] = {**earlier[-1], "to_step": step}
    net.to(device)
    ema.to(device)

    # bf16 autocast where the hardware has it (TrainConfig.precision); fp16 would need a
    # gradient scaler, and the UNet is small enough that fp32 is cheap elsewhere.
    amp_dtype = autocast_dtype(config.precision, device)
    use_amp = amp_dtype is not None
    t0 = time.perf_counter()
    first = step

    def segments_now() -> list[dict]:
        this = {"from_step": first, "to_step": step, "steps_target": int(config.steps), "checkpoint_every": int(config.checkpoint_every),
                "batch_size": int(config.batch_size), "lr": float(config.lr), "wall_seconds": round(time.perf_counter() - t0, 1),
                "precision": "fp32" if amp_dtype is None else "bf16",
                **(segment_meta or {})}
        # A call that trained nothing (re-export of a finished run) adds no segment.
        return earlier if (earlier and step == first) else [*earlier, this]

    bar = tqdm(total=config.steps, initial=step, desc="train ddpm", unit="step", disable=not progress, mininterval=2.0)
    while step < config.steps:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, config)
        # All randomness comes from `gen` (CPU) in a fixed order, so the
        # generator state in a checkpoint pins down the rest of the run.
        idx = torch.randint(0, len(data), (config.batch_size,), generator=gen)
        x0 = _to_model_input(data[idx])
        if config.flip:
            flip = torch.rand(config.batch_size, generator=gen) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, T, (config.batch_size,), generator=gen)
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        xt = scheduler.add_noise(x0, noise, t)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            pred = net(xt, t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        opt.step()
        with torch.no_grad():
            d = _ema_decay_at(step, config)
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1.0 - d)
            for be, bn in zip(ema.buffers(), net.buffers()):
                be.copy_(bn)
        step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ConfigError(
                f"training diverged at step {step} (loss {value})",
                where="train_ddpm",
                fix="lower --lr (e.g. by 2-4x) and start a new run",
            )
        losses.append(value)
        bar.update(1)
        if step % 50 == 0 or step == config.steps:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if checkpoint_dir is not None and (step % config.checkpoint_every == 0 or step == config.steps):
            total = None if wall_before is None else wall_before + time.perf_counter() - t0
            _save_checkpoint(Path(checkpoint_dir), step, net, ema, opt, gen, losses, config, fingerprint, arch, total, segments_now())
        if on_step is not None:
            on_step(step, value)
    bar.close()
    del net, opt
    wall = time.perf_counter() - t0
    return TrainResult(
        losses=losses,
        steps=step,
        resumed_from=resumed_from,
        wall_seconds=wall,
        config={**asdict(config), "n_images": int(len(crops)), "data_fingerprint": fingerprint},
        total_wall_seconds=None if wall_before is None else wall_before + wall,
        segments=segments_now(),
    )


def plot_losses(losses: list[float], path: Path, title: str) -> Path:
    """Raw per-step loss and a 50-step moving average, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(losses, dtype=np.float64)
    x = np.arange(1, len(y) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(x, y, lw=0.5, alpha=0.35, label="loss per step")
    w = min(50, len(y))
    if w >= 2:
        ma = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(x[w - 1 :], ma, lw=1.5, label=f"{w}-step mean")
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    from storage.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
