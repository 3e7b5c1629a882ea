"""Perceptual loss with the project's own diffusion UNet in place of VGG-19.

Jakab et al. (seed 003, Sec. III-C) train the generator with a
perceptual loss: distances between the activations of a fixed network (an
ImageNet VGG-19) on the reconstruction and on the target. No pretrained VGG
ships with this project, so the fixed network here is the frozen pixel-space
DDPM UNet of a backbone (default ``shipped``, ``pipeline/assets/ddpm-synthetic-64``):
its up-block ResNet outputs at timestep 0, the same maps the other methods use
as features. The image enters un-noised (``x_0`` itself at ``t = 0``; the
scheduler's ``t = 0`` noise, ``sqrt(1 - alpha_bar_0) ~ 0.01``, is left out so
that the loss is deterministic).

Per layer the loss is the mean absolute difference divided by the target's
mean absolute activation, so every layer weighs about the same (the paper
weighs VGG layers with fixed per-layer factors; these play that role).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import ConfigError


class DiffusionPerceptualLoss(nn.Module):
    """``loss(x_hat, x, mask)``: masked feature distance through a frozen DDPM UNet at ``t = 0``.

    ``unet``: a diffusers ``UNet2DModel`` (pixel space, 3 channels); ``layers``:
    up-block ResNet names (``up{i}.res{j}``). The UNet's parameters are frozen
    (``requires_grad = False``); gradients flow to the *input* only.
    """

    def __init__(self, unet: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        from pipeline.backbones.common import check_layers, up_resnet_layers

        self.unet = unet.eval()
        for p in self.unet.parameters():
            p.requires_grad_(False)
        self.layers = check_layers(list(layers), up_resnet_layers(unet), "perceptual network")

    @classmethod
    def from_backbone(cls, backbone, layers: Sequence[str] | None = None) -> "DiffusionPerceptualLoss":
        """Build from a loaded :class:`pipeline.backbones.ddpm.CategoryDDPM` (its default layers unless given)."""
        unet = getattr(backbone, "unet", None)
        kind = getattr(backbone, "kind", None)
        if unet is None or kind != "ddpm" or int(getattr(unet.config, "in_channels", 0)) != 3:
            raise ConfigError(
                f"backbone {getattr(backbone, 'name', backbone)!r} is not a pixel-space DDPM, so it cannot serve as the perceptual network",
                where="--backbone (perceptual loss of jakab / c3)",
                fix="use `shipped`, `pipeline/assets/ddpm-mtfl-64` or a DDPM trained with `uld backbone train`",
            )
        return cls(unet, list(layers) if layers else backbone.default_layers())

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Up-block activations of images ``x`` (B, 3, S, S) in [-1, 1], with gradients to ``x``."""
        from pipeline.backbones.common import capture_up_resnets, run_until_captured

        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        with capture_up_resnets(self.unet, self.layers) as cap:
            run_until_captured(self.unet, x, t)
        return {name: cap[name] for name in self.layers}

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            target = self.features(x)
        pred = self.features(x_hat)
        total = x_hat.new_zeros(())
        for name in self.layers:
            f_hat, f = pred[name], target[name]
            diff = (f_hat - f).abs()
            scale = f.abs().mean().clamp_min(1e-6)
            if mask is None:
                total = total + diff.mean() / scale
            else:
                m = F.adaptive_avg_pool2d(mask, f.shape[-2:])
                total = total + (diff * m).sum() / (m.sum().clamp_min(1e-6) * f.shape[1]) / scale
        return total / len(self.layers)
