"""300-W / iBUG 68-point faces (``*.pts`` next to each image).

Layout (``--root`` points here, searched recursively)::

    afw/*.jpg + *.pts                 helen/trainset/  helen/testset/
    lfpw/trainset/  lfpw/testset/     ibug/            (or 300W/01_Indoor, 02_Outdoor)

A ``.pts`` file is either the iBUG format::

    version: 1
    n_points: 68
    {
    x y          (68 lines)
    }

or a header-less copy with just the 68 ``x y`` lines. Points follow the iBUG
68 scheme (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67);
errors are normalised by the outer eye corners 36 and 45. Coordinates are
kept as written (the release's convention, nominally 1-based) -- a constant
sub-pixel offset has no effect on normalised errors.

Split rule (the usual "full" 300-W protocol): an image is ``test`` when a
folder on its path (relative to the root) is named ``test``, ``testset``,
``ibug``, ``01_Indoor`` or ``02_Outdoor`` (case-insensitive) -- i.e. the
common (HELEN/LFPW test sets) and challenging (iBUG) subsets, or the official
300-W indoor/outdoor set -- and ``train`` otherwise (AFW, HELEN/LFPW train).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.datasets.annotations import (
    BadItem, Problems, check_in_image, checked_size, expand_box, frame, in_frame, parse_numbers, read_lines, relative_key,
)
from pipeline.datasets.base import DatasetLoader, DatasetMeta, SkipRecord, manifest_row
from pipeline.errors import DatasetError

FACE68_NAMES: tuple[str, ...] = (
    tuple(f"jaw_{i:02d}" for i in range(17))
    + tuple(f"brow_a_{i}" for i in range(5))
    + tuple(f"brow_b_{i}" for i in range(5))
    + tuple(f"nose_bridge_{i}" for i in range(4))
    + tuple(f"nose_base_{i}" for i in range(5))
    + tuple(f"eye_a_{i}" for i in range(6))
    + tuple(f"eye_b_{i}" for i in range(6))
    + tuple(f"lip_outer_{i:02d}" for i in range(12))
    + tuple(f"lip_inner_{i}" for i in range(8))
)
"""Names of the 68 iBUG points. ``_a`` is the image-left brow/eye (points 17-21,
36-41), ``_b`` the image-right one, to avoid the subject/viewer ambiguity."""

#: 68 points -> face box: the jaw line bounds the sides and chin, the brows the
#: top; the forehead above the brows is about a fifth of the landmark box.
FACE68_GROW: tuple[float, float, float, float] = (0.05, 0.2, 0.05, 0.05)

_TEST_FOLDERS = {"test", "testset", "ibug", "01_indoor", "02_outdoor"}
_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
_LAYOUT = "<root>/**/NAME.pts (68 points, with or without the 'version: 1 / n_points: 68 / { }' header) next to NAME.jpg or NAME.png"


def parse_pts(path: Path, expected: int = 68, dataset: str = "300w") -> np.ndarray:
    """(expected, 2) points of an iBUG ``.pts`` file, header or not; :class:`BadItem` otherwise."""
    numbered = [(i, ln.strip()) for i, ln in enumerate(read_lines(path, dataset), start=1) if ln.strip()]
    if not numbered:
        raise BadItem("empty .pts file", path, 1, fix="restore the file")
    has_header = any(t.startswith(("version", "n_points", "{")) for _, t in numbered[:4])
    if has_header:
        declared = None
        for i, t in numbered:
            if t.startswith("n_points"):
                try:
                    declared = int(t.split(":", 1)[1])
                except (IndexError, ValueError):
                    raise BadItem(f"malformed header line {t!r}", path, i, fix="write it as 'n_points: 68'") from None
        opens = [k for k, (_, t) in enumerate(numbered) if t == "{"]
        closes = [k for k, (_, t) in enumerate(numbered) if t == "}"]
        if not opens or not closes or closes[0] < opens[0]:
            raise BadItem("header present but the '{' ... '}' block is missing or unbalanced", path, numbered[0][0],
                          fix="put the points between a '{' line and a '}' line")
        body = numbered[opens[0] + 1 : closes[0]]
        if declared is not None and declared != len(body):
            raise BadItem(f"header says n_points: {declared} but the block has {len(body)} lines", path,
                          numbered[opens[0]][0], fix="fix n_points or the point lines")
    else:
        body = numbered
    if len(body) != expected:
        raise BadItem(f"expected {expected} points, found {len(body)}", path, body[0][0] if body else 1,
                      fix=f"this dataset needs {expected}-point annotations")
    points = np.empty((expected, 2))
    for k, (i, t) in enumerate(body):
        points[k] = parse_numbers(t.split(), 2, path, i, f"point {k}")
    return points


def write_pts(path: Path, points: np.ndarray, header: bool = True) -> Path:
    """Write ``points`` (n, 2) as an iBUG ``.pts`` file (used by tests and exports)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    lines = [f"{x:.3f} {y:.3f}" for x, y in pts]
    if header:
        lines = ["version: 1", f"n_points: {len(pts)}", "{", *lines, "}"]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def face68_row(image: Path, root: Path, split: str, points: np.ndarray, width: int, height: int) -> dict:
    """The manifest row of a 68-point face (300-W, LS3D-W, 300W-LP): grown landmark box, estimated yaw."""
    yaw = float(estimate_yaw_68(points)[0])
    return manifest_row(image_id=relative_key(image, root), split=split, path=str(image.absolute()),
                        width=width, height=height, landmarks=points, visible=in_frame(points, width, height),
                        bbox=expand_box(points, FACE68_GROW), box_source="landmarks", yaw=yaw if math.isfinite(yaw) else math.nan)


