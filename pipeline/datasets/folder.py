"""Any folder of images, without labels (L = 0 landmarks).

For discovering landmarks on a new category: every image under ``--root``
(recursively; hidden files and folders ignored; suffixes in
:data:`pipeline.datasets.images.IMAGE_SUFFIXES`, any case) becomes one row whose
object box is the whole image. ``test`` is the seeded 10% hold-out of
:func:`pipeline.datasets.annotations.in_holdout` keyed by the relative path
(so discovered landmarks can be inspected on images not clustered), ``train``
the rest. With no labels there is nothing to evaluate; errors would be
normalised by the box (``bbox``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.datasets.annotations import BadItem, Problems, checked_size, frame, in_holdout, relative_key
from pipeline.datasets.base import DatasetLoader, DatasetMeta, SkipRecord, manifest_row
from pipeline.datasets.images import IMAGE_SUFFIXES
from pipeline.errors import DatasetError

_LAYOUT = "<root>/**/*.jpg|png|... (any image files, any sub-folders; no annotations)"


def unlabelled_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The object box of an image without labels: the whole image.

    The one rule for unlabelled images: this loader's manifests and
    ``uld predict`` on new images both use it, so a folder's crops are the same
    whichever way its images come in.
    """
    return (0.0, 0.0, float(width), float(height))


def list_images(root: Path) -> list[Path]:
    """Image files under ``root``, sorted, skipping hidden files and folders."""
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


class FolderLoader(DatasetLoader):
    name = "folder"
    meta = DatasetMeta(name="folder", landmark_names=(), normalisation="bbox", norm_points=None)
    description = "Any folder of images, no labels; object box = whole image; test = seeded 10% hold-out"
    expected_layout = _LAYOUT

    def read_split(self, root: Path, split: str, skip_bad: bool, skipped: list[SkipRecord]) -> pd.DataFrame:
        problems = Problems(self.name, skip_bad, skipped)
        images = list_images(root)
        if not images:
            raise DatasetError("folder: no image files found", where=str(root),
                               fix=f"point --root at a folder of images ({', '.join(IMAGE_SUFFIXES)})")
        rows = []
        for image in images:
            key = relative_key(image, root)
            if in_holdout(key) != (split == "test"):
                continue
            try:
                width, height = checked_size(image, image, 0)
            except BadItem as item:
                problems.report(item)
                continue
            rows.append(manifest_row(image_id=key, split=split, path=str(image.absolute()), width=width,
                                     height=height, landmarks=np.zeros((0, 2), np.float32),
                                     bbox=unlabelled_box(width, height), box_source="image"))
        return frame(rows)
