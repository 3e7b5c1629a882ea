"""A small pixel-space text-conditioned UNet for CPUs: a DDPM whose cross-attention reads a learned constant context.

StableKeypoints (seed 002) needs a UNet with cross-attention to optimise
tokens against; Stable Diffusion is far too large for a CPU. This model is a
``diffusers.UNet2DConditionModel`` on pixels (no VAE) trained with the plain
DDPM objective (Ho et al. 2020: regress the noise with an MSE) on the same
unlabelled crops the other backbones use. Its ``encoder_hidden_states`` is a
learned constant ``context`` of a few tokens (there is no text), trained with
the UNet: the cross-attention layers then exist and carry signal, and
StableKeypoints later replaces the context with its own tokens, exactly as it
replaces the prompt embedding of SD.

Trained by the project's DDPM trainer (``uld backbone train --kind
context-ddpm``: EMA, resumable checkpoints), which sees the UNet and the
context as one module (:class:`ContextUNet`).

Folder layout (``save_pretrained``): ``unet/`` (diffusers), ``scheduler/``,
``context.safetensors``, ``uld_backbone.json`` with ``kind = "context-ddpm"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import BackboneError, ConfigError, DatasetError

KIND = "context-ddpm"
META_FILE = "uld_backbone.json"
CONTEXT_FILE = "context.safetensors"


class ContextUNet(torch.nn.Module):
    """``UNet2DConditionModel`` + its learned constant context (n_context, dim), called like a ``UNet2DModel``.

    ``forward(x_t, t)`` returns the diffusers output (``.sample``), and
    ``config`` is the UNet's config plus the context's shape, so the DDPM
    trainer (:func:`pipeline.backbones.training.train_ddpm`: EMA copy,
    checkpoints, architecture check) trains UNet and context together unchanged.
    """

    def __init__(self, net: Any, context: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.context = torch.nn.Parameter(context.float().clone())

    @property
    def config(self) -> dict:
        return {**dict(self.net.config), "n_context": int(self.context.shape[0]), "context_dim": int(self.context.shape[1])}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> Any:
        ctx = self.context.to(x_t.dtype)[None].expand(x_t.shape[0], -1, -1)
        return self.net(x_t, t, encoder_hidden_states=ctx)


class ContextDDPM:
    """A pixel-space DDPM (pixels in [-1, 1]) whose UNet has cross-attention to a learned constant context.

    ``unet`` is a :class:`ContextUNet`; ``unet.net`` the ``UNet2DConditionModel``
    StableKeypoints reads. The same surface as :class:`~pipeline.backbones.ddpm.CategoryDDPM`
    where the trainer touches it (``unet``, ``scheduler``, ``device``, ``image_size``,
    ``name``, ``meta``, ``save_pretrained(path, dtype, extra_meta)``).
    """

    kind = KIND

    def __init__(self, unet: ContextUNet, scheduler: Any, name: str = "context-ddpm", meta: dict | None = None,
                 device: str | torch.device = "cpu") -> None:
        from diffusers import DDPMScheduler

        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler if isinstance(scheduler, DDPMScheduler) else DDPMScheduler.from_config(scheduler.config)
        self.name = name
        self.meta = {"kind": KIND, "format_version": 1, **(meta or {})}
        self._device = torch.device("cpu")
        self.to(device)

    @classmethod
    def create(cls, image_size: int = 32, channels: tuple[int, ...] = (32, 64), n_context: int = 4, context_dim: int = 32,
               heads: int = 4, layers_per_block: int = 1, seed: int = 0, name: str = "context-ddpm") -> "ContextDDPM":
        """A random-init model: every block but the first (finest) has cross-attention to the context.

        ``heads`` attention heads in every transformer block (head width = the
        block's channels / ``heads``). diffusers' ``UNet2DConditionModel`` reads
        its ``attention_head_dim`` argument as the number of heads (a naming
        quirk it keeps for compatibility), hence what is passed below; models
        saved before this was understood have ``channels[-1] // heads`` heads
        of 1-4 channels, and load unchanged from their configs.
        """
        from diffusers import DDPMScheduler, UNet2DConditionModel

        channels = tuple(int(c) for c in channels)
        if len(channels) < 2 or image_size % 2 ** (len(channels) - 1):
            raise ConfigError(f"image size {image_size} must be divisible by {2 ** (len(channels) - 1)} with {len(channels)} levels",
                              where="ContextDDPM.create / --channels", fix="use at least two levels and a power-of-two size")
        torch.manual_seed(seed)
        n = len(channels)
        net = UNet2DConditionModel(
            sample_size=image_size, in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            cross_attention_dim=context_dim, attention_head_dim=heads, norm_num_groups=min(8, channels[0]),
        )
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        context = torch.randn(n_context, context_dim, generator=torch.Generator().manual_seed(seed)) * 0.5
        return cls(ContextUNet(net, context), scheduler, name=name, meta={"image_size": int(image_size)})

    @classmethod
    def from_ddpm(cls, ddpm: Any, n_context: int = 4, context_dim: int = 32, heads: int = 4, seed: int = 0,
                  name: str | None = None) -> tuple["ContextDDPM", dict]:
        """A context-DDPM that starts from a trained pixel DDPM (``UNet2DModel``): its convolutions, same widths.

        The two UNets share every ResNet block, up/down sampler, the time
        embedding and the input/output convolutions, under the same parameter
        names; those are copied. What the DDPM lacks -- the transformer blocks
        with cross-attention to the context -- starts random except for each
        block's output projection, which starts at zero: a transformer block
        is a residual branch, so at step 0 the new model computes what the
        DDPM's ResNets compute (without the DDPM's self-attention at the
        coarsest level, whose weights have no counterpart), and the
        cross-attention is learnt on top of features that already know the
        category. The DDPM trainer then fine-tunes everything.

        Why: trained from scratch on a CPU the context-DDPM's cross-attention
        maps had learnt nothing about faces in minutes (the StableKeypoints
        runs of bench/results/stablekeypoints.md peaked on the crop border),
        while the face DDPM's features already transfer landmarks.

        Returns the model and a record of the transfer (``copied`` /
        ``new`` parameter counts, the source's widths), for the model card.
        """
        cfg = ddpm.unet.config
        channels = tuple(int(c) for c in cfg.block_out_channels)
        model = cls.create(image_size=int(cfg.sample_size), channels=channels, n_context=n_context, context_dim=context_dim,
                           heads=heads, layers_per_block=int(cfg.layers_per_block), seed=seed, name=name or "context-ddpm")
        net = model.unet.net
        source = {k: v.float() for k, v in ddpm.unet.state_dict().items()}
        target = net.state_dict()
        copied = {k: source[k] for k, v in target.items() if k in source and source[k].shape == v.shape}
        net.load_state_dict(copied, strict=False)
        from diffusers import Transformer2DModel

        with torch.no_grad():
            for block in net.modules():
                if isinstance(block, Transformer2DModel):
                    block.proj_out.weight.zero_()
                    if block.proj_out.bias is not None:
                        block.proj_out.bias.zero_()
        n_copied = sum(v.numel() for v in copied.values())
        n_all = sum(v.numel() for v in target.values())
        record = {"copied_tensors": len(copied), "new_tensors": len(target) - len(copied), "copied_parameters": int(n_copied),
                  "new_parameters": int(n_all - n_copied), "channels": list(channels)}
        return model, record

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def image_size(self) -> int:
        return int(self.unet.net.config.sample_size)

    @property
    def context_dim(self) -> int:
        return int(self.unet.context.shape[-1])

    def to(self, device: str | torch.device) -> "ContextDDPM":
        self._device = torch.device(device)
        self.unet.to(self._device)
        return self

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predicted noise for noisy images ``x_t`` (B, 3, S, S) at timesteps ``t`` (B,)."""
        return self.unet(x_t, t).sample

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None, extra_meta: dict | None = None) -> Path:
        """``unet/`` (diffusers), ``scheduler/``, ``context.safetensors``, then ``uld_backbone.json`` last."""
        import copy

        from safetensors.torch import save_file

        from pipeline.backbones.common import atomic_dir, quiet_diffusers
        from storage.atomic import write_json

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        net = self.unet.net
        if dtype is not None and dtype != next(net.parameters()).dtype:
            with quiet_diffusers():
                net = copy.deepcopy(net).to("cpu", dtype)
        with atomic_dir(path / "unet") as tmp, quiet_diffusers():
            net.save_pretrained(tmp, safe_serialization=True)
        with atomic_dir(path / "scheduler") as tmp:
            self.scheduler.save_pretrained(tmp)
        save_file({"context": self.unet.context.detach().cpu().float().contiguous()}, str(path / CONTEXT_FILE))
        self.meta = {**self.meta, **(extra_meta or {}), "n_context": int(self.unet.context.shape[0]),
                     "weights_dtype": str(dtype or next(net.parameters()).dtype).replace("torch.", "")}
        write_json(path / META_FILE, self.meta)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", name: str | None = None) -> "ContextDDPM":
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from safetensors.torch import load_file

        from pipeline.backbones.common import quiet_diffusers

        path = Path(path)
        if not is_context_ddpm(path):
            raise BackboneError(f"{path} is not a context-DDPM folder", where=str(path),
                                fix="train one (`uld backbone train --kind context-ddpm`) or pass a Stable Diffusion folder")
        with quiet_diffusers():
            net = UNet2DConditionModel.from_pretrained(str(path / "unet"), torch_dtype=torch.float32)
            scheduler = DDPMScheduler.from_pretrained(str(path / "scheduler"))
        unet = ContextUNet(net, load_file(str(path / CONTEXT_FILE))["context"])
        return cls(unet, scheduler, name=name or path.name, meta=json.loads((path / META_FILE).read_text()), device=device)


