"""The text-conditioned UNets StableKeypoints can optimise tokens against.

Two kinds, one interface (:class:`ConditionedUNet`):

- Stable Diffusion (what seed 002 uses): a local diffusers pipeline folder,
  loaded by the project's one loader (:class:`~pipeline.backbones.stable_diffusion.StableDiffusionBackbone`);
  images go through the VAE to latents, the learned tokens take the place of
  the CLIP text embedding (width ``cross_attention_dim``).
- the CPU default, :class:`~pipeline.backbones.context_ddpm.ContextDDPM`: a
  pixel-space UNet whose cross-attention was trained against a learned
  constant context; the learned tokens take the place of that context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import BackboneError


@dataclass
class ConditionedUNet:
    """A frozen ``UNet2DConditionModel`` with the image -> UNet-input map and its noise schedule."""

    unet: Any
    scheduler: Any
    encode: Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, S, S) in [-1, 1] -> UNet input (B, C, s, s)
    latent_factor: int  # S / s
    kind: str
    identity: dict

    def __post_init__(self) -> None:
        self.unet.eval().requires_grad_(False)

    @property
    def context_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


def from_stable_diffusion(backbone: Any) -> ConditionedUNet:
    """Wrap a loaded :class:`StableDiffusionBackbone` (VAE latents, its UNet and betas)."""
    return ConditionedUNet(backbone.unet, backbone.scheduler, backbone.encode, backbone.vae_factor, "stable-diffusion", backbone.identity())


def from_context_ddpm(model: Any) -> ConditionedUNet:
    """Wrap a :class:`ContextDDPM` (pixels are the UNet input; its learned context is not used)."""
    from pipeline.backbones.base import weights_hash

    net = model.unet.net
    return ConditionedUNet(net, model.scheduler, lambda x: x.to(next(net.parameters()).dtype), 1, "context-ddpm",
                           {"kind": "context-ddpm", "weights": weights_hash(net)})


def load_conditioned_unet(spec: str, device: str = "cpu", home: str | Path | None = None) -> ConditionedUNet:
    """A context-DDPM folder, or anything :func:`load_backbone` reads as Stable Diffusion; else :class:`BackboneError`."""
    from pipeline.backbones.context_ddpm import ContextDDPM, is_context_ddpm
    from pipeline.backbones.loading import load_backbone, resolve_spec

    kind, source = resolve_spec(spec, home)  # a context-DDPM folder reads as "ddpm" there (unet/ + scheduler/)
    if isinstance(source, Path) and is_context_ddpm(source):
        return from_context_ddpm(ContextDDPM.from_pretrained(source, device=device))
    if kind != "stable-diffusion":
        raise BackboneError(
            f"backbone {spec!r} is a {kind} model without cross-attention; StableKeypoints needs a text-conditioned UNet",
            where="--backbone",
            fix="pass a Stable Diffusion folder, or a context-DDPM folder (pipeline.backbones.context_ddpm: a small pixel UNet with cross-attention)",
        )
    return from_stable_diffusion(load_backbone(spec, device=device, home=home))
