"""Augmented views of object crops, rendered from the original image, with exact transforms.

D-ULD bootstraps its heads by learning correspondences "between an image and
its augmentation" (paper 001, Sec 3.2, following SiLK): the backbone must see
the *augmented image*, so that a descriptor has to become invariant to what the
augmentation changes. Warping the cached feature maps instead (the earlier
shortcut) hands both views the same channel vector at corresponding cells, and
matching then needs no invariance at all.

Each training image gets ``n_views`` seeded views. A view is defined by

* a **2x3 affine in crop pixels** ``q = A p + b``: the position ``q`` in the
  view of the point at ``p`` in the plain crop (rotation about the crop
  centre, isotropic scale, translation, and -- when flipped -- the mirror
  ``x -> S - x`` applied first). It is the whole geometric map, so
  correspondences between a crop and its view are exact (up to the feature
  maps' cell size);
* a **flip flag**, kept next to the affine because a mirror also swaps the
  object's left and right parts (see :class:`ViewAugmentConfig.flip`);
* **colour jitter** factors (brightness, contrast, saturation), which move no
  pixel.

Rendering reads the original image, not the crop: rotating a crop would pull
in empty corners, while the image usually has real content there (and where it
does not, the crop rule's constant fill is used, as for any crop). Coordinates
follow :mod:`pipeline.datasets.crop` (pixel ``j`` spans ``[j, j + 1)``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class ViewAugmentConfig:
    """How the augmented views of every training crop are drawn.

    ``n_views``: views per training image (M); bootstrapping pairs a crop with
    one of them per step, so more views = more distinct pairs for the same
    number of UNet passes per image (M). ``max_rotation_deg``, ``scale_range``
    and ``max_translation`` (fraction of the crop side) define the random
    similarity transform. ``flip``: mirror half of the views. A flip maps the
    *left* eye of the crop onto the mirrored position, where the view shows
    that same eye -- but it now looks like a right eye. Matching the two
    therefore teaches the descriptor that left and right parts are the same,
    which merges symmetric landmarks on near-frontal, box-aligned faces (MTFL:
    Hungarian 0.33 -> 0.13), while on heads turning through +-90 degrees of yaw
    inside the crop it teaches pose-invariant parts (synthetic: 0.45 -> 0.65 over
    3 seeds). Off by default, real faces first (bench/results/duld_engine.md,
    "Flips and colour jitter in the views"). ``colour_jitter``:
    strength ``j`` of the brightness, contrast and saturation factors, each
    drawn from ``[1 - j, 1 + j]`` (0 = none). ``seed`` seeds every view
    (with the image's row), so the same config always gives the same views.
    """

    n_views: int = 2
    max_rotation_deg: float = 30.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    max_translation: float = 0.05
    flip: bool = False
    colour_jitter: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_range", tuple(float(s) for s in self.scale_range))
        if int(self.n_views) < 1:
            raise ConfigError(f"n_views must be >= 1, got {self.n_views}", where="--views", fix="use e.g. 4")
        lo, hi = self.scale_range
        if not (0 < lo <= hi):
            raise ConfigError(f"scale range must satisfy 0 < lo <= hi, got {self.scale_range}", where="scale_range")
        if not (0 <= self.max_rotation_deg <= 180):
            raise ConfigError(f"max rotation must be in [0, 180] degrees, got {self.max_rotation_deg}", where="max_rotation_deg")
        if not (0 <= self.max_translation < 0.5):
            raise ConfigError(f"max translation must be in [0, 0.5) of the crop, got {self.max_translation}", where="max_translation")
        if not (0 <= self.colour_jitter < 1):
            raise ConfigError(f"colour jitter must be in [0, 1), got {self.colour_jitter}", where="--colour-jitter", fix="use e.g. 0.3, or 0 for none")

    def to_json(self) -> dict:
        d = asdict(self)
        d["scale_range"] = list(self.scale_range)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ViewAugmentConfig":
        return cls(**{**d, "scale_range": tuple(d["scale_range"])})

    def config_hash(self) -> str:
        """Short hash of the config: it names the view store (with the feature store's hash)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class ViewTransforms:
    """Transforms of ``n`` views: ``affine`` (n, 2, 3) float64 in crop pixels (``q = A p + b``),
    ``flip`` (n,) bool, ``jitter`` (n, 3) float32 brightness / contrast / saturation factors."""

    affine: np.ndarray
    flip: np.ndarray
    jitter: np.ndarray


def view_transform(config: ViewAugmentConfig, crop_size: int, row: int, view: int) -> tuple[np.ndarray, bool, np.ndarray]:
    """The transform of view ``view`` of the image in store row ``row``.

    Seeded by ``(config.seed, row, view)`` alone, so any shard of a view
    store can be (re)computed on its own and gives the same views.
    Returns ``(affine (2, 3) float64, flip, jitter (3,) float32)``.
    """
    rng = np.random.default_rng([int(config.seed), int(row), int(view)])
    u = rng.random(8)
    S = float(crop_size)
    angle = math.radians((2 * u[0] - 1) * config.max_rotation_deg)
    lo, hi = config.scale_range
    scale = lo + (hi - lo) * u[1]
    t = (2 * u[2:4] - 1) * config.max_translation * S
    flip = bool(config.flip and u[4] < 0.5)
    j = config.colour_jitter
    jitter = (1.0 + (2 * u[5:8] - 1) * j).astype(np.float32)
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    A = np.array([[c, -s], [s, c]], np.float64)
    if flip:
        A = A @ np.diag([-1.0, 1.0])  # mirror first: x - S/2 -> S/2 - x about the crop centre
    centre = np.array([S / 2, S / 2])
    b = centre - A @ centre + t
    return np.concatenate([A, b[:, None]], axis=1), flip, jitter


def view_transforms(config: ViewAugmentConfig, crop_size: int, rows: np.ndarray) -> ViewTransforms:
    """Transforms of every view of every row: ``n_views`` consecutive entries per row, rows in order."""
    aff, flips, jit = [], [], []
    for r in np.asarray(rows, dtype=np.int64).reshape(-1):
        for v in range(int(config.n_views)):
            a, f, j = view_transform(config, crop_size, int(r), v)
            aff.append(a)
            flips.append(f)
            jit.append(j)
    n = len(aff)
    return ViewTransforms(
        np.asarray(aff, np.float64).reshape(n, 2, 3),
        np.asarray(flips, bool).reshape(n),
        np.asarray(jit, np.float32).reshape(n, 3),
    )


def invert_pixel_affine(affine: np.ndarray) -> np.ndarray:
    """Inverse of (..., 2, 3) affines ``q = A p + b``: ``p = A^-1 q - A^-1 b``."""
    aff = np.asarray(affine, dtype=np.float64)
    Ainv = np.linalg.inv(aff[..., :2])
    return np.concatenate([Ainv, -(Ainv @ aff[..., 2:])], axis=-1)


def apply_pixel_affine(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map (..., P, 2) points with (..., 2, 3) affines (broadcast over the leading axes)."""
    p = np.asarray(points, dtype=np.float64)
    aff = np.asarray(affine, dtype=np.float64)
    return p @ np.swapaxes(aff[..., :2], -1, -2) + aff[..., None, :, 2]


def pixel_to_normalised_affine(affine: np.ndarray, crop_size: int) -> np.ndarray:
    """The same map in normalised coordinates ``n = 2 x / S - 1`` (what ``F.affine_grid`` and the heads use).

    With ``x = (n + 1) S / 2``: ``n_q = A n_p + A 1 + 2 b / S - 1``.
    """
    aff = np.asarray(affine, dtype=np.float64)
    A, b = aff[..., :2], aff[..., 2]
    one = np.ones(2)
    bn = A @ one + 2.0 * b / float(crop_size) - one
    return np.concatenate([A, bn[..., None]], axis=-1)


def _jitter(view: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Brightness, contrast, saturation (in that order) on a float (S, S, 3) image in [0, 255]."""
    b, c, s = (float(f) for f in factors)
    x = view * b
    grey = x @ np.array([0.299, 0.587, 0.114])
    x = (x - grey.mean()) * c + grey.mean()
    grey = x @ np.array([0.299, 0.587, 0.114])
    x = (x - grey[..., None]) * s + grey[..., None]
    return np.clip(x, 0.0, 255.0)


def render_view(image: np.ndarray, crop_box: np.ndarray, crop_size: int, affine: np.ndarray, jitter: np.ndarray | None = None) -> np.ndarray:
    """The augmented view (S, S, 3) uint8 of the crop ``crop_box`` of ``image`` under ``affine``.

    The view's pixel at ``q`` shows the crop's point ``p = A^-1 (q - b)``. A
    larger crop (same pixel scale, a margin wide enough for every source point)
    is resampled first with the crop rule (:func:`pipeline.datasets.crop.crop_image`,
    antialiased, constant fill outside the image), then warped with bilinear
    interpolation at the view's pixel centres; ``jitter`` factors follow.
    """
    import torch
    import torch.nn.functional as F

    from pipeline.datasets.crop import crop_image

    S = int(crop_size)
    box = np.asarray(crop_box, dtype=np.float64).reshape(4)
    aff = np.asarray(affine, dtype=np.float64).reshape(2, 3)
    inv = invert_pixel_affine(aff)
    corners = np.array([[0, 0], [S, 0], [0, S], [S, S]], np.float64)
    src = apply_pixel_affine(corners, inv)
    m = int(math.ceil(max(0.0, -src.min(), src.max() - S))) + 2  # crop-pixel margin around the crop
    px = (box[2] - box[0]) / S, (box[3] - box[1]) / S  # original pixels per crop pixel
    big_box = (box[0] - m * px[0], box[1] - m * px[1], box[2] + m * px[0], box[3] + m * px[1])
    big = crop_image(image, big_box, S + 2 * m)
    # Output pixel centres -> crop px -> big-crop px -> grid_sample's normalised coordinates.
    c = np.arange(S, dtype=np.float64) + 0.5
    qx, qy = np.meshgrid(c, c)
    q = np.stack([qx.ravel(), qy.ravel()], axis=1)
    p = apply_pixel_affine(q, inv) + m
    grid = torch.from_numpy((2.0 * p / (S + 2 * m) - 1.0).reshape(1, S, S, 2)).float()
    x = torch.from_numpy(np.ascontiguousarray(big.transpose(2, 0, 1))).float()[None]
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)[0].permute(1, 2, 0).numpy()
    if jitter is not None and not np.allclose(jitter, 1.0):
        out = _jitter(out.astype(np.float64), np.asarray(jitter))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
