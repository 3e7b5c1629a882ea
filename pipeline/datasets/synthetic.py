"""The embedded default dataset: procedurally varied, ray-cast 3-D heads.

Three layers:

* :func:`render_heads` -- images plus ground truth in memory (the renderer
  itself lives in :mod:`pipeline.datasets.synthetic_render`);
* :func:`generate_synthetic` -- writes a dataset folder (resumable, atomic);
* :class:`SyntheticLoader` -- reads that folder back into manifest rows.

Conventions (shared by all three)
---------------------------------
* Pixel coordinates: ``x`` right, ``y`` down, in pixels of the image; pixel
  ``(i, j)`` (row, column) has its centre at ``(j + 0.5, i + 0.5)``, so the
  image spans ``[0, size] x [0, size]``.
* Landmark names are from the **subject's** perspective, as in face
  datasets: ``left_eye`` is the subject's left eye, which appears on the
  image's right (larger ``x``) in a frontal view.
* ``yaw > 0``: the subject turns to their left (nose moves to image right);
  ``pitch > 0``: looks up; ``roll > 0``: top of the head tilts towards the
  subject's right shoulder (counter-clockwise in the image at yaw 0). Degrees.
  yaw ~ U(-90, 90), pitch ~ U(-15, 15), roll ~ U(-10, 10).
* ``visible`` is False when the landmark is self-occluded (the first surface
  along its pixel ray lies in front of it) or outside the image. Occluded
  landmarks keep their projected coordinates: the ground truth exists, it is
  just not seen.
* ``bbox`` (x0, y0, x1, y1) is the exact box of the projected head (all parts
  but the neck), clipped to the image; errors on this dataset are normalised
  by ``sqrt(w*h)`` of it, because the inter-ocular distance collapses at
  profile yaw.
* Randomness: image number ``index`` draws everything from
  ``np.random.default_rng([seed, index])``, so output does not depend on the
  batch size or order. The test split uses indices starting at
  :data:`TEST_INDEX_OFFSET`, disjoint from train for any ``n_train``, and the
  same test images whatever ``n_train`` is.

Dataset folder (written by :func:`generate_synthetic`)
------------------------------------------------------
::

    <out>/images/<image_id>.png   RGB, size x size; image_id = "train_000123" / "test_000007"
    <out>/annotations.csv          one row per image (columns below)
    <out>/meta.json                generator, version, parameters, landmark names, columns

``annotations.csv`` columns, in order: ``image_id, split, index, file`` (the
PNG path relative to the folder), then for every landmark name ``N`` in
:data:`LANDMARK_NAMES` order ``N_x, N_y, N_visible`` (pixels; visible 0/1),
then ``yaw, pitch, roll`` (degrees) and ``bbox_x0, bbox_y0, bbox_x1,
bbox_y1`` (pixels). Floats are written with 4 decimals.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.datasets import synthetic_render as _r
from pipeline.datasets.annotations import path_inside
from pipeline.datasets.base import DatasetLoader, DatasetMeta, SkipRecord, manifest_row
from pipeline.errors import ConfigError, DatasetError
from storage.atomic import atomic_path, write_bytes, write_json

LANDMARK_NAMES: tuple[str, ...] = _r.LANDMARK_NAMES

#: Bump when the renderer's output changes: a folder made by another version
#: is then reported as a different dataset instead of silently mixed.
GENERATOR_VERSION = "3"
GENERATOR_NAME = "uld.synthetic-heads"
#: First global index of the test split (train uses 0 .. n_train-1).
TEST_INDEX_OFFSET = 1_000_000_000
#: Images rendered (and written) per chunk; a chunk is the unit of resumption.
CHUNK = 256
#: Images rendered per vectorised batch inside :func:`render_heads` (bounds memory).
_RENDER_BATCH = 32

_PROGRESS_DIR = ".progress"  # per-chunk annotation parts while generating
_PARAMS_FILE = "generate.json"  # inside _PROGRESS_DIR: the parameters being generated

COLUMNS: tuple[str, ...] = (
    ("image_id", "split", "index", "file")
    + tuple(f"{n}_{k}" for n in LANDMARK_NAMES for k in ("x", "y", "visible"))
    + ("yaw", "pitch", "roll", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")
)


@dataclass
class SyntheticBatch:
    """Rendered heads and their ground truth (see the module docstring for conventions).

    ``images`` (n,size,size,3) uint8; ``landmarks`` (n,L,2) float32 pixels;
    ``visible`` (n,L) bool; ``yaw``/``pitch``/``roll`` (n,) float32 degrees;
    ``bbox`` (n,4) float32 head box (x0, y0, x1, y1) in pixels.
    """

    images: np.ndarray
    landmarks: np.ndarray
    visible: np.ndarray
    yaw: np.ndarray
    pitch: np.ndarray
    roll: np.ndarray
    bbox: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _rng_for(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def _check_render_args(n: int, size: int, seed: int, start_index: int) -> None:
    if n < 0:
        raise ConfigError(f"number of images must be >= 0, got {n}", fix="pass a non-negative count")
    if size < 16:
        raise ConfigError(f"image size must be >= 16 pixels, got {size}", where="--size", fix="use e.g. --size 64")
    if seed < 0 or start_index < 0:
        raise ConfigError(
            f"seed and start index must be >= 0, got seed={seed}, start_index={start_index}",
            where="--seed",
            fix="pass non-negative integers",
        )


def render_heads(
    n: int, size: int, seed: int, start_index: int = 0, pose: np.ndarray | None = None
) -> SyntheticBatch:
    """Render heads number ``start_index .. start_index+n-1`` of the stream ``seed``.

    Image ``k`` depends only on ``(seed, start_index + k)`` and ``size``:
    ``render_heads(4, 64, 0)`` equals the concatenation of ``render_heads(2, 64, 0)``
    and ``render_heads(2, 64, 0, start_index=2)`` byte for byte.

    ``pose`` (optional, (n, 3) or (3,) yaw/pitch/roll in degrees) replaces the
    random pose and keeps every other random choice, for pose sweeps and tests.
    """
    _check_render_args(n, size, seed, start_index)
    L = len(LANDMARK_NAMES)
    if n == 0:
        return SyntheticBatch(
            images=np.zeros((0, size, size, 3), np.uint8), landmarks=np.zeros((0, L, 2), np.float32),
            visible=np.zeros((0, L), bool), yaw=np.zeros(0, np.float32), pitch=np.zeros(0, np.float32),
            roll=np.zeros(0, np.float32), bbox=np.zeros((0, 4), np.float32),
        )
    if pose is not None:
        pose = np.broadcast_to(np.asarray(pose, dtype=np.float64), (n, 3))
    parts = []
    for b0 in range(0, n, _RENDER_BATCH):
        b1 = min(n, b0 + _RENDER_BATCH)
        idx = np.arange(start_index + b0, start_index + b1)
        parts.append(_r.render_batch(seed, idx, size, _rng_for, None if pose is None else pose[b0:b1]))
    return SyntheticBatch(
        images=np.concatenate([p.images for p in parts]),
        landmarks=np.concatenate([p.landmarks for p in parts]),
        visible=np.concatenate([p.visible for p in parts]),
        yaw=np.concatenate([p.yaw for p in parts]),
        pitch=np.concatenate([p.pitch for p in parts]),
        roll=np.concatenate([p.roll for p in parts]),
        bbox=np.concatenate([p.bbox for p in parts]),
    )


# --------------------------------------------------------------------------
# Writing a dataset folder
# --------------------------------------------------------------------------

def _params(n_train: int, n_test: int, size: int, seed: int) -> dict:
    return {
        "generator": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "n_train": int(n_train),
        "n_test": int(n_test),
        "size": int(size),
        "seed": int(seed),
    }


def _describe(p: dict) -> str:
    return ", ".join(f"{k}={p.get(k)!r}" for k in ("generator_version", "n_train", "n_test", "size", "seed"))


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Fixed settings so equal pixels give equal bytes.
    Image.fromarray(img, mode="RGB").save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def _fmt(v: float) -> str:
    return f"{float(v):.4f}"


def _rows(batch: SyntheticBatch, split: str, indices: np.ndarray, local0: int) -> list[list[str]]:
    rows = []
    for k in range(len(batch)):
        image_id = f"{split}_{local0 + k:06d}"
        row = [image_id, split, str(int(indices[k])), f"images/{image_id}.png"]
        for j in range(len(LANDMARK_NAMES)):
            row += [_fmt(batch.landmarks[k, j, 0]), _fmt(batch.landmarks[k, j, 1]), str(int(batch.visible[k, j]))]
        row += [_fmt(batch.yaw[k]), _fmt(batch.pitch[k]), _fmt(batch.roll[k])]
        row += [_fmt(v) for v in batch.bbox[k]]
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[list[str]], header: bool) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            if header:
                w.writerow(COLUMNS)
            w.writerows(rows)


def _existing_state(out_dir: Path, params: dict) -> str:
    """'complete' (same dataset already there), 'partial' (resume), or 'empty'.

    Raises ConfigError when the folder holds something else.
    """
    meta_path = out_dir / "meta.json"
    fix = f"pass --out with another folder, or delete {out_dir} to regenerate"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"existing meta.json is unreadable ({exc})", where=str(meta_path), fix=fix) from None
        have = {k: meta.get(k) for k in params}
        if have != params:
            raise ConfigError(
                f"the folder already holds a different synthetic dataset ({_describe(have)}; "
                f"requested {_describe(params)})",
                where=str(out_dir),
                fix=fix,
            )
        if (out_dir / "annotations.csv").is_file():
            return "complete"
        raise ConfigError(
            "the folder holds a synthetic dataset whose annotations.csv is missing",
            where=str(out_dir),
            fix=f"delete {out_dir} and generate again, or pass --out with another folder",
        )
    progress = out_dir / _PROGRESS_DIR / _PARAMS_FILE
    if progress.is_file():
        try:
            have = json.loads(progress.read_text())
        except (OSError, json.JSONDecodeError):
            have = {}
        if have != params:
            raise ConfigError(
                f"the folder holds an unfinished synthetic dataset with other parameters ({_describe(have)}; "
                f"requested {_describe(params)})",
                where=str(out_dir),
                fix=f"re-run with the same parameters to finish it, pass --out with another folder, or delete {out_dir}",
            )
        return "partial"
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(
            "the output folder is not empty and is not a synthetic dataset",
            where=str(out_dir),
            fix=fix,
        )
    return "empty"


def generate_synthetic(out_dir: Path, n_train: int, n_test: int, size: int, seed: int) -> Path:
    """Write (or finish, or find) the synthetic dataset in ``out_dir``; return ``out_dir``.

    Images are rendered and written in chunks of :data:`CHUNK`; each finished
    chunk leaves an annotation part under ``.progress/``, so an interrupted
    run resumes at the first unfinished chunk. ``annotations.csv`` and then
    ``meta.json`` are written last, atomically: a folder with ``meta.json``
    and ``annotations.csv`` is complete. Re-running with the same parameters
    returns at once; a folder holding a different dataset raises
    :class:`ConfigError`.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir).expanduser()
    for name, v in (("n_train", n_train), ("n_test", n_test)):
        if v < 0:
            raise ConfigError(f"{name} must be >= 0, got {v}", where=f"--{name.replace('_', '-')}", fix="pass a non-negative count")
    if n_train + n_test == 0:
        raise ConfigError("nothing to generate: n_train and n_test are both 0", where="--n-train/--n-test", fix="ask for some images")
    if n_train > TEST_INDEX_OFFSET:
        raise ConfigError(f"n_train must be <= {TEST_INDEX_OFFSET}", where="--n-train", fix="ask for fewer images")
    _check_render_args(0, size, seed, 0)
    params = _params(n_train, n_test, size, seed)
    state = _existing_state(out_dir, params)
    if state == "complete":
        return out_dir

    progress = out_dir / _PROGRESS_DIR
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    progress.mkdir(parents=True, exist_ok=True)
    if state == "empty":
        write_json(progress / _PARAMS_FILE, params)

    jobs = []  # (split, local start, global start, count)
    for split, count, offset in (("train", n_train, 0), ("test", n_test, TEST_INDEX_OFFSET)):
        for s0 in range(0, count, CHUNK):
            jobs.append((split, s0, offset + s0, min(CHUNK, count - s0)))
    part_paths = [progress / f"{split}_{s0:09d}.csv" for split, s0, _, _ in jobs]

    todo = [(j, p) for j, p in zip(jobs, part_paths) if not p.is_file()]
    bar = tqdm(total=n_train + n_test, desc="synthetic heads", unit="img", disable=None)
    bar.update(n_train + n_test - sum(j[3] for j, _ in todo))
    for (split, s0, g0, count), part in todo:
        batch = render_heads(count, size, seed, start_index=g0)
        for k in range(count):
            write_bytes(out_dir / "images" / f"{split}_{s0 + k:06d}.png", _png_bytes(batch.images[k]))
        _write_csv(part, _rows(batch, split, np.arange(g0, g0 + count), s0), header=False)
        bar.update(count)
    bar.close()

    # Assemble: annotations.csv, then meta.json (its presence marks completion).
    rows: list[list[str]] = []
    for part in part_paths:
        with open(part, newline="") as fh:
            rows.extend(csv.reader(fh))
    _write_csv(out_dir / "annotations.csv", rows, header=True)
    meta = dict(params)
    meta.update(
        {
            "landmark_names": list(LANDMARK_NAMES),
            "test_index_offset": TEST_INDEX_OFFSET,
            "columns": list(COLUMNS),
            "conventions": {
                "pixels": "x right, y down; pixel (i, j) centre at (j + 0.5, i + 0.5)",
                "left_right": "landmark names from the subject's perspective",
                "yaw": "> 0: subject turns to their left (nose to image right), degrees",
                "pitch": "> 0: subject looks up, degrees",
                "roll": "> 0: head top tilts to the subject's right shoulder, degrees",
                "visible": "0 when self-occluded or outside the image; coordinates are kept",
                "bbox": "x0, y0, x1, y1 of the projected head without the neck, pixels",
                "rng": "image with global index i uses numpy default_rng([seed, i]); test indices start at test_index_offset",
            },
        }
    )
    write_json(out_dir / "meta.json", meta)
    shutil.rmtree(progress, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------

class SyntheticLoader(DatasetLoader):
    """Reads a folder written by :func:`generate_synthetic`."""

    name = "synthetic"
    meta = DatasetMeta("synthetic", LANDMARK_NAMES, normalisation="bbox", norm_points=None, has_pose=True)
    description = "Procedural ray-cast 3-D heads with 12 named landmarks, visibility and pose (generated locally)."
    expected_layout = "<root>/meta.json, <root>/annotations.csv, <root>/images/<image_id>.png (from `uld datasets generate synthetic`)"

    def read_split(self, root: Path, split: str, skip_bad: bool, skipped: list[SkipRecord]) -> pd.DataFrame:
        meta_path = root / "meta.json"
        ann_path = root / "annotations.csv"
        gen_fix = "run `uld datasets generate synthetic` (or point --root at its output folder)"
        if not meta_path.is_file() or not ann_path.is_file():
            missing = meta_path if not meta_path.is_file() else ann_path
            raise DatasetError(f"{missing.name} not found: not a complete synthetic dataset", where=str(missing), fix=gen_fix)
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DatasetError(f"meta.json is unreadable ({exc})", where=str(meta_path), fix=gen_fix) from None
        if tuple(meta.get("landmark_names", ())) != LANDMARK_NAMES:
            raise DatasetError(
                "the dataset's landmark names differ from this version's",
                where=str(meta_path),
                fix="regenerate it with this version: delete the folder and run `uld datasets generate synthetic`",
            )
        size = meta.get("size")
        if not isinstance(size, int) or size <= 0:
            raise DatasetError(f"meta.json has no valid 'size' (got {size!r})", where=str(meta_path), fix=gen_fix)

        rows: list[dict] = []
        with open(ann_path, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or tuple(header) != COLUMNS:
                missing = [c for c in COLUMNS if c not in (header or [])]
                raise DatasetError(
                    "annotations.csv header does not match the synthetic format"
                    + (f" (missing: {', '.join(missing[:5])}{'...' if len(missing) > 5 else ''})" if missing else " (column order)"),
                    where=f"{ann_path}:1",
                    fix=gen_fix,
                )
            for line_no, rec in enumerate(reader, start=2):
                if len(rec) >= 2 and rec[1] != split:
                    continue
                try:
                    rows.append(self._row(root, rec, size, split))
                except DatasetError as err:
                    if not skip_bad:
                        raise DatasetError(err.what, where=f"{ann_path}:{line_no}", fix=err.fix) from None
                    skipped.append(SkipRecord(source=str(ann_path), line=line_no, reason=err.what))
        from storage.tables import SCHEMAS

        return pd.DataFrame(rows, columns=SCHEMAS["manifest"].names)

    @staticmethod
    def _row(root: Path, rec: list[str], size: int, split: str) -> dict:
        fix = "regenerate the dataset, or pass --skip-bad to leave this row out"
        if len(rec) != len(COLUMNS):
            raise DatasetError(f"row has {len(rec)} fields, expected {len(COLUMNS)}", fix=fix)
        d = dict(zip(COLUMNS, rec))
        try:
            nums = {k: float(v) for k, v in d.items() if k not in ("image_id", "split", "file") and not k.endswith("_visible")}
            vis = [d[f"{n}_visible"] for n in LANDMARK_NAMES]
        except ValueError as exc:
            raise DatasetError(f"malformed number ({exc})", fix=fix) from None
        if any(v not in ("0", "1") for v in vis):
            raise DatasetError(f"visibility flags must be 0 or 1, got {vis}", fix=fix)
        if not all(math.isfinite(v) for v in nums.values()):
            raise DatasetError("non-finite number in row", fix=fix)
        image = path_inside(root, d["file"])
        if image is None:
            raise DatasetError(f"image path {d['file']!r} points outside the dataset folder {root}", fix=fix)
        if not image.is_file():
            raise DatasetError(f"image file not found: {image}", fix=fix)
        try:
            with Image.open(image) as im:
                w, h = im.size
        except OSError as exc:
            raise DatasetError(f"unreadable image {image} ({exc})", fix=fix) from None
        if (w, h) != (size, size):
            raise DatasetError(f"image {image} is {w}x{h}, meta.json says {size}x{size}", fix=fix)
        lm = np.array([[nums[f"{n}_x"], nums[f"{n}_y"]] for n in LANDMARK_NAMES], np.float32)
        return manifest_row(
            image_id=d["image_id"],
            split=split,
            path=str(image.resolve()),
            width=w,
            height=h,
            landmarks=lm,
            visible=np.array([v == "1" for v in vis]),
            bbox=(nums["bbox_x0"], nums["bbox_y0"], nums["bbox_x1"], nums["bbox_y1"]),
            yaw=nums["yaw"],
            pitch=nums["pitch"],
            roll=nums["roll"],
        )