def estimate_yaw_68(points: np.ndarray) -> np.ndarray:
    """Approximate yaw in degrees from 68 points (N, 68, 2), for pose *binning* only.

    Model: the jaw ends (points 0 and 16) sit at +-a on the ear line and the
    nose tip (30) a depth d in front of it; turning by yaw t projects them to a
    half-width ``w = a cos t`` and a nose offset ``o = d sin t`` from the jaw
    midpoint, so ``tan t = (o / w) * (a / d)``. ``a / d = 0.7`` is an average
    adult head. Positive = nose towards the image right. Roll is ignored, so
    this is a coarse estimate (good to ~10-15 degrees on near-upright faces),
    enough for the 5 yaw bins of 36 degrees used in the analysis; NaN when a
    needed point is missing.
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 68, 2)
    half_width = np.abs(p[:, 16, 0] - p[:, 0, 0]) / 2.0
    offset = p[:, 30, 0] - (p[:, 0, 0] + p[:, 16, 0]) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        yaw = np.degrees(np.arctan2(0.7 * offset, half_width))
    return yaw


def is_test_path(key: str) -> bool:
    """The 300-W split rule (see the module docstring)."""
    return any(part.lower() in _TEST_FOLDERS for part in Path(key).parts[:-1])


def find_image(directory: Path, stem: str) -> Path | None:
    """``directory/stem`` + the first image suffix that exists, or None."""
    for suffix in _IMAGE_SUFFIXES:
        candidate = directory / (stem + suffix)
        if candidate.is_file():
            return candidate
    return None


class W300Loader(DatasetLoader):
    name = "300w"
    meta = DatasetMeta(name="300w", landmark_names=FACE68_NAMES, normalisation="interocular", norm_points=(36, 45))
    description = "300-W / iBUG 68-point faces (.pts); test = HELEN/LFPW test sets + iBUG (full set)"
    expected_layout = _LAYOUT

    def read_split(self, root: Path, split: str, skip_bad: bool, skipped: list[SkipRecord]) -> pd.DataFrame:
        problems = Problems(self.name, skip_bad, skipped)
        annotations = sorted(p for p in root.rglob("*.pts") if p.is_file())
        if not annotations:
            raise DatasetError("300w: no .pts annotation files found", where=str(root),
                               fix=f"point --root at the 300-W folder laid out as: {_LAYOUT}")
        rows = []
        for pts in annotations:
            key_base = relative_key(pts, root)
            if is_test_path(key_base) != (split == "test"):
                continue
            try:
                image = find_image(pts.parent, pts.stem)
                if image is None:
                    raise BadItem(f"no image {pts.stem}.jpg/.png next to the annotation", pts, 0,
                                  fix="restore the image or remove the .pts file")
                points = parse_pts(pts, 68, self.name)
                width, height = checked_size(image, pts, 0)
                check_in_image(points, width, height, pts, 0)
            except BadItem as item:
                problems.report(item)
                continue
            rows.append(face68_row(image, root, split, points, width, height))
        return frame(rows)
