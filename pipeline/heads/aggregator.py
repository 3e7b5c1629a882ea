"""Hyperfeature aggregator (paper 001, Eq. 2; Luo et al. 2023).

Eq. 2: ``F_ag = sum_t sum_l w[l, t] B_l(r_{l,t})`` -- one bottleneck ``B_l``
per UNet *layer*, shared by that layer's maps at every timestep, and one
learned mixing weight per (layer, timestep), softmax-normalised over all
``L x T`` pairs (Diffusion Hyperfeatures, Luo et al. 2023, normalise the same
way). Sharing ``B_l`` over timesteps is what makes the maps of one layer at
different noise levels comparable before they are mixed.

Deviation from the paper, kept on purpose: the paper upsamples ``r_{l,t}`` to
the image resolution *before* the bottleneck; here every map is bottlenecked
at its own resolution and then resized to ``out_size`` (the heads'
resolution, crop/4 by default, not the image's). For the default 1x1
bottleneck the two orders give the same result (a 1x1 convolution and
bilinear resizing are both linear per pixel and the resize weights sum to
one), and the cheap order saves computing the bottleneck on upsampled maps;
for the ResNet bottleneck (3x3 convolutions and ReLUs) the order matters and
this is an approximation.

The backbone itself is frozen and not part of this module: the aggregator
reads the maps from the feature store, so training never runs the UNet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError


class ResnetBottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 residual bottleneck with a 1x1 projection shortcut.

    The paper's aggregator uses ResNet bottlenecks; the plain 1x1 projection
    (``kind="conv1x1"``) is the cheaper CPU default.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = max(out_channels // 4, 8)
        groups = 8 if mid % 8 == 0 and out_channels % 8 == 0 else 1
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, mid, 1, bias=False),
            nn.GroupNorm(groups if mid % groups == 0 else 1, mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.GroupNorm(groups if mid % groups == 0 else 1, mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 1, bias=False),
            nn.GroupNorm(groups, out_channels),
        )
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class HyperfeatureAggregator(nn.Module):
    """Per-layer bottleneck + resize + softmax(w[l, t])-weighted sum (Eq. 2).

    Args:
        feature_keys: the ``layer@tT`` keys in a fixed order (stored in the
            config so checkpoints are portable); keys of one layer share its
            bottleneck.
        in_channels: input channels per key, same order (equal for the keys of one layer).
        channels: output channels of every bottleneck (paper: 384).
        out_size: output resolution (square), e.g. crop size / 4.
        bottleneck: ``"conv1x1"`` or ``"resnet"``.

    ``layers`` lists the distinct layers (first-appearance order),
    ``mixing_logits`` is (L, T): row ``l`` is layer ``layers[l]``, column
    ``t`` the t-th timestep of the sorted timesteps of all keys; a
    (layer, timestep) pair without a key is masked out of the softmax.
    """

    def __init__(
        self,
        feature_keys: Sequence[str],
        in_channels: Sequence[int],
        channels: int,
        out_size: int,
        bottleneck: str = "conv1x1",
    ) -> None:
        super().__init__()
        if len(feature_keys) == 0 or len(feature_keys) != len(in_channels):
            raise ConfigError(
                f"aggregator needs one channel count per feature key, got {len(feature_keys)} keys "
                f"and {len(in_channels)} channel counts",
                where="ULDHeadsConfig.feature_keys / in_channels",
                fix="build the config with ULDHeadsConfig.from_feature_shapes(store shapes)",
            )
        if bottleneck not in ("conv1x1", "resnet"):
            raise ConfigError(f"unknown bottleneck {bottleneck!r}", where="bottleneck", fix="use 'conv1x1' or 'resnet'")
        self.feature_keys = list(feature_keys)
        self.out_size = int(out_size)
        self.kind = bottleneck
        parsed = [split_key(k) for k in self.feature_keys]
        self.layers = list(dict.fromkeys(layer for layer, _ in parsed))
        self.timesteps = sorted({t for _, t in parsed})
        layer_channels: dict[str, int] = {}
        for (layer, _), c in zip(parsed, in_channels):
            if layer_channels.setdefault(layer, int(c)) != int(c):
                raise ConfigError(
                    f"layer {layer!r} has maps with {layer_channels[layer]} and {int(c)} channels; "
                    "one bottleneck per layer needs the same channel count at every timestep",
                    where="ULDHeadsConfig.in_channels",
                    fix="build the config from the feature store's shapes",
                )
        # (layer index, timestep index) of every key, in key order.
        self._slots = [(self.layers.index(layer), self.timesteps.index(t)) for layer, t in parsed]
        # ModuleList (not ModuleDict): layer names contain '.', which is not a valid module name.
        if bottleneck == "conv1x1":
            self.bottlenecks = nn.ModuleList(nn.Conv2d(layer_channels[layer], channels, 1) for layer in self.layers)
        else:
            self.bottlenecks = nn.ModuleList(ResnetBottleneck(layer_channels[layer], channels) for layer in self.layers)
        # Zero init = uniform mixing at the start, as in Diffusion Hyperfeatures.
        self.mixing_logits = nn.Parameter(torch.zeros(len(self.layers), len(self.timesteps)))
        present = torch.zeros(len(self.layers), len(self.timesteps), dtype=torch.bool)
        for li, ti in self._slots:
            present[li, ti] = True
        self.register_buffer("_present", present, persistent=False)

    def mixing_weights(self) -> torch.Tensor:
        """(L, T) softmax-normalised w[l, t] over all present (layer, timestep) pairs (sums to 1)."""
        logits = self.mixing_logits.masked_fill(~self._present, float("-inf"))
        return torch.softmax(logits.reshape(-1), dim=0).reshape(logits.shape)

    def key_weights(self) -> torch.Tensor:
        """The mixing weight of every feature key, in ``feature_keys`` order."""
        w = self.mixing_weights()
        return torch.stack([w[li, ti] for li, ti in self._slots])

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        missing = [k for k in self.feature_keys if k not in features]
        if missing:
            raise ConfigError(
                f"feature maps {missing} are missing from the input",
                where="HyperfeatureAggregator.forward",
                fix="use the feature store (spec, backbone) the heads were trained on",
            )
        w = self.mixing_weights()
        out = None
        for li in range(len(self.layers)):
            keys = [(i, ti) for i, (lj, ti) in enumerate(self._slots) if lj == li]
            bott = self.bottlenecks[li]
            if self.kind == "conv1x1":
                # B_l is affine per pixel: sum_t w_lt B_l(r_lt) = W (sum_t w_lt r_lt) + b sum_t w_lt,
                # so mix the layer's maps first and run its bottleneck once (exact, T times cheaper).
                x = sum(w[li, ti] * features[self.feature_keys[i]].float() for i, ti in keys)
                wsum = sum(w[li, ti] for _, ti in keys)
                y = F.conv2d(x, bott.weight, bott.bias * wsum)
            else:
                y = sum(w[li, ti] * bott(features[self.feature_keys[i]].float()) for i, ti in keys)
            if y.shape[-1] != self.out_size or y.shape[-2] != self.out_size:
                y = F.interpolate(y, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
            out = y if out is None else out + y
        assert out is not None
        return out


def split_key(key: str) -> tuple[str, int]:
    """``"layer@tT"`` -> ``(layer, T)``; a key without ``@t`` is one layer at timestep 0."""
    if "@t" not in key:
        return key, 0
    layer, t = key.rsplit("@t", 1)
    try:
        return layer, int(t)
    except ValueError:
        return key, 0
