"""A category DDPM in pixel space (diffusers ``UNet2DModel`` + ``DDPMScheduler``)
seen as a hyperfeature extractor.

This is the backbone the pipeline can train itself on the unlabelled training
images of one category (Baranchuk et al., "Label-efficient semantic
segmentation with diffusion models"), so the whole project runs on a CPU
without downloading weights. Hyperfeatures are the outputs of the up-block
ResNets (``up{i}.res{j}``), read with forward hooks.

On-disk layout (diffusers style, loadable by plain diffusers too)::

    <dir>/unet/config.json + diffusion_pytorch_model.safetensors
    <dir>/scheduler/scheduler_config.json
    <dir>/uld_backbone.json     kind, image size, default layers, training data/run
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.backbones.base import DiffusionBackbone, feature_key, weights_hash
from pipeline.backbones.common import (
    atomic_dir,
    capture_up_resnets,
    check_images,
    check_layers,
    compute_dtype,
    image_noise,
    parse_layer,
    quiet_diffusers,
    run_until_captured,
    up_resnet_layers,
)
from pipeline.errors import BackboneError, ConfigError

META_FILE = "uld_backbone.json"
FORMAT_VERSION = 1

# The shipped architecture. Four resolution levels (S, S/2, S/4, S/8) with
# narrow high-resolution blocks, sized from two budgets measured on a 2-core
# CPU: (1) features: the default hyperfeatures are read at S/4 (32 channels)
# and S/2 (24 channels), so the default FeatureSpec (64 px, 2 timesteps) costs
# (32*16*16 + 24*32*32) * 2 timesteps * 2 bytes = 131,072 bytes per image in
# float16 (target <= ~150 KB); (2) speed: with the early exit after the last
# hooked layer a forward pass costs 0.28 GFLOP (0.46 GFLOP for the full UNet in
# training), which is what makes >= ~100 images/s extraction and ~1 s training
# steps (batch 32) possible on that CPU. Self-attention only at S/8, where it
# is cheap, to give the low-resolution features image-wide context.
DEFAULT_ARCH: dict[str, Any] = {
    "block_out_channels": (16, 24, 32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 32,
}
DEFAULT_LAYERS: tuple[str, ...] = ("up1.res1", "up2.res1")


def unet_arch(channels: Sequence[int], layers_per_block: int = 1) -> dict[str, Any]:
    """The shipped design at other widths: ``channels`` per resolution level (highest
    resolution first), self-attention only at the lowest level, GroupNorm of 8 groups."""
    ch = tuple(int(c) for c in channels)
    if len(ch) < 2 or any(c < 8 or c % 8 for c in ch):
        raise ConfigError(
            f"UNet widths {ch} are not usable",
            where="--channels",
            fix="give at least two widths, each a multiple of 8 (GroupNorm uses 8 groups), e.g. 16,32,64,128",
        )
    head_dim = int(DEFAULT_ARCH["attention_head_dim"])
    if ch[-1] < head_dim:
        # diffusers makes ch[-1] // head_dim attention heads at the lowest level: zero heads
        # would fail deep inside the model's first forward pass with a ZeroDivisionError.
        raise ConfigError(
            f"UNet widths {ch}: the last width ({ch[-1]}) carries the self-attention, whose heads are {head_dim} channels wide",
            where="--channels",
            fix=f"make the last width at least {head_dim}, e.g. {','.join(str(c) for c in ch[:-1] + (head_dim,))}",
        )
    n = len(ch)
    return {
        **DEFAULT_ARCH,
        "block_out_channels": ch,
        "layers_per_block": int(layers_per_block),
        "down_block_types": ("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        "up_block_types": ("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
    }


def _scheduler_identity(scheduler: Any) -> dict:
    cfg = scheduler.config
    return {
        k: cfg.get(k)
        for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
    }


class CategoryDDPM(DiffusionBackbone):
    """A pixel-space DDPM UNet whose up-block ResNet outputs are the features.

    Build a fresh one with :meth:`create` (to train it), or load one with
    :meth:`from_pretrained` (a directory written by :meth:`save_pretrained`, or
    any diffusers DDPM with ``unet/`` + ``scheduler/``).
    """

    kind = "ddpm"

    def __init__(
        self,
        unet: Any,
        scheduler: Any,
        meta: dict | None = None,
        name: str = "ddpm",
        device: str | torch.device = "cpu",
    ) -> None:
        from diffusers import DDPMScheduler, UNet2DModel

        if not isinstance(unet, UNet2DModel):
            raise BackboneError(f"CategoryDDPM needs a diffusers UNet2DModel, got {type(unet).__name__}")
        if not isinstance(scheduler, DDPMScheduler):
            # Any scheduler config with the same betas noises images identically.
            scheduler = DDPMScheduler.from_config(scheduler.config)
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.name = name
        meta = dict(meta or {})
        meta.setdefault("kind", self.kind)
        meta.setdefault("format_version", FORMAT_VERSION)
        sample_size = unet.config.sample_size
        meta.setdefault("image_size", int(sample_size if isinstance(sample_size, int) else sample_size[0]))
        if not meta.get("default_layers"):
            meta["default_layers"] = self._pick_default_layers()
        self.meta = meta
        self._device = torch.device("cpu")
        self.to(device)

    # construction ----------------------------------------------------------
    @classmethod
    def create(
        cls,
        image_size: int = 64,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        name: str = "ddpm",
        **arch: Any,
    ) -> "CategoryDDPM":
        """A randomly initialised DDPM (the shipped architecture unless ``arch`` overrides it)."""
        from diffusers import DDPMScheduler, UNet2DModel

        cfg = {**DEFAULT_ARCH, **arch}
        levels = len(cfg["block_out_channels"])
        if image_size % (2 ** (levels - 1)):
            raise ConfigError(
                f"image size {image_size} is not divisible by {2 ** (levels - 1)} ({levels} UNet levels)",
                where="--size",
                fix=f"use a multiple of {2 ** (levels - 1)}, e.g. 64",
            )
        unet = UNet2DModel(sample_size=image_size, in_channels=3, out_channels=3, **cfg)
        scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)
        return cls(unet, scheduler, meta={"image_size": image_size}, name=name)

    @classmethod
    def from_pretrained(
        cls, source: str | Path, device: str | torch.device = "cpu", name: str | None = None, **hub_kwargs: Any
    ) -> "CategoryDDPM":
        """Load from a local directory (our layout or a diffusers DDPM) or a hub id.

        Weights stored in float16 are loaded as float32: the CPU path computes in
        fp32 and CUDA uses autocast.
        """
        from diffusers import DDPMScheduler, UNet2DModel

        src = Path(source).expanduser()
        local = src.is_dir()
        if local:
            for sub in ("unet", "scheduler"):
                if not (src / sub).is_dir():
                    raise BackboneError(
                        f"{src} is not a DDPM backbone directory: no '{sub}/' folder",
                        where=str(src),
                        fix="point at a folder written by `uld backbone train` (unet/, scheduler/, uld_backbone.json)",
                    )
        elif Path(str(source)).is_absolute() or str(source).startswith((".", "~")):
            raise BackboneError(f"backbone folder {source} does not exist", where=str(source), fix="check the path")
        meta: dict = {}
        if local and (src / META_FILE).is_file():
            meta = json.loads((src / META_FILE).read_text())
            if meta.get("kind", cls.kind) != cls.kind:
                raise BackboneError(
                    f"{src} holds a {meta.get('kind')!r} backbone, not a DDPM",
                    where=str(src / META_FILE),
                    fix="load it with pipeline.backbones.load_backbone, which picks the right class",
                )
        try:
            with quiet_diffusers():
                unet = UNet2DModel.from_pretrained(
                    str(source), subfolder="unet", torch_dtype=torch.float32, low_cpu_mem_usage=False, **hub_kwargs
                )
                scheduler = DDPMScheduler.from_pretrained(str(source), subfolder="scheduler", **hub_kwargs)
        except (OSError, ValueError, EnvironmentError) as err:
            raise BackboneError(
                f"could not load the DDPM weights from {source}: {err}",
                where=str(source),
                fix="pass a local directory with unet/ and scheduler/ (e.g. one written by `uld backbone train`)",
            ) from err
        return cls(unet, scheduler, meta=meta, name=name or (src.name if local else str(source).replace("/", "--")), device=device)

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None, extra_meta: dict | None = None) -> Path:
        """Write ``unet/``, ``scheduler/`` and ``uld_backbone.json`` under ``path``.

        Each part is written to a temporary folder and renamed into place, and the
        metadata file (which loaders look for) is written last; other files in
        ``path`` (a model card, a loss curve, checkpoints) are left alone.
        ``dtype=torch.float16`` halves the size for shipping.
        """
        from storage.atomic import write_json

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        unet = self.unet
        if dtype is not None and dtype != next(unet.parameters()).dtype:
            import copy

            with quiet_diffusers():
                unet = copy.deepcopy(unet).to("cpu", dtype)
        with atomic_dir(path / "unet") as tmp, quiet_diffusers():
            unet.save_pretrained(tmp, safe_serialization=True)
        with atomic_dir(path / "scheduler") as tmp:
            self.scheduler.save_pretrained(tmp)
        meta = {**self.meta, **(extra_meta or {})}
        meta["weights_dtype"] = str(dtype or next(unet.parameters()).dtype).replace("torch.", "")
        self.meta = meta
        write_json(path / META_FILE, meta)
        return path

    def to(self, device: str | torch.device) -> "CategoryDDPM":
        self._device = torch.device(device)
        self.unet.to(self._device)
        return self

    # the contract ------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    def layer_names(self) -> list[str]:
        return up_resnet_layers(self.unet)

    def _pick_default_layers(self) -> list[str]:
        """The last ResNet of the up blocks at 1/4 and 1/2 input resolution."""
        n = len(self.unet.up_blocks)
        picks = []
        for level in (2, 1):  # S / 2**level
            i = n - 1 - level
            if 0 <= i < n:
                picks.append(f"up{i}.res{len(self.unet.up_blocks[i].resnets) - 1}")
        return picks or [self.layer_names()[-1]]

    def default_layers(self) -> list[str]:
        return list(self.meta["default_layers"])

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "unet_class": type(self.unet).__name__,
            "weights": weights_hash(self.unet),
            "n_parameters": sum(p.numel() for p in self.unet.parameters()),
            "scheduler": _scheduler_identity(self.scheduler),
            "trained_image_size": self.image_size,
        }

    def feature_shapes(self, image_size: int, layers: list[str]) -> dict[str, tuple[int, int, int]]:
        layers = check_layers(list(layers) or self.default_layers(), self.layer_names(), self.name)
        n = len(self.unet.up_blocks)
        factor = 2 ** (n - 1)
        if image_size % factor:
            raise ConfigError(
                f"image size {image_size} is not divisible by {factor}",
                where="FeatureSpec.image_size",
                fix=f"use a multiple of {factor}",
            )
        shapes = {}
        for name in layers:
            i, j = parse_layer(name)
            res = image_size // 2 ** (n - 1 - i)
            shapes[name] = (int(self.unet.up_blocks[i].resnets[j].out_channels), res, res)
        return shapes

    def extract(
        self,
        images: torch.Tensor,
        timesteps: list[int],
        layers: list[str],
        generator: torch.Generator | None = None,
        *,
        noise_seeds: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Noise the images to each timestep (same noise for every timestep),
        run the UNet once per timestep on the whole batch and return the hooked
        up-block ResNet outputs, keyed ``"{layer}@t{t}"``.

        Noise: ``noise_seeds`` (one per image, see
        :func:`pipeline.backbones.common.noise_seed_for`) makes an image's
        features independent of its batch; otherwise ``generator`` (CPU), else
        seed 0. Output: float32 on the CPU; on CUDA the autocast dtype
        (float16) on the GPU. The UNet stops right after the last requested
        layer, so the full-resolution tail is skipped for the default layers.
        """
        check_images(images, 3, "CategoryDDPM.extract(images)")
        layers = check_layers(list(layers) or self.default_layers(), self.layer_names(), self.name)
        T = int(self.scheduler.config.num_train_timesteps)
        bad = [t for t in timesteps if not 0 <= int(t) < T]
        if bad or not timesteps:
            raise ConfigError(
                f"timesteps must be a non-empty list in [0, {T}), got {list(timesteps)}",
                where="FeatureSpec.timesteps / --timesteps",
                fix="e.g. --timesteps 50,150",
            )
        self.feature_shapes(int(images.shape[-1]), layers)  # size check with a clear error
        B = images.shape[0]
        x0 = images.to(self.device, torch.float32)
        noise = image_noise(images.shape[1:], B, generator, noise_seeds).to(self.device)
        dtype = compute_dtype(self.device)
        out: dict[str, torch.Tensor] = {}
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=self.device.type == "cuda"):
            for t in timesteps:
                tt = torch.full((B,), int(t), dtype=torch.long, device=self.device)
                xt = self.scheduler.add_noise(x0, noise, tt)
                with capture_up_resnets(self.unet, layers) as cap:
                    run_until_captured(self.unet, xt, tt)
                for name in layers:
                    feat = cap[name]
                    out[feature_key(name, t)] = feat.float() if self.device.type == "cpu" else feat
        return out

    # extras ------------------------------------------------------------------
    @torch.inference_mode()
    def sample(self, n: int, steps: int = 100, seed: int = 0) -> torch.Tensor:
        """Draw ``n`` images (n, 3, S, S) in [-1, 1] with ancestral DDPM sampling
        on ``steps`` evenly spaced timesteps: a sanity check of what the model learnt."""
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        gen = torch.Generator().manual_seed(seed)
        S = self.image_size
        x = torch.randn((n, 3, S, S), generator=gen).to(self.device)
        for t in sched.timesteps:
            eps = self.unet(x, t.to(self.device).expand(n)).sample.float()
            x = sched.step(eps, t, x, generator=gen).prev_sample
        return x.clamp(-1, 1).cpu()