def is_context_ddpm(path: str | Path) -> bool:
    meta = Path(path) / META_FILE
    return meta.is_file() and json.loads(meta.read_text()).get("kind") == KIND


def load_context_ddpm(spec: str, home: str | Path | None = None, device: str | torch.device = "cpu") -> ContextDDPM | None:
    """The context-DDPM a backbone spec (a folder or a workspace backbone name) names, or None if it names another kind.

    A context-DDPM folder has the DDPM layout (``unet/`` + ``scheduler/``), so
    :func:`pipeline.backbones.loading.resolve_spec` reads it as ``ddpm``; callers
    that accept both ask here first.
    """
    from pipeline.backbones.loading import resolve_spec

    _, source = resolve_spec(spec, home)
    if isinstance(source, Path) and is_context_ddpm(source):
        return ContextDDPM.from_pretrained(source, device=device)
    return None


def context_ddpm_loss(model: ContextDDPM, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The DDPM objective (Ho et al. 2020, Eq. 14 "simple"): ``|| eps - eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t) ||^2``."""
    T = int(model.scheduler.config.num_train_timesteps)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = torch.randint(0, T, (x0.shape[0],), generator=generator).to(x0.device)
    return torch.nn.functional.mse_loss(model.unet(model.scheduler.add_noise(x0, noise, t), t).sample, noise)


def train_context_ddpm(model: ContextDDPM, crops: np.ndarray, steps: int, batch_size: int = 16, lr: float = 5e-4, seed: int = 0,
                       grad_clip: float = 1.0) -> list[float]:
    """A bare training loop (no EMA, no checkpoints) of UNet + context on uint8 crops (N, S, S, 3); the loss per step.

    AdamW, gradient clipping, all randomness from one generator seeded by
    ``seed``. For real runs use ``uld backbone train --kind context-ddpm``
    (:func:`pipeline.backbones.training.train_ddpm`: EMA weights, resumable checkpoints).
    """
    crops = np.asarray(crops)
    S = model.image_size
    if crops.ndim != 4 or crops.shape[1:] != (S, S, 3) or crops.dtype != np.uint8 or not len(crops):
        raise DatasetError(f"training crops must be uint8 (N, {S}, {S}, 3), got {crops.dtype} {crops.shape}",
                           where="train_context_ddpm(crops)", fix=f"load crops at the model's image size ({S})")
    device = model.device
    data = torch.from_numpy(np.ascontiguousarray(crops))
    gen = torch.Generator().manual_seed(int(seed))
    model.unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.unet.parameters(), lr=lr, weight_decay=1e-4)
    losses = []
    for _ in range(int(steps)):
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        x0 = data[idx].permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device)
        loss = context_ddpm_loss(model, x0, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.unet.parameters(), grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
    model.unet.eval().requires_grad_(False)
    return losses
