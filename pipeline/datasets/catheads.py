"""CatHeads (Zhang et al. 2008) in its release layout.

Layout (``--root`` points here; sub-folders such as ``CAT_00/`` .. ``CAT_06/``
are searched recursively)::

    NAME.jpg
    NAME.jpg.cat      one line: "9 x1 y1 x2 y2 ... x9 y9"

Points: left eye, right eye, mouth, left ear 1-3, right ear 1-3 (as in the
release: "left"/"right" are the image's left/right). Errors are normalised by
the inter-ocular distance (points 0, 1). Ear tips outside the photo are part
of the release (see :data:`CAT_OUTSIDE`) and are stored with ``visible`` False.

CatHeads has no official split in this layout, so ``test`` is the seeded 10%
hold-out of :func:`pipeline.datasets.annotations.in_holdout` keyed by the image
path relative to the root, and ``train`` is the rest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.datasets.annotations import (
    BadItem, Problems, check_in_image, checked_size, expand_box, frame, in_frame, in_holdout, parse_numbers,
    read_lines, relative_key,
)
from pipeline.datasets.base import DatasetLoader, DatasetMeta, SkipRecord, manifest_row
from pipeline.errors import DatasetError

CAT_NAMES: tuple[str, ...] = (
    "left_eye", "right_eye", "mouth",
    "left_ear_1", "left_ear_2", "left_ear_3",
    "right_ear_1", "right_ear_2", "right_ear_3",
)

#: Nine cat points -> head box. Ear tips bound the top and the ear bases the
#: sides, so little is added there; the chin lies below the mouth point by
#: about a fifth of the head.
CAT_GROW: tuple[float, float, float, float] = (0.1, 0.05, 0.1, 0.2)

#: The release annotates ear tips cut off by the photo's edge by extrapolation:
#: the development copy has 4 of 100 images with ear points up to 92 px above
#: a 375 px frame. Such points are accepted up to half the image size outside
#: (beyond that the file is wrong) and stored with ``visible`` False.
CAT_OUTSIDE = 0.5

_LAYOUT = "<root>/**/NAME.jpg with NAME.jpg.cat next to it ('9 x1 y1 ... x9 y9')"


def parse_cat(path: Path, dataset: str = "catheads") -> np.ndarray:
    """(9, 2) points of a ``.cat`` file; :class:`BadItem` (line 1) if malformed."""
    lines = [ln for ln in read_lines(path, dataset) if ln.strip()]
    if not lines:
        raise BadItem("empty .cat annotation file", path, 1, fix="restore the file from the CatHeads release")
    tokens = " ".join(lines).split()
    if tokens[0] != "9":
        raise BadItem(f"first number must be the point count 9, found {tokens[0]!r}", path, 1,
                      fix="restore the file from the CatHeads release")
    values = parse_numbers(tokens[1:], 18, path, 1, "the 9 cat points (18 numbers)")
    return values.reshape(9, 2)


class CatHeadsLoader(DatasetLoader):
    name = "catheads"
    meta = DatasetMeta(name="catheads", landmark_names=CAT_NAMES, normalisation="interocular", norm_points=(0, 1))
    description = "CatHeads: cat faces with 9 points (eyes, mouth, ears); test = seeded 10% hold-out"
    expected_layout = _LAYOUT

    def read_split(self, root: Path, split: str, skip_bad: bool, skipped: list[SkipRecord]) -> pd.DataFrame:
        problems = Problems(self.name, skip_bad, skipped)
        cats = sorted(p for p in root.rglob("*.cat") if p.is_file())
        if not cats:
            raise DatasetError("catheads: no .cat annotation files found", where=str(root),
                               fix=f"point --root at the CatHeads folder laid out as: {_LAYOUT}")
        rows = []
        for cat in cats:
            image = cat.with_name(cat.name[: -len(".cat")])
            key = relative_key(image, root)
            if in_holdout(key) != (split == "test"):
                continue
            try:
                points = parse_cat(cat, self.name)
                width, height = checked_size(image, cat, 1)
                check_in_image(points, width, height, cat, 1, fraction=CAT_OUTSIDE)
            except BadItem as item:
                problems.report(item)
                continue
            rows.append(manifest_row(image_id=key, split=split, path=str(image.absolute()), width=width,
                                     height=height, landmarks=points, visible=in_frame(points, width, height),
                                     bbox=expand_box(points, CAT_GROW), box_source="landmarks"))
        return frame(rows)
