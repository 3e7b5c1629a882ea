"""MTFL and AFLW (the MTFL release layout).

Layout (``--root`` points here)::

    training.txt            10,000 lines (LFW + web faces)
    testing.txt             2,995 lines, ``AFLW/...`` paths (optional: often withheld)
    lfw_5590/  net_7876/  AFLW/   the images, paths as written in the txt files

Each line: ``path x1 x2 x3 x4 x5 y1 y2 y3 y4 y5 gender smile glasses pose`` with
a Windows path relative to the root (backslashes), points in the order left
eye, right eye, nose, left mouth corner, right mouth corner; gender 1/2 (male /
female), smile 1/2 (yes / no), glasses 1/2 (yes / no), head pose 1..5 (left
profile, left, frontal, right, right profile) stored as ``pose_class`` 0..4.
Yaw angles are not annotated, so ``yaw`` stays NaN.

Splits:

* ``mtfl``: with ``testing.txt``, ``train`` = all of ``training.txt`` and ``test``
  = all of ``testing.txt``. Without it, ``test`` = the items of ``training.txt``
  selected by the deterministic hold-out rule of
  :func:`pipeline.datasets.annotations.in_holdout` (10%, keyed by the image
  path, seed 0) and ``train`` = the rest.
* ``aflw``: ``train`` = all of ``training.txt`` (MTFL training set), ``test`` =
  the ``AFLW/...`` lines of ``testing.txt`` (the standard AFLW benchmark of
  unsupervised landmark papers); no hold-out fallback, since numbers on a
  substitute set must not be reported as AFLW.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.datasets.annotations import (
    BadItem, Problems, check_in_image, checked_size, expand_box, frame, image_path, in_frame, in_holdout, parse_numbers,
    read_lines, require_file,
)
from pipeline.datasets.base import DatasetLoader, DatasetMeta, SkipRecord, manifest_row
from pipeline.errors import DatasetError

FACE5_NAMES: tuple[str, ...] = ("left_eye", "right_eye", "nose", "left_mouth_corner", "right_mouth_corner")

#: Five face points -> face box. The points span roughly eye-to-mouth (about one
#: inter-ocular distance each way); a face reaches about half that again to each
#: side (ears/cheeks), further up (forehead) and half down (chin). Fractions of
#: the landmark box's longer side: (left, top, right, bottom).
FACE5_GROW: tuple[float, float, float, float] = (0.5, 0.7, 0.5, 0.5)

_LAYOUT = (
    "<root>/training.txt and optionally <root>/testing.txt (MTFL release), with the image folders "
    "(lfw_5590/, net_7876/, AFLW/) next to them as the txt paths say"
)


def _image_key(raw: str) -> str:
    """MTFL paths are Windows-style; the key is the POSIX relative path."""
    return raw.strip().replace("\\", "/").lstrip("/")


def read_mtfl_file(
    root: Path,
    txt: Path,
    split: str,
    keep: Callable[[str], bool],
    problems: Problems,
) -> list[dict]:
    """Manifest rows of the lines of ``txt`` whose image key passes ``keep``."""
    rows: list[dict] = []
    seen: dict[str, int] = {}
    for lineno, text in enumerate(read_lines(txt, problems.dataset), start=1):
        tokens = text.split()
        if not tokens:
            continue
        key = _image_key(tokens[0])
        if not keep(key):
            continue
        try:
            if key in seen:
                raise BadItem(f"image {key!r} is listed twice (first on line {seen[key]})", txt, lineno,
                              fix="remove the duplicate line")
            seen[key] = lineno
            values = parse_numbers(tokens[1:], 14, txt, lineno, "an MTFL line (10 coordinates + 4 attributes)")
            xs, ys, attrs = values[0:5], values[5:10], values[10:14]
            if not np.all(np.isin(attrs[:3], (1, 2))):
                raise BadItem(f"gender/smile/glasses must be 1 or 2, got {attrs[:3].tolist()}", txt, lineno,
                              fix="repair the attribute columns")
            if attrs[3] not in (1, 2, 3, 4, 5):
                raise BadItem(f"head pose must be 1..5, got {attrs[3]:g}", txt, lineno, fix="repair the pose column")
            image = image_path(root, key, txt, lineno)
            width, height = checked_size(image, txt, lineno)
            points = np.stack([xs, ys], axis=1)
            check_in_image(points, width, height, txt, lineno)
        except BadItem as item:
            problems.report(item)
            continue
        row = manifest_row(
            image_id=key, split=split, path=str(image.absolute()), width=width, height=height,
            landmarks=points, visible=in_frame(points, width, height), bbox=expand_box(points, FACE5_GROW), box_source="landmarks",
            pose_class=int(attrs[3]) - 1,
        )
        row.update(gender=int(attrs[0]), smile=int(attrs[1]) == 1, glasses=int(attrs[2]) == 1)
        rows.append(row)
    return rows


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = frame(rows)
    for col, dtype in (("gender", "int8"), ("smile", "bool"), ("glasses", "bool")):
        df[col] = pd.Series([r[col] for r in rows], dtype=dtype)
    return df


class MTFLLoader(DatasetLoader):
    name = "mtfl"
    meta = DatasetMeta(name="mtfl", landmark_names=FACE5_NAMES, normalisation="interocular", norm_points=(0, 1))
    description = "MTFL faces (LFW + web), 5 points, head-pose class; test = testing.txt or a seeded 10% hold-out"
    expected_layout = _LAYOUT

    def read_split(self, root: Path, split: str, skip_bad: bool, skipped: list[SkipRecord]) -> pd.DataFrame:
        problems = Problems(self.name, skip_bad, skipped)
        training = require_file(root / "training.txt", "MTFL annotation file training.txt", _LAYOUT, self.name)
        testing = root / "testing.txt"
        if testing.is_file():
            txt, keep = (training if split == "train" else testing), (lambda key: True)
        elif split == "train":
            txt, keep = training, (lambda key: not in_holdout(key))
        else:
            txt, keep = training, in_holdout
        return _frame(read_mtfl_file(root, txt, split, keep, problems))


class AFLWLoader(DatasetLoader):
    name = "aflw"
    meta = DatasetMeta(name="aflw", landmark_names=FACE5_NAMES, normalisation="interocular", norm_points=(0, 1))
    description = "AFLW benchmark in the MTFL release: train = MTFL training.txt, test = AFLW/ lines of testing.txt"
    expected_layout = _LAYOUT + "; the test split needs testing.txt and the AFLW/ images"

    def read_split(self, root: Path, split: str, skip_bad: bool, skipped: list[SkipRecord]) -> pd.DataFrame:
        problems = Problems(self.name, skip_bad, skipped)
        if split == "train":
            training = require_file(root / "training.txt", "MTFL annotation file training.txt", _LAYOUT, self.name)
            return _frame(read_mtfl_file(root, training, split, lambda key: True, problems))
        testing = root / "testing.txt"
        if not testing.is_file():
            raise DatasetError(
                "aflw: the AFLW test split needs testing.txt from the MTFL release, which is not there",
                where=str(testing),
                fix="copy testing.txt and the AFLW/ image folder of the MTFL release into --root "
                "(or use dataset 'mtfl', which falls back to a seeded hold-out of training.txt)",
            )
        rows = read_mtfl_file(root, testing, split, lambda key: key.lower().startswith("aflw/"), problems)
        if not rows and not skipped:
            raise DatasetError("aflw: testing.txt has no AFLW/... lines", where=str(testing),
                               fix="use the testing.txt of the MTFL release (2,995 AFLW/ lines)")
        return _frame(rows)
