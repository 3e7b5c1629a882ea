"""The crop step shared by every stage: square object crops and exact coordinate maps.

Coordinate convention (used everywhere in the project): image coordinates are
continuous, x to the right and y down, with pixel ``(row i, column j)`` covering
``[j, j+1) x [i, i+1)`` -- its centre is at ``(j + 0.5, i + 0.5)``. This is the
convention of PIL's resampling and of ``torch.nn.functional.interpolate(...,
align_corners=False)``, so a crop box ``(x0, y0, x1, y1)`` maps exactly onto
the crop's ``[0, S) x [0, S)`` and

    crop = (p - box[:2]) * S / (box[2:] - box[:2])        (to_crop)
    p    = crop * (box[2:] - box[:2]) / S + box[:2]       (to_original)

hold for every point, with no half-pixel terms. Horizontal flips are
``x -> S - x`` in crop pixels.

Pixels of the crop that fall outside the image (tight face crops: AFLW's
150 px images, MTFL) are filled with **one constant colour: the mean colour of
the image pixels the crop reads** (crop rule 2, :data:`CROP_RULE`). Rule 1 was
edge replication, which paints the border pixels into streaks across the
padding: structure that is not in the scene, and that features and clustering
latch onto. A constant carries no structure; the image's own mean (rather than
black or mid-grey) keeps the step at the image border as small as a constant
can on average, so features of object pixels next to the border are disturbed
least. What is padding is known exactly: :func:`image_rect_in_crop` gives the
in-image rectangle of each crop, and :func:`clip_rois_to_image` intersects
object RoIs with it so padding is never sampled as object.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipeline.datasets.base import Manifest
from pipeline.datasets.images import read_image
from pipeline.errors import ConfigError, DatasetError

# The crop rule's version (1 = edge replication, 2 = mean-colour fill) lives in a module of its
# own so FeatureSpec can name stores without importing this one; re-exported here.
from pipeline.crop_rule import CROP_RULE  # noqa: E402,F401

#: The crop margin (fraction of the longer object side added on each side) of every
#: stage: features, the methods' RoIs, the contact sheets and `uld datasets show`, so
#: what a user looks at is what the methods see. FeatureSpec.crop_margin defaults to it.
DEFAULT_CROP_MARGIN = 0.15


def crop_boxes(bboxes: np.ndarray, margin: float) -> np.ndarray:
    """Square crop boxes (N, 4) ``(x0, y0, x1, y1)`` centred on the object boxes.

    Side = ``max(w, h) * (1 + 2 * margin)``: ``margin`` is the fraction of the
    longer object side added on each side. Degenerate boxes get a side of at
    least 1 px so the maps below stay finite.
    """
    if not (math.isfinite(margin) and margin > -0.5):
        raise ConfigError(f"crop margin must be a number > -0.5, got {margin!r}", where="margin",
                          fix="use e.g. 0.1 (10% of the object size on each side)")
    b = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    centre = (b[:, :2] + b[:, 2:]) / 2.0
    side = np.maximum(np.max(b[:, 2:] - b[:, :2], axis=1), 1.0) * (1.0 + 2.0 * margin)
    half = (side / 2.0)[:, None]
    return np.concatenate([centre - half, centre + half], axis=1).astype(np.float32)


def _box_scale(boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    if size <= 0:
        raise ConfigError(f"crop size must be positive, got {size}", where="size", fix="use e.g. 64, 128 or 256")
    b = np.asarray(boxes, dtype=np.float64)
    origin = b[..., None, :2]
    extent = b[..., None, 2:] - b[..., None, :2]
    if np.any(extent <= 0):
        raise ConfigError("crop boxes must have x1 > x0 and y1 > y0", where="boxes", fix="build them with crop_boxes()")
    return origin, extent / float(size)


def _as_batch(points: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    p = np.asarray(points, dtype=np.float64)
    b = np.asarray(boxes, dtype=np.float64)
    single = p.ndim == 2 and b.ndim == 1
    if single:
        p, b = p[None], b[None]
    if p.ndim != 3 or p.shape[-1] != 2 or b.shape != (p.shape[0], 4):
        raise ConfigError(f"expected points (N, K, 2) and boxes (N, 4), got {p.shape} and {b.shape}", where="crop maps")
    return p, b, single


def to_crop(points: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Original pixels -> crop pixels. ``points`` (N, K, 2), ``boxes`` (N, 4); NaN stays NaN.

    A single image's ``(K, 2)`` points with a ``(4,)`` box also work.
    """
    p, b, single = _as_batch(points, boxes)
    origin, scale = _box_scale(b, size)
    out = ((p - origin) / scale).astype(np.float32)
    return out[0] if single else out


