"""Shared parsing and validation for the real-format loaders.

Every loader follows the same discipline (see :class:`DatasetLoader`): a bad
item either stops the load with a :class:`DatasetError` that names the file and
line and says how to fix it, or -- with ``skip_bad`` -- becomes a
:class:`SkipRecord` and the load goes on. Parsers raise :class:`BadItem`; the
loader's loop hands it to :class:`Problems`, which applies that rule in one
place so no loader can drop something silently.

Also here: the deterministic hold-out rule used by datasets without an official
test split, the object-box rule (landmark box grown by a fraction), and the
out-of-image tolerance.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.datasets.base import SkipRecord
from pipeline.datasets.images import image_size
from pipeline.errors import DatasetError

#: Hold-out used when a layout has no official test split (see :func:`in_holdout`).
HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 0

MANIFEST_COLUMNS = [
    "image_id", "split", "path", "width", "height", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1",
    "box_source", "landmarks", "visible", "yaw", "pitch", "roll", "pose_class",
]

_SKIP_HINT = "or pass --skip-bad (skip_bad=True) to leave this item out and record it in skipped.parquet"


class BadItem(Exception):
    """One unusable item: what is wrong, in which file and line, and the fix."""

    def __init__(self, what: str, source: str | Path, line: int = 0, fix: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.source = str(source)
        self.line = int(line)
        self.fix = fix

    @property
    def where(self) -> str:
        return f"{self.source}, line {self.line}" if self.line > 0 else self.source


class Problems:
    """Turns :class:`BadItem` into an error, or into a skip record with ``skip_bad``."""

    def __init__(self, dataset: str, skip_bad: bool, skipped: list[SkipRecord]) -> None:
        self.dataset = dataset
        self.skip_bad = skip_bad
        self.skipped = skipped

    def report(self, item: BadItem) -> None:
        if self.skip_bad:
            self.skipped.append(SkipRecord(source=item.source, line=item.line, reason=item.what))
            return
        fix = f"{item.fix}; {_SKIP_HINT}" if item.fix else _SKIP_HINT
        raise DatasetError(f"{self.dataset}: {item.what}", where=item.where, fix=fix)


def parse_numbers(tokens: Sequence[str], count: int, source: str | Path, line: int, what: str) -> np.ndarray:
    """``count`` finite floats from ``tokens``; a :class:`BadItem` otherwise."""
    if len(tokens) != count:
        raise BadItem(
            f"expected {count} numbers for {what}, found {len(tokens)}",
            source, line, fix="repair or remove the line so it has the documented number of fields",
        )
    try:
        values = np.array([float(t) for t in tokens], dtype=np.float64)
    except ValueError:
        bad = next(t for t in tokens if not _is_float(t))
        raise BadItem(f"{what} contains a non-number {bad!r}", source, line, fix="repair the line") from None
    if not np.all(np.isfinite(values)):
        raise BadItem(f"{what} contains NaN or infinity", source, line, fix="repair the line")
    return values


def _is_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def checked_size(image: Path, source: str | Path, line: int) -> tuple[int, int]:
    """Image (width, height) from its header; missing/corrupt -> :class:`BadItem`.

    ``source``/``line`` are the annotation that refers to the image, so the
    error points at both.
    """
    try:
        return image_size(image)
    except DatasetError as exc:
        where = f"{source}, line {line}" if line > 0 else str(source)
        raise BadItem(f"{exc.what}: {image} (referenced from {where})", image, 0,
                      fix="restore the image file, or fix the path in the annotation") from None


def point_tolerance(width: int, height: int, fraction: float = 0.05) -> float:
    """How far (px) a landmark may lie outside the image before it counts as wrong.

    Annotators click on the border of objects cut by the frame, and some
    releases store 1-based or sub-pixel-shifted coordinates, so points a few
    pixels outside are normal; by default 5% of the larger side (at least 3 px)
    accepts those and still catches swapped x/y, wrong image, or garbage
    values. Loaders whose release annotates parts beyond the frame on purpose
    pass a larger ``fraction`` (CatHeads: extrapolated ear tips).
    """
    return max(3.0, fraction * max(width, height))


def check_in_image(
    points: np.ndarray, width: int, height: int, source: str | Path, line: int, fraction: float = 0.05
) -> None:
    """Raise :class:`BadItem` naming the first point outside the image (+ tolerance)."""
    tol = point_tolerance(width, height, fraction)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    present = ~np.isnan(pts).any(axis=1)
    outside = present & (
        (pts[:, 0] < -tol) | (pts[:, 0] > width + tol) | (pts[:, 1] < -tol) | (pts[:, 1] > height + tol)
    )
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        raise BadItem(
            f"landmark {k} at ({pts[k, 0]:.1f}, {pts[k, 1]:.1f}) lies outside the {width}x{height} image "
            f"(tolerance {tol:.1f} px); {int(outside.sum())} point(s) out of range",
            source, line, fix="check that the annotation belongs to this image and that x and y are not swapped",
        )


def in_frame(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """(L,) bool: the point is annotated and inside the image frame [0, W] x [0, H].

    Loaders store this as ``visible``: a point accepted within the tolerance
    but outside the frame (an ear tip cut off by the photo's edge) keeps its
    coordinates but cannot be seen, so it must not be treated as an observed
    image location.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    with np.errstate(invalid="ignore"):
        return (
            ~np.isnan(pts).any(axis=1)
            & (pts[:, 0] >= 0) & (pts[:, 0] <= width) & (pts[:, 1] >= 0) & (pts[:, 1] <= height)
        )


def expand_box(points: np.ndarray, grow: float | tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """Box of the present ``points`` grown by fractions of its longer side.

    ``grow`` is one fraction for all sides or (left, top, right, bottom). Using
    the longer side (not w and h separately) keeps the growth stable for
    near-degenerate boxes such as a frontal face's five points, whose height
    can be small relative to their width.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    pts = pts[~np.isnan(pts).any(axis=1)]
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    side = max(x1 - x0, y1 - y0, 1.0)
    gl, gt, gr, gb = (grow, grow, grow, grow) if isinstance(grow, (int, float)) else grow
    return (float(x0 - gl * side), float(y0 - gt * side), float(x1 + gr * side), float(y1 + gb * side))


def in_holdout(key: str, fraction: float = HOLDOUT_FRACTION, seed: int = HOLDOUT_SEED) -> bool:
    """Whether item ``key`` (its path relative to the dataset root) is held out as test.

    The rule: the first 8 bytes of BLAKE2b(``"{seed}:{key}"``) read as an
    unsigned integer, divided by 2**64, is below ``fraction``. It depends only
    on the item's own relative path -- not on file order, on the other items,
    or on the machine -- so adding or removing images never moves the others
    between train and test.
    """
    digest = hashlib.blake2b(f"{seed}:{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < fraction


def path_inside(base: Path, rel: str) -> Path | None:
    """``base / rel`` when ``rel`` (a path read from an annotation file) stays inside ``base``, else None.

    Refused: absolute paths (``/x``, ``C:\\x``) and any ``..`` that climbs above
    ``base`` (``..\\..\\etc\\x.jpg``), backslashes counting as separators. The check is
    lexical on purpose: a symlink the user placed inside the dataset folder (image
    folders on another disk are common) is the user's choice and keeps working;
    what an annotation file says is not trusted to name files outside the folder.
    """
    text = rel.replace("\\", "/")
    drive = len(text) >= 2 and text[1] == ":" and text[0].isalpha()  # C:/... (Windows)
    if text.startswith("/") or drive:
        return None
    norm = posixpath.normpath(text)
    if norm in (".", "..") or norm.startswith("../"):
        return None
    return Path(base) / norm


def image_path(base: Path, rel: str, source: str | Path, line: int) -> Path:
    """:func:`path_inside`, or a :class:`BadItem` naming the annotation file and line."""
    path = path_inside(base, rel)
    if path is None:
        raise BadItem(
            f"image path {rel!r} points outside the dataset folder {base}",
            source, line, fix="annotation paths must be relative to the dataset folder and stay inside it; repair the line",
        )
    return path


def relative_key(path: Path, root: Path) -> str:
    """POSIX relative path of ``path`` under ``root`` (the image id of folder layouts)."""
    return Path(path).relative_to(root).as_posix()


def frame(rows: list[dict]) -> pd.DataFrame:
    """Manifest frame with every schema column, also when ``rows`` is empty."""
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def require_file(path: Path, what: str, layout: str, dataset: str) -> Path:
    """A required annotation file; :class:`DatasetError` naming it and the layout otherwise."""
    if not path.is_file():
        raise DatasetError(
            f"{dataset}: {what} not found",
            where=str(path),
            fix=f"point --root at the dataset folder laid out as: {layout}",
        )
    return path


def read_lines(path: Path, dataset: str) -> list[str]:
    """Text lines of an annotation file (any newline style, BOM tolerated)."""
    try:
        text = path.read_text(encoding="utf-8-sig", errors="strict")
    except UnicodeDecodeError:
        # Old releases are Latin-1 at worst; names are only used as paths.
        text = path.read_text(encoding="latin-1")
    except OSError as exc:
        raise DatasetError(f"{dataset}: cannot read annotation file ({exc})", where=str(path), fix="check permissions") from None
    return text.splitlines()

