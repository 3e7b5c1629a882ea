"""The dataset contract: metadata, the canonical manifest, and the loader interface.

A loader reads one real on-disk layout and returns rows of the canonical
manifest (see ``storage.tables.SCHEMAS['manifest']``). Coordinates are in
original image pixels; ``landmarks`` is flattened (x0, y0, x1, y1, ...), NaN
where a point is absent.
"""

from __future__ import annotations

import abc
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd

from pipeline.errors import DatasetError

Normalisation = Literal["interocular", "landmark_box", "bbox"]

#: How a manifest row's object box was made (its ``box_source`` column): around the
#: ground-truth landmarks (possibly grown), the whole image, or given by the dataset's files.
BOX_SOURCES: tuple[str, ...] = ("landmarks", "image", "file")


@dataclass(frozen=True)
class DatasetMeta:
    """What a dataset's landmarks mean and how errors on it are normalised.

    ``normalisation``:
      - ``"interocular"``: distance between ``norm_points`` (two landmark indices);
      - ``"landmark_box"``: sqrt(w*h) of the ground-truth landmark box (LS3D);
      - ``"bbox"``: sqrt(w*h) of the manifest's object box.
    """

    name: str
    landmark_names: tuple[str, ...]
    normalisation: Normalisation = "interocular"
    norm_points: tuple[int, int] | None = (0, 1)
    has_pose: bool = False
    splits: tuple[str, ...] = ("train", "test")

    @property
    def n_landmarks(self) -> int:
        return len(self.landmark_names)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "DatasetMeta":
        d = dict(d)
        d["landmark_names"] = tuple(d["landmark_names"])
        d["splits"] = tuple(d.get("splits", ("train", "test")))
        if d.get("norm_points") is not None:
            d["norm_points"] = tuple(d["norm_points"])
        return cls(**d)


@dataclass(frozen=True)
class SkipRecord:
    """One item a loader dropped because ``skip_bad`` was set."""

    source: str
    line: int
    reason: str


@dataclass
class Manifest:
    """A manifest table plus its dataset metadata.

    The frame follows ``storage.tables.SCHEMAS['manifest']``; helpers return
    numpy views in the shapes the algorithms want.
    """

    frame: pd.DataFrame
    meta: DatasetMeta

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def image_ids(self) -> np.ndarray:
        return self.frame["image_id"].to_numpy(dtype=str)

    def landmarks(self) -> np.ndarray:
        """(N, L, 2) float32 in original pixels, NaN where absent."""
        L = self.meta.n_landmarks
        if len(self.frame) == 0:
            return np.zeros((0, L, 2), np.float32)
        arr = np.stack([np.asarray(v, dtype=np.float32) for v in self.frame["landmarks"]])
        return arr.reshape(len(self.frame), L, 2)

    def visible(self) -> np.ndarray:
        """(N, L) bool."""
        L = self.meta.n_landmarks
        if len(self.frame) == 0:
            return np.zeros((0, L), bool)
        return np.stack([np.asarray(v, dtype=bool) for v in self.frame["visible"]])

    def boxes(self) -> np.ndarray:
        """(N, 4) float32 object boxes (x0, y0, x1, y1) in original pixels."""
        return self.frame[["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]].to_numpy(np.float32)

    def box_sources(self) -> np.ndarray:
        """(N,) how each object box was made (:data:`BOX_SOURCES`).

        Manifests written before the ``box_source`` column have nulls there; they
        read as today's rule: a box that is the whole image is ``image``, any other
        box ``landmarks`` (what the evaluation's default box rule calls it).
        """
        n = len(self.frame)
        given = self.frame["box_source"] if "box_source" in self.frame.columns else pd.Series([None] * n, index=self.frame.index)
        b = self.boxes().astype(np.float64)
        whole = ((np.abs(b[:, 0]) < 1e-3) & (np.abs(b[:, 1]) < 1e-3) & (np.abs(b[:, 2] - self.frame["width"].to_numpy(np.float64)) < 1e-3)
                 & (np.abs(b[:, 3] - self.frame["height"].to_numpy(np.float64)) < 1e-3)) if n else np.zeros(0, bool)
        legacy = np.where(whole, "image", "landmarks")
        known = given.notna().to_numpy() & given.astype(str).isin(BOX_SOURCES).to_numpy()
        return np.where(known, given.astype(str).to_numpy(), legacy).astype(object)

    def split(self, name: str) -> "Manifest":
        sub = self.frame[self.frame["split"] == name].reset_index(drop=True)
        if len(sub) == 0:
            raise DatasetError(
                f"dataset {self.meta.name!r} has no images in split {name!r}",
                fix=f"available splits: {sorted(self.frame['split'].unique())}",
            )
        return Manifest(sub, self.meta)

    def normalisers(self, box: str = "landmarks") -> np.ndarray:
        """(N,) per-image normalising distance, following ``meta.normalisation``.

        ``box`` is the evaluation protocol's box rule for the box-normalised
        datasets (``landmark_box`` / ``bbox``; see ``pipeline.evaluation.protocols``):
        ``"landmarks"`` keeps the dataset's box (the ground-truth landmark box, or the
        manifest's object box), ``"image"`` takes sqrt(w*h) of the whole image, as the
        StableKeypoints / Jakab / AutoLink code do. Inter-ocular distances do not use a box.
        Under ``landmark_box`` the box is rebuilt from the points except for rows whose recorded
        ``box_source`` is ``file`` or ``image``: a given box, or the whole image, is used as stored.
        """
        from pipeline.evaluation.protocols import check_box

        box = check_box(box)
        lm = self.landmarks()
        if box == "image" and self.meta.normalisation in ("landmark_box", "bbox"):
            w = self.frame["width"].to_numpy(np.float64)
            h = self.frame["height"].to_numpy(np.float64)
            return np.sqrt(w * h)
        if self.meta.normalisation == "interocular":
            i, j = self.meta.norm_points or (0, 1)
            d = np.linalg.norm(lm[:, i] - lm[:, j], axis=-1)
        elif self.meta.normalisation == "landmark_box":
            lo = np.nanmin(lm, axis=1)
            hi = np.nanmax(lm, axis=1)
            wh = hi - lo
            d = np.sqrt(wh[:, 0] * wh[:, 1])
            # Only a recorded source counts here: a manifest written before the column is evaluated as before.
            recorded = self.frame["box_source"] if "box_source" in self.frame.columns else pd.Series([None] * len(self.frame), dtype=object)
            stored = recorded.isin(("image", "file")).to_numpy()
            if stored.any():
                b = self.boxes().astype(np.float64)
                d = np.where(stored, np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])), d)
        else:
            b = self.boxes()
            d = np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
        return d.astype(np.float64)

    # persistence ----------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from storage.tables import write_table

        return write_table(self.frame, path, "manifest", metadata={"dataset_meta": self.meta.to_json()})

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        from storage.tables import read_metadata, read_table

        frame = read_table(path, "manifest")
        meta = read_metadata(path).get("dataset_meta")
        if meta is None:
            raise DatasetError("manifest has no dataset metadata", where=str(path), fix="rebuild it with `uld datasets manifest`")
        return cls(frame, DatasetMeta.from_json(meta))

    @classmethod
    def concat(cls, parts: list["Manifest"]) -> "Manifest":
        if not parts:
            raise DatasetError("no manifests to concatenate")
        return cls(pd.concat([p.frame for p in parts], ignore_index=True), parts[0].meta)