def to_original(points: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Crop pixels -> original pixels: the exact inverse of :func:`to_crop`."""
    p, b, single = _as_batch(points, boxes)
    origin, scale = _box_scale(b, size)
    out = (p * scale + origin).astype(np.float32)
    return out[0] if single else out


def padding_fill(inside: np.ndarray, image: np.ndarray) -> np.ndarray:
    """The constant colour (3,) uint8 for crop pixels outside the image.

    The mean colour of ``inside`` (the image pixels the crop reads); when the
    box misses the image entirely, the whole image's mean.
    """
    src = inside if inside.size else image
    return np.round(src.reshape(-1, 3).mean(axis=0, dtype=np.float64)).astype(np.uint8)


def crop_image(image: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
    """Resample ``box`` of ``image`` (uint8 H x W x 3) to a (size, size, 3) uint8 crop.

    Bilinear interpolation (PIL's, which widens its kernel when shrinking, so
    large faces are low-pass filtered instead of aliased). Only the pixels the
    kernel can touch are gathered, which keeps the cost proportional to the
    box, not the image. Where the box reaches past the image the gathered
    region is filled with :func:`padding_fill` (crop rule 2, see the module
    doc); crop pixels near the image border blend image and fill over one
    kernel width, like any resampled edge.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ConfigError(f"crop_image expects uint8 (H, W, 3), got {img.dtype} {img.shape}", where="image",
                          fix="read images with pipeline.datasets.images.read_image")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0) or not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ConfigError(f"invalid crop box {tuple(box)}", where="box", fix="build boxes with crop_boxes()")
    if size <= 0:
        raise ConfigError(f"crop size must be positive, got {size}", where="size", fix="use e.g. 64, 128 or 256")
    height, width = img.shape[:2]
    # Kernel support: 1 px when enlarging, `scale` px when shrinking; +2 for rounding.
    pad = int(math.ceil(max((x1 - x0) / size, (y1 - y0) / size, 1.0))) + 2
    ix0, iy0 = int(math.floor(x0)) - pad, int(math.floor(y0)) - pad
    ix1, iy1 = int(math.ceil(x1)) + pad, int(math.ceil(y1)) + pad
    # The in-image part of the gathered region [iy0, iy1) x [ix0, ix1), as slices of both.
    cx0, cy0 = min(max(ix0, 0), width), min(max(iy0, 0), height)
    cx1, cy1 = max(min(ix1, width), cx0), max(min(iy1, height), cy0)
    inside = img[cy0:cy1, cx0:cx1]
    if (cx0, cy0, cx1, cy1) == (ix0, iy0, ix1, iy1):
        region = inside
    else:
        region = np.empty((iy1 - iy0, ix1 - ix0, 3), np.uint8)
        region[:] = padding_fill(inside, img)
        if inside.size:  # (a box that misses the image entirely is all fill)
            region[cy0 - iy0 : cy1 - iy0, cx0 - ix0 : cx1 - ix0] = inside
    out = Image.fromarray(np.ascontiguousarray(region)).resize((size, size), resample=Image.Resampling.BILINEAR, box=(x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0))
    return np.asarray(out, dtype=np.uint8)


