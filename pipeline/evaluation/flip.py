"""Consistency of discovered landmarks under a horizontal flip: a measure that needs no labels.

Landmarks found on an image and on its mirror image, mapped back (``x -> W - x``
in the continuous pixel convention of :mod:`pipeline.datasets.crop`), should
land on the same points -- but a symmetric object's left-eye landmark comes back
as the right-eye one. So each landmark's *partner* (the landmark of the flipped
image that lands on it) is found by Hungarian matching on the mean distance, and
the error is that distance, in % of ``sqrt(w * h)`` of the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class FlipResult:
    partner: np.ndarray  # (K,) int: the flipped image's landmark matched to landmark k (-1: none)
    error: np.ndarray  # (K,) float: mean distance to the partner over images where both are present, % of sqrt(w*h); NaN if none
    n_pairs: np.ndarray  # (K,) int: images where landmark k and its partner are both present


def mirror_x(points: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Points (N, K, 2) of flipped images mapped back to the original images (widths (N,))."""
    out = np.array(points, dtype=np.float64, copy=True)
    out[..., 0] = np.asarray(widths, dtype=np.float64)[:, None] - out[..., 0]
    return out


def same_landmark_error(a: np.ndarray, a_present: np.ndarray, b: np.ndarray, b_present: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per landmark k: mean distance between ``a[:, k]`` and ``b[:, k]`` (N, K, 2) over the images where
    both are present, in % of ``sqrt(w * h)`` (``sizes`` (N, 2)), and that image count. E.g. the same
    images predicted twice with different diffusion noise: how far a landmark moves when nothing moved."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    d = np.linalg.norm(a - b, axis=-1) / np.sqrt(sizes[:, 0] * sizes[:, 1])[:, None] * 100.0
    ok = np.asarray(a_present, bool) & np.asarray(b_present, bool) & np.isfinite(d)
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, d, 0.0).sum(axis=0) / np.maximum(n, 1), np.nan), n


def flip_consistency(
    points: np.ndarray, present: np.ndarray, flipped: np.ndarray, flipped_present: np.ndarray, sizes: np.ndarray
) -> FlipResult:
    """``points`` / ``present``: (N, K, 2) / (N, K) landmarks of N images; ``flipped`` / ``flipped_present``:
    those of their mirror images, in the mirror images' pixels; ``sizes``: (N, 2) image width, height."""
    p = np.asarray(points, dtype=np.float64)
    q = np.asarray(flipped, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 3 or p.shape[-1] != 2:
        raise ConfigError(f"landmark arrays must both be (N, K, 2), got {p.shape} and {q.shape}", where="flip_consistency")
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    n, K, _ = p.shape
    back = mirror_x(q, sizes[:, 0])
    scale = np.sqrt(sizes[:, 0] * sizes[:, 1])[:, None, None]
    # dist[i, k, j]: landmark k of image i against landmark j of its flip, mapped back.
    dist = np.linalg.norm(p[:, :, None, :] - back[:, None, :, :], axis=-1) / scale * 100.0
    both = np.asarray(present, bool)[:, :, None] & np.asarray(flipped_present, bool)[:, None, :] & np.isfinite(dist)
    counts = both.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, np.where(both, dist, 0.0).sum(axis=0) / np.maximum(counts, 1), np.nan)
    from scipy.optimize import linear_sum_assignment

    # Pairs seen in no image cost more than any real one, so they are matched last.
    finite = mean[np.isfinite(mean)]
    big = (finite.max() if finite.size else 1.0) * 10.0 + 1.0
    rows, cols = linear_sum_assignment(np.where(np.isfinite(mean), mean, big))
    partner = np.full(K, -1, np.int64)
    error = np.full(K, np.nan)
    pairs = np.zeros(K, np.int64)
    for k, j in zip(rows, cols):
        if counts[k, j] > 0:
            partner[k], error[k], pairs[k] = j, mean[k, j], counts[k, j]
    return FlipResult(partner, error, pairs)
