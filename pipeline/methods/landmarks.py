"""The landmark set passed between methods, flows and the evaluator.

Coordinates are in crop pixels of the feature store's crops (x right, y down,
pixel ``i`` spans ``[i, i+1)`` so its centre is ``i + 0.5``). ``present`` marks
which of the K landmarks a method found in an image; absent entries hold NaN.
``fallback`` marks present landmarks that were *not detected* but filled in by
a method's fallback rule (D-ULD: a cluster with no keypoint in the image gets
the heatmap-weighted best match of its centroid); the evaluator scores them
both as given and as missing, so a fallback never passes for a detection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass
class LandmarkSet:
    """K landmarks for N images: ``coords`` (N,K,2) float32, ``present`` (N,K) bool, ``scores`` (N,K) float32,
    ``fallback`` (N,K) bool (default all False: every present landmark was detected)."""

    coords: np.ndarray
    present: np.ndarray
    scores: np.ndarray
    fallback: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.float32)
        self.present = np.asarray(self.present, dtype=bool)
        self.scores = np.asarray(self.scores, dtype=np.float32)
        if self.coords.ndim != 3 or self.coords.shape[2] != 2:
            raise ConfigError(f"coords must be (N, K, 2), got {self.coords.shape}", where="LandmarkSet")
        if self.present.shape != self.coords.shape[:2] or self.scores.shape != self.coords.shape[:2]:
            raise ConfigError(
                f"present {self.present.shape} and scores {self.scores.shape} must be (N, K) = {self.coords.shape[:2]}",
                where="LandmarkSet",
            )
        self.fallback = np.zeros(self.present.shape, bool) if self.fallback is None else np.asarray(self.fallback, dtype=bool)
        if self.fallback.shape != self.present.shape:
            raise ConfigError(f"fallback {self.fallback.shape} must be (N, K) = {self.present.shape}", where="LandmarkSet")
        self.fallback = self.fallback & self.present  # only a present landmark can be a fallback
        # Absent landmarks carry NaN so that nobody uses a stale coordinate by accident.
        self.coords = np.where(self.present[..., None], self.coords, np.nan).astype(np.float32)

    @property
    def n_images(self) -> int:
        return int(self.coords.shape[0])

    @property
    def k(self) -> int:
        return int(self.coords.shape[1])

    def __len__(self) -> int:
        return self.n_images

    @classmethod
    def empty(cls, n_images: int, k: int) -> "LandmarkSet":
        return cls(
            np.full((n_images, k, 2), np.nan, np.float32),
            np.zeros((n_images, k), bool),
            np.full((n_images, k), np.nan, np.float32),
        )

    @classmethod
    def concat(cls, parts: list["LandmarkSet"]) -> "LandmarkSet":
        if not parts:
            raise ConfigError("no landmark sets to concatenate", where="LandmarkSet.concat")
        ks = {p.k for p in parts}
        if len(ks) != 1:
            raise ConfigError(f"landmark sets have different K: {sorted(ks)}", where="LandmarkSet.concat")
        return cls(
            np.concatenate([p.coords for p in parts]),
            np.concatenate([p.present for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.fallback for p in parts]),
        )

    def subset(self, idx: np.ndarray | slice) -> "LandmarkSet":
        return LandmarkSet(self.coords[idx], self.present[idx], self.scores[idx], self.fallback[idx])

    def missing_fraction(self) -> float:
        return float(1.0 - self.present.mean()) if self.present.size else 0.0

    def normalised(self, crop_size: int) -> np.ndarray:
        """Coordinates divided by the crop side: [0, 1] crop units (what the evaluator regresses on)."""
        return self.coords / float(crop_size)


# ------------------------------------------------------------------ the RoI rule (methods keep landmarks in the object box)
def points_in_rois(points: np.ndarray, rois: np.ndarray) -> np.ndarray:
    """(n, m) bool: point ``[i, j]`` (crop px, ``x, y``) lies in image ``i``'s RoI (``x0, y0, x1, y1``, crop px)."""
    b = np.asarray(rois, dtype=np.float64)[:, None]
    x, y = points[..., 0], points[..., 1]
    return (x >= b[..., 0]) & (x <= b[..., 2]) & (y >= b[..., 1]) & (y <= b[..., 3])


def roi_cell_mask(rois: np.ndarray | torch.Tensor | None, batch: int, R: int, S: int) -> torch.Tensor | None:
    """(B, R, R) bool: cells whose centre lies inside each image's RoI (x0, y0, x1, y1) in crop px.

    ``None`` -> no restriction. An RoI containing no cell centre keeps the whole map.
    """
    import torch

    if rois is None:
        return None
    r = torch.as_tensor(np.asarray(rois, np.float32)).reshape(batch, 4)
    c = (torch.arange(R, dtype=torch.float32) + 0.5) * (S / R)
    inx = (c[None, :] >= r[:, 0:1]) & (c[None, :] <= r[:, 2:3])  # (B, R) columns
    iny = (c[None, :] >= r[:, 1:2]) & (c[None, :] <= r[:, 3:4])  # (B, R) rows
    mask = iny[:, :, None] & inx[:, None, :]
    empty = ~mask.flatten(1).any(1)
    mask[empty] = True
    return mask
