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
    """A context-DDPM folder, a DDPM (grown into one, :func:`grown_from_ddpm`), or Stable Diffusion; else :class:`BackboneError`."""
    from pipeline.backbones.context_ddpm import load_context_ddpm
    from pipeline.backbones.loading import load_backbone, resolve_spec

    context_ddpm = load_context_ddpm(spec, home, device)
    if context_ddpm is not None:
        return from_context_ddpm(context_ddpm)
    kind, _ = resolve_spec(spec, home)
    if kind == "ddpm":
        return grown_from_ddpm(load_backbone(spec, device=device, home=home))
    if kind != "stable-diffusion":
        raise BackboneError(
            f"backbone {spec!r} is a {kind} model without cross-attention; StableKeypoints needs a text-conditioned UNet",
            where="--backbone",
            fix="pass a Stable Diffusion folder, a DDPM folder, or a context-DDPM folder (pipeline.backbones.context_ddpm)",
        )
    return from_stable_diffusion(load_backbone(spec, device=device, home=home))


def grown_from_ddpm(ddpm: Any) -> ConditionedUNet:
    """A DDPM's UNet with cross-attention layers grown on it (:meth:`ContextDDPM.from_ddpm`, seed 0), untrained.

    The grown blocks' output projections are zero, so the UNet computes what the
    DDPM computes; their query and key projections are seeded random linear maps of
    the DDPM's trained hidden states. A token's map is then a softmax competition
    between the tokens of ``q(h_p) . k(token)``: the tokens, optimised by
    StableKeypoints, become linear read-outs of the category-aware features. On the
    MTFL development split this did better in forward NME than the same model with
    its cross-attention trained for 750 steps against a constant context
    (bench/results/stablekeypoints.md), so a plain DDPM folder is accepted as it is.
    Deterministic: the same DDPM gives the same weights (and identity) every time.
    """
    from pipeline.backbones.context_ddpm import ContextDDPM

    model, _ = ContextDDPM.from_ddpm(ddpm, seed=0, name=f"{ddpm.name}+cross-attention")
    wrapped = from_context_ddpm(model.to(ddpm.device))
    wrapped.identity = {**wrapped.identity, "grown_from": ddpm.identity()}
    return wrapped
