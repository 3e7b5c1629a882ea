"""Consistency of discovered landmarks under small affine warps: a second measure that needs no labels.

Each image gets a seeded small affine warp (a rotation of a few degrees, ~5 % scale,
a shift of a few pixels, about the image centre). Landmarks found on the warped
image are mapped back through the known inverse and compared with the landmarks
found on the original, landmark by landmark (a warp this small does not swap
left and right, so no matching is needed). The error is in % of ``sqrt(w * h)``
of the object box, as in :mod:`pipeline.evaluation.flip`.

Coordinates follow :mod:`pipeline.datasets.crop` (pixel ``(j, i)`` covers
``[j, j+1) x [i, i+1)``); matrices are 3 x 3 homogeneous maps from original
to warped image coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class WarpRange:
    """The largest warp drawn: rotation in degrees, relative scale change, shift as a fraction of the image side.

    The default shift (3 % of the side) is about 2 px of the 64 px crops the features see,
    whatever the photo's resolution: "a few pixels" where it matters.
    """

    rotation_deg: float = 3.0
    scale: float = 0.05
    shift: float = 0.03

    def validate(self) -> None:
        for name, value, top in (("rotation_deg", self.rotation_deg, 45.0), ("scale", self.scale, 0.5), ("shift", self.shift, 0.5)):
            if not (np.isfinite(value) and 0.0 <= value <= top):
                raise ConfigError(f"warp {name} must be in [0, {top}], got {value!r}", where="WarpRange",
                                  fix="use a small warp, e.g. the defaults (3 degrees, 5 %, 3 %)")


def small_affine(rng: np.random.Generator, width: float, height: float, limits: WarpRange = WarpRange()) -> np.ndarray:
    """A random 3 x 3 affine map (original -> warped pixels) drawn uniformly within ``limits``, about the image centre."""
    limits.validate()
    angle = np.deg2rad(rng.uniform(-limits.rotation_deg, limits.rotation_deg))
    scale = 1.0 + rng.uniform(-limits.scale, limits.scale)
    shift = rng.uniform(-limits.shift, limits.shift, size=2) * np.array([width, height], np.float64)
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    centre = np.array([width, height], np.float64) / 2.0
    linear = np.array([[c, -s], [s, c]])
    out = np.eye(3)
    out[:2, :2] = linear
    out[:2, 2] = centre + shift - linear @ centre  # the centre goes to centre + shift
    return out


def apply_affine(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Points (..., 2) mapped by one 3 x 3 affine ``matrix``; NaN points stay NaN."""
    p = np.asarray(points, dtype=np.float64)
    m = np.asarray(matrix, dtype=np.float64)
    return p @ m[:2, :2].T + m[:2, 2]


def warp_image(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``image`` (H, W, C) uint8 resampled (bilinear) through ``matrix`` onto a canvas of the same size.

    Pixels that come from outside the image take its mean colour: the crop rule of
    :func:`pipeline.datasets.crop.load_crops`, so a warp adds no edge the features could lock on to.
    """
    from scipy.ndimage import affine_transform

    img = np.asarray(image)
    if img.ndim != 3 or img.dtype != np.uint8:
        raise ConfigError(f"warp_image needs an (H, W, C) uint8 image, got {img.dtype} {img.shape}", where="warp_image")
    inv = np.linalg.inv(np.asarray(matrix, dtype=np.float64))
    # scipy works in (row, col) index space, where pixel centres are integers: continuous
    # u = index + 0.5, so the output -> input map is inv about that half-pixel offset.
    swap = np.array([[0, 1], [1, 0]], np.float64)
    lin = swap @ inv[:2, :2] @ swap
    off = swap @ inv[:2, 2] + lin @ np.full(2, 0.5) - 0.5
    mean = img.reshape(-1, img.shape[2]).mean(axis=0)
    out = np.empty_like(img)
    for ch in range(img.shape[2]):
        res = affine_transform(img[..., ch].astype(np.float32), lin, offset=off, output_shape=img.shape[:2], order=1,
                               mode="constant", cval=float(mean[ch]))
        out[..., ch] = np.clip(np.rint(res), 0, 255).astype(np.uint8)
    return out


def warp_box(box: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The axis-aligned box (x0, y0, x1, y1) around a box's four corners after ``matrix``."""
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float64).reshape(4)
    corners = apply_affine(np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]), matrix)
    return np.concatenate([corners.min(axis=0), corners.max(axis=0)])


def warp_consistency(
    points: np.ndarray, present: np.ndarray, warped: np.ndarray, warped_present: np.ndarray, matrices: np.ndarray, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per landmark k: mean distance between landmark k of each image and landmark k of its warped image
    mapped back through the inverse warp, in % of ``sqrt(w * h)`` (``sizes`` (N, 2)), and the image count.

    ``points`` / ``warped``: (N, K, 2) in the original / warped images' pixels; ``matrices``: (N, 3, 3)
    original -> warped. A landmark detector that moves with the image scores ~0.
    """
    from pipeline.evaluation.flip import same_landmark_error

    p = np.asarray(points, dtype=np.float64)
    q = np.asarray(warped, dtype=np.float64)
    m = np.asarray(matrices, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 3 or p.shape[-1] != 2 or m.shape != (len(p), 3, 3):
        raise ConfigError(f"need (N, K, 2) landmarks and (N, 3, 3) warps, got {p.shape}, {q.shape}, {m.shape}", where="warp_consistency")
    back = np.stack([apply_affine(q[i], np.linalg.inv(m[i])) for i in range(len(q))]) if len(q) else q
    return same_landmark_error(p, present, back, warped_present, sizes)
