"""The three networks shared by Jakab et al. (seed 003) and C3 (seed 004).

* :class:`KeypointEncoder` ``Phi``: image -> K heatmaps at 1/4 resolution (Jakab
  et al., seed 003 Sec. III-C; their detector is a stack of two-convolution blocks, seed
  003 Fig. 2) plus the feature map the heatmaps are read from (C3's flow module
  correlates it, see :mod:`pipeline.methods.condgen.losses`).
* :class:`AppearanceEncoder` ``Psi``: source image -> appearance features at the
  same 1/4 resolution.
* :class:`Generator`: appearance features concatenated with the K Gaussian
  bottleneck maps -> image, upsampled twice (seed 003, Sec. III-C: "a
  regressor network up-samples this combined representation").

Widths are small for a CPU (the paper's networks are much wider, at 128 px).
GroupNorm, not BatchNorm: a crop's landmarks then never depend on its batch mates.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _groups(ch: int) -> int:
    for g in (8, 4, 2):
        if ch % g == 0:
            return g
    return 1


def conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Two 3x3 convolutions (the first may stride), GroupNorm + ReLU after each."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
        nn.GroupNorm(_groups(cout), cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(_groups(cout), cout),
        nn.ReLU(inplace=True),
    )


class _Encoder(nn.Module):
    """Image (B, 3, S, S) -> features (B, 4w, S/4, S/4): three blocks, two of them strided."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_block(3, width), conv_block(width, 2 * width, 2), conv_block(2 * width, 4 * width, 2))
        self.out_channels = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class KeypointEncoder(nn.Module):
    """``Phi``: image -> ``(heatmaps (B, K, S/4, S/4), features (B, 4w, S/4, S/4))``."""

    def __init__(self, k: int, width: int) -> None:
        super().__init__()
        self.encoder = _Encoder(width)
        self.head = nn.Conv2d(self.encoder.out_channels, k, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder(x)
        return self.head(feats), feats


class AppearanceEncoder(nn.Module):
    """``Psi``: image -> appearance features (B, C, S/4, S/4)."""

    def __init__(self, width: int, channels: int) -> None:
        super().__init__()
        self.encoder = _Encoder(width)
        self.proj = nn.Conv2d(self.encoder.out_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.encoder(x))


class Generator(nn.Module):
    """(appearance (B, C, h, w), bottleneck maps (B, K, h, w)) -> image (B, 3, 4h, 4w) in [-1, 1]."""

    def __init__(self, k: int, appearance_channels: int, width: int) -> None:
        super().__init__()
        self.b0 = conv_block(appearance_channels + k, 4 * width)
        self.b1 = conv_block(4 * width, 2 * width)
        self.b2 = conv_block(2 * width, width)
        self.out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, appearance: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        x = self.b0(torch.cat([appearance, maps], dim=1))
        x = self.b1(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        x = self.b2(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        return torch.tanh(self.out(x))