def manifest_row(
    image_id: str,
    split: str,
    path: str,
    width: int,
    height: int,
    landmarks: np.ndarray,
    visible: np.ndarray | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    yaw: float = math.nan,
    pitch: float = math.nan,
    roll: float = math.nan,
    pose_class: int = -1,
    box_source: str | None = None,
) -> dict:
    """One manifest row. ``bbox`` defaults to the box of the present landmarks (``box_source``
    ``landmarks``; the whole image, ``image``, when none is present). A given ``bbox`` is ``file``
    unless ``box_source`` says how the loader made it (e.g. ``landmarks`` for a grown landmark box)."""
    lm = np.asarray(landmarks, dtype=np.float32).reshape(-1, 2)
    if visible is None:
        visible = ~np.isnan(lm).any(axis=1)
    if bbox is None:
        present = lm[~np.isnan(lm).any(axis=1)]
        if len(present) == 0:
            bbox = (0.0, 0.0, float(width), float(height))
            box_source = box_source or "image"
        else:
            bbox = (*present.min(0).tolist(), *present.max(0).tolist())
            box_source = box_source or "landmarks"
    box_source = box_source or "file"
    if box_source not in BOX_SOURCES:
        raise DatasetError(f"unknown box source {box_source!r} for image {image_id!r}", where="manifest_row",
                           fix=f"use one of {', '.join(BOX_SOURCES)}")
    return {
        "image_id": image_id,
        "split": split,
        "path": str(path),
        "width": int(width),
        "height": int(height),
        "bbox_x0": float(bbox[0]),
        "bbox_y0": float(bbox[1]),
        "bbox_x1": float(bbox[2]),
        "bbox_y1": float(bbox[3]),
        "box_source": box_source,
        "landmarks": lm.reshape(-1).tolist(),
        "visible": np.asarray(visible, dtype=bool).tolist(),
        "yaw": float(yaw),
        "pitch": float(pitch),
        "roll": float(roll),
        "pose_class": int(pose_class),
    }


class DatasetLoader(abc.ABC):
    """Reads one on-disk layout into manifest rows.

    Subclasses set ``name`` and ``meta`` and implement :meth:`read_split`.
    They must raise :class:`DatasetError` naming the file (and line) for any
    bad item, unless ``skip_bad`` is true, in which case they append a
    :class:`SkipRecord` and go on. Nothing is dropped silently.
    """

    name: ClassVar[str]
    meta: ClassVar[DatasetMeta]
    description: ClassVar[str] = ""
    # What the user must point --root at, for error messages and --help.
    expected_layout: ClassVar[str] = ""

    @abc.abstractmethod
    def read_split(self, root: Path, split: str, skip_bad: bool, skipped: list[SkipRecord]) -> pd.DataFrame:
        """Return the manifest rows of ``split`` under ``root``."""

    def check_root(self, root: Path) -> Path:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetError(
                f"dataset folder for {self.name!r} not found",
                where=str(root),
                fix=f"pass --root pointing at a folder laid out as: {self.expected_layout}",
            )
        return root

    def load(self, root: Path, split: str, skip_bad: bool = False) -> tuple[Manifest, list[SkipRecord]]:
        root = self.check_root(root)
        if split not in self.meta.splits:
            raise DatasetError(
                f"dataset {self.name!r} has no split {split!r}",
                fix=f"use one of {list(self.meta.splits)}",
            )
        skipped: list[SkipRecord] = []
        frame = self.read_split(root, split, skip_bad, skipped)
        return Manifest(frame.reset_index(drop=True), self.meta), skipped
