"""An unsupervised foreground estimate from the backbone's own features.

The paper samples ZeroShot pixels inside a detected object RoI; a box still
holds background in its corners and, for turned heads, on one whole side, and
background pixels then take clusters (points on the backdrop) or pull centroids
towards themselves. Without labels, this module splits each crop into object
and background with the features the methods already use:

1. dense descriptors of the crop at ``resolution`` x ``resolution`` (the
   ZeroShot descriptor, :func:`pipeline.methods.zeroshot.describe_pixels`:
   per-key L2-normalised hyperfeatures, so it measures what the methods see);
2. two-means inside the image, initialised with the mean of the crop's border
   pixels (background seed) and of its central quarter (object seed);
3. the cluster holding most of the border pixels is the background. Crops
   are centred on the object, whose box lies well inside the margin, so the
   border is background in the datasets of this field (faces, cat heads).

Per image, not one global split: backgrounds differ from image to image
(synthetic clutter, indoor/outdoor faces) far more than objects do, and a
per-image split adapts to each. A split that is not credible -- the object
part under ``min_fraction`` or over ``max_fraction`` of the crop, when the
features do not separate object from backdrop -- falls back to the whole
crop, so the estimate can only remove pixels where it has evidence.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pipeline.errors import ConfigError


def _border(resolution: int) -> np.ndarray:
    b = np.zeros((resolution, resolution), bool)
    b[[0, -1], :] = True
    b[:, [0, -1]] = True
    return b.ravel()


def _centre(resolution: int) -> np.ndarray:
    c = np.zeros((resolution, resolution), bool)
    q = resolution // 4
    c[q : resolution - q, q : resolution - q] = True
    return c.ravel()


def split_foreground(desc: np.ndarray, n_iter: int = 10, min_fraction: float = 0.1, max_fraction: float = 0.95) -> np.ndarray:
    """Foreground mask (r, r) of one crop from its dense descriptors ``desc`` (D, r, r); see the module doc."""
    D, r, r2 = desc.shape
    if r != r2 or r < 4:
        raise ConfigError(f"descriptor map must be square and at least 4 x 4, got {desc.shape}", where="split_foreground")
    x = np.ascontiguousarray(desc.reshape(D, -1).T, dtype=np.float32)  # (P, D)
    border, centre = _border(r), _centre(r)
    c = np.stack([x[border].mean(0), x[centre].mean(0)])
    for _ in range(int(n_iter)):
        # squared distances through the dot product: (P, 2)
        d = (c * c).sum(1)[None] - 2.0 * x @ c.T
        lab = d.argmin(1)
        new = np.stack([x[lab == j].mean(0) if (lab == j).any() else c[j] for j in range(2)])
        if np.allclose(new, c):
            break
        c = new
    background = np.bincount(lab[border], minlength=2).argmax()
    fg = lab != background
    if not (min_fraction <= fg.mean() <= max_fraction):
        fg[:] = True
    return fg.reshape(r, r)


def foreground_masks(
    batches: Iterable[dict], resolution: int = 32, n_iter: int = 10, min_fraction: float = 0.1, max_fraction: float = 0.95
) -> np.ndarray:
    """Foreground masks (N, r, r) bool of the images covered by ``batches`` (feature dicts, in order)."""
    from pipeline.methods.zeroshot import describe_pixels  # (zeroshot imports this module)

    out = []
    for batch in batches:
        dense = describe_pixels(batch, resolution)  # (B, D, r, r)
        out.extend(split_foreground(d, n_iter, min_fraction, max_fraction) for d in dense)
    if not out:
        raise ConfigError("no feature batches given", where="foreground_masks")
    return np.stack(out)


def mask_lookup(mask: np.ndarray, points: np.ndarray, crop_size: int) -> np.ndarray:
    """Whether each of ``points`` (P, 2) in crop pixels falls on a True cell of ``mask`` (r, r)."""
    r = mask.shape[0]
    ij = np.clip(np.floor(np.asarray(points, dtype=np.float64) / float(crop_size) * r).astype(np.int64), 0, r - 1)
    return mask[ij[:, 1], ij[:, 0]]
