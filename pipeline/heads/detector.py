"""Detector head (1-channel keypoint heatmap) and non-maximum suppression.

Coordinate convention used by every module of ``pipeline.heads``: a crop of
``S`` pixels spans the continuous interval [0, S] on each axis; a map of
resolution ``R`` over that crop has cell ``j`` centred at ``(j + 0.5) * S / R``.
Normalised coordinates (``F.grid_sample`` / ``F.affine_grid`` with
``align_corners=False``) are ``n = 2 * x / S - 1``, the same for every map
resolution -- which is why warps are expressed in normalised coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class DetectorHead(nn.Module):
    """conv3x3 -> ReLU -> conv1x1 to one channel of keypoint logits."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, R, R) aggregated features -> (B, 1, R, R) logits (sigmoid = heatmap)."""
        return self.net(x)


@dataclass
class Keypoints:
    """Padded keypoints of a batch.

    ``xy`` (B, T, 2): integer cell indices (column, row) as floats; the cell
    centre in crop pixels is ``(xy + 0.5) * S / R``. ``score`` (B, T): heatmap
    values; ``valid`` (B, T): False for padding (fewer maxima than ``top_k``).
    """

    xy: torch.Tensor
    score: torch.Tensor
    valid: torch.Tensor


def nms_keypoints(heatmap: torch.Tensor, radius: int = 1, top_k: int = 32, threshold: float = 0.0, relative: float = 0.0) -> Keypoints:
    """Max-pool NMS, then the ``top_k`` strongest local maxima that pass the gates.

    A location survives when it equals the maximum of its ``(2r+1)^2``
    neighbourhood (ties keep all, which is rare on real-valued maps) and its
    score is ``> threshold`` (absolute, on the sigmoid heatmap) and
    ``>= relative * (the image's highest score)``. The relative gate is what
    filters on short CPU schedules, where a head trained with MSE towards
    peak-1 Gaussians has not reached 1 yet (so an absolute 0.5 would keep
    nothing) while its weak maxima still sit far below its strong ones.
    ``heatmap`` is (B, 1, R, R) or (B, R, R) of scores (after the sigmoid).
    Returns integer cell coordinates ``(col, row)`` as floats.
    """
    if heatmap.dim() == 4:
        heatmap = heatmap[:, 0]
    B, H, W = heatmap.shape
    pooled = F.max_pool2d(heatmap[:, None], kernel_size=2 * radius + 1, stride=1, padding=radius)[:, 0]
    peak = heatmap.reshape(B, -1).amax(1).reshape(B, 1, 1)
    keep = (heatmap == pooled) & (heatmap > threshold) & (heatmap >= relative * peak)
    scores = torch.where(keep, heatmap, torch.full_like(heatmap, -1.0)).reshape(B, -1)
    k = min(int(top_k), H * W)
    top, idx = scores.topk(k, dim=1)
    valid = top > -1.0
    xy = torch.stack([(idx % W).float(), torch.div(idx, W, rounding_mode="floor").float()], dim=-1)
    return Keypoints(xy=xy, score=top.clamp_min(0.0), valid=valid)


def local_maxima(heatmap: torch.Tensor, xy: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, T) bool: whether each cell ``xy`` (B, T, 2) (col, row) is the maximum of its ``(2r+1)^2``
    neighbourhood of ``heatmap`` (B, 1, R, R) or (B, R, R). ``radius`` 0: every cell is."""
    if heatmap.dim() == 4:
        heatmap = heatmap[:, 0]
    B, H, W = heatmap.shape
    if int(radius) <= 0:
        return torch.ones(xy.shape[:2], dtype=torch.bool)
    pooled = F.max_pool2d(heatmap[:, None], kernel_size=2 * int(radius) + 1, stride=1, padding=int(radius))[:, 0]
    idx = (xy[..., 1].long() * W + xy[..., 0].long()).clamp(0, H * W - 1)
    return torch.gather(heatmap.reshape(B, -1), 1, idx) == torch.gather(pooled.reshape(B, -1), 1, idx)


def refine_subcell(heatmap: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Sub-cell keypoint positions: heatmap-weighted centroid of the 3x3 cells around each peak.

    A map coarser than the crop (e.g. 16 cells for 64 px) would otherwise
    quantise every keypoint to the cell grid; the 3x3 centroid is the usual
    cheap refinement (at most one cell of shift). ``heatmap`` (B, 1, R, R) or
    (B, R, R) non-negative scores; ``xy`` (B, T, 2) integer cells (col, row).
    Returns fractional cells, same shape as ``xy``.
    """
    if heatmap.dim() == 4:
        heatmap = heatmap[:, 0]
    B, H, W = heatmap.shape
    patches = F.unfold(heatmap[:, None], kernel_size=3, padding=1)  # (B, 9, H*W); zero outside the map
    idx = (xy[..., 1].long() * W + xy[..., 0].long()).clamp(0, H * W - 1)  # (B, T)
    p = torch.gather(patches, 2, idx[:, None, :].expand(B, 9, idx.shape[1]))  # (B, 9, T)
    off = torch.tensor([-1.0, 0.0, 1.0], dtype=heatmap.dtype)
    dy, dx = torch.meshgrid(off, off, indexing="ij")
    w = p.clamp_min(0)
    total = w.sum(1).clamp_min(1e-12)
    ox = (w * dx.reshape(1, 9, 1)).sum(1) / total
    oy = (w * dy.reshape(1, 9, 1)).sum(1) / total
    return xy + torch.stack([ox, oy], dim=-1)