def image_rect_in_crop(image_sizes: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """(N, 4) rectangle ``(x0, y0, x1, y1)`` in crop px where each crop shows its image.

    ``image_sizes`` (N, 2) are the images' (width, height) (manifest columns
    ``width``, ``height``), ``boxes`` (N, 4) the crop boxes. The image covers
    ``[0, W) x [0, H)`` in original pixels; outside this rectangle the crop is
    padding (the constant fill), so it is the crop's validity mask. Not clipped
    to the crop: a rectangle wider than ``[0, S)`` means no padding on that side.
    """
    wh = np.asarray(image_sizes, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(wh) != len(b):
        raise ConfigError(f"got {len(wh)} image sizes for {len(b)} crop boxes", where="image_rect_in_crop")
    corners = np.stack([np.zeros_like(wh), wh], axis=1)  # (N, 2 corners, xy)
    return to_crop(corners, b, size).reshape(-1, 4)


def clip_rois_to_image(rois: np.ndarray, image_sizes: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Object RoIs (N, 4) in crop px intersected with the in-image rectangle of each crop.

    Every method samples or keeps points inside the RoI, so after this no
    padding pixel can become a landmark. An object box lying wholly outside
    its image (a broken annotation) leaves an empty intersection; that image
    gets its in-image rectangle instead, so its points are still image pixels.
    """
    r = np.asarray(rois, dtype=np.float64).reshape(-1, 4)
    rect = image_rect_in_crop(image_sizes, boxes, size)
    if len(rect) != len(r):
        raise ConfigError(f"got {len(r)} RoIs for {len(rect)} crop boxes", where="clip_rois_to_image")
    out = np.concatenate([np.maximum(r[:, :2], rect[:, :2]), np.minimum(r[:, 2:], rect[:, 2:])], axis=1)
    empty = (out[:, 2] <= out[:, 0]) | (out[:, 3] <= out[:, 1]) | ~np.isfinite(out).all(axis=1)
    out[empty] = rect[empty]
    return out.astype(np.float32)


def load_crops(
    manifest: Manifest,
    size: int,
    margin: float,
    indices: Sequence[int] | np.ndarray | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Crops of the manifest's images: ``(images (n, S, S, 3) uint8, boxes (n, 4) float32)``.

    ``boxes`` are the crop boxes in original pixels (what :func:`to_crop` /
    :func:`to_original` need). Images are decoded in a few threads (PIL
    releases the GIL while decoding). An image whose size differs from the
    manifest's raises: the manifest's coordinates would no longer match it.
    """
    idx = np.arange(len(manifest)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= len(manifest)):
        raise ConfigError(f"crop indices out of range for a manifest of {len(manifest)} images", where="indices")
    boxes = crop_boxes(manifest.boxes()[idx], margin) if idx.size else np.zeros((0, 4), np.float32)
    sub = manifest.frame.iloc[idx]
    paths = sub["path"].tolist()
    sizes = list(zip(sub["width"].astype(int), sub["height"].astype(int)))
    images = np.empty((len(idx), size, size, 3), dtype=np.uint8)

    def one(i: int) -> None:
        img = read_image(paths[i])
        if (img.shape[1], img.shape[0]) != sizes[i]:
            raise DatasetError(
                f"image is {img.shape[1]}x{img.shape[0]} but the manifest says {sizes[i][0]}x{sizes[i][1]}",
                where=paths[i], fix="the file changed since the manifest was built: rebuild it with `uld datasets manifest`",
            )
        images[i] = crop_image(img, boxes[i], size)

    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    bar = tqdm(total=len(idx), desc=f"crops {manifest.meta.name}", unit="img", disable=not progress or len(idx) < 64)
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        for _ in pool.map(one, range(len(idx))):
            bar.update(1)
    bar.close()
    return images, boxes
