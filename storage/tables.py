"""Typed Parquet tables passed between stages.

Each table kind has a fixed Arrow schema. Run tables carry ``run_id``,
``method``, ``stage`` and ``round`` columns so that tables from many runs
concatenate in pandas without joins::

    import pandas as pd, glob
    metrics = pd.concat(pd.read_parquet(p) for p in glob.glob("workspace/runs/*/metrics.parquet"))

:func:`write_table` checks and casts a DataFrame to the schema and writes it
atomically; :func:`read_table` checks the file is what it claims to be.
Extra columns are allowed (kept as they are); missing required columns are an
error naming the column and the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import StoreError
from storage.atomic import atomic_path

_RUN = [
    pa.field("run_id", pa.string()),
    pa.field("method", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("round", pa.int32()),
]

SCHEMAS: dict[str, pa.Schema] = {
    # One row per image. Landmarks are flattened (x0, y0, x1, y1, ...) in
    # original image pixels, NaN where absent; ``visible`` has one flag per point.
    "manifest": pa.schema(
        [
            pa.field("image_id", pa.string()),
            pa.field("split", pa.string()),
            pa.field("path", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("bbox_x0", pa.float32()),
            pa.field("bbox_y0", pa.float32()),
            pa.field("bbox_x1", pa.float32()),
            pa.field("bbox_y1", pa.float32()),
            # How the object box was made (pipeline.datasets.base.BOX_SOURCES): "landmarks" (around the
            # ground-truth points), "image" (the whole image), "file" (given by the dataset's files).
            # Null in manifests written before the column (Manifest.box_sources resolves it).
            pa.field("box_source", pa.string()),
            pa.field("landmarks", pa.list_(pa.float32())),
            pa.field("visible", pa.list_(pa.bool_())),
            pa.field("yaw", pa.float32()),
            pa.field("pitch", pa.float32()),
            pa.field("roll", pa.float32()),
            pa.field("pose_class", pa.int8()),
        ]
    ),
    # Items a loader dropped under --skip-bad, with the reason.
    "skipped": pa.schema(
        [
            pa.field("dataset", pa.string()),
            pa.field("source", pa.string()),
            pa.field("line", pa.int32()),
            pa.field("reason", pa.string()),
        ]
    ),
    # Discovered landmarks, one row per (image, landmark); x, y in original image pixels.
    "keypoints": pa.schema(
        _RUN
        + [
            pa.field("split", pa.string()),
            pa.field("image_id", pa.string()),
            pa.field("landmark_id", pa.int32()),
            pa.field("x", pa.float32()),
            pa.field("y", pa.float32()),
            pa.field("score", pa.float32()),
            pa.field("present", pa.bool_()),
            # True where the landmark is present only because the method filled it in
            # (e.g. D-ULD's heatmap fallback for a cluster absent in the image), not detected.
            pa.field("fallback", pa.bool_()),
        ]
    ),
    # `uld predict`: landmarks of images a trained model saw for the first time, one row per
    # (image, landmark); x, y in original pixels of ``image``; crop_* the square crop it was seen in.
    "predictions": pa.schema(
        [
            pa.field("image", pa.string()),
            pa.field("image_id", pa.string()),
            pa.field("method", pa.string()),
            pa.field("landmark_id", pa.int32()),
            pa.field("x", pa.float32()),
            pa.field("y", pa.float32()),
            pa.field("score", pa.float32()),
            pa.field("present", pa.bool_()),
            pa.field("fallback", pa.bool_()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("crop_x0", pa.float32()),
            pa.field("crop_y0", pa.float32()),
            pa.field("crop_x1", pa.float32()),
            pa.field("crop_y1", pa.float32()),
        ]
    ),
    # Pseudo-labels of a self-training round: cluster id per kept keypoint.
    # x, y in crop pixels of the feature store's crops; pose_cluster = -1 without TSC;
    # pose_code: the image's D-ULD++ pose code (64 floats) in TSC rounds, null otherwise.
    "pseudolabels": pa.schema(
        _RUN
        + [
            pa.field("image_id", pa.string()),
            pa.field("landmark_id", pa.int32()),
            pa.field("pose_cluster", pa.int32()),
            pa.field("pose_code", pa.list_(pa.float32())),
            pa.field("x", pa.float32()),
            pa.field("y", pa.float32()),
            pa.field("distance", pa.float32()),
        ]
    ),
    # Long-format metrics.
    "metrics": pa.schema(
        _RUN
        + [
            pa.field("dataset", pa.string()),
            pa.field("split", pa.string()),
            pa.field("metric", pa.string()),
            pa.field("value", pa.float64()),
            pa.field("k", pa.int32()),
            pa.field("n_regressor_images", pa.int32()),
            pa.field("repeat", pa.int32()),
            # Evaluation protocol (pipeline.evaluation.protocols) and box rule of the row;
            # rows that do not depend on them (cluster quality, ...) carry the defaults.
            pa.field("protocol", pa.string()),
            pa.field("box", pa.string()),
            # How the evaluated images' object boxes (crops, RoIs) were made: the manifests'
            # box_source (landmarks | image | file, '+'-joined when mixed); null for rows not
            # computed from a test split and for tables written before the column.
            pa.field("box_source", pa.string()),
        ]
    ),
    # Per-image errors for CED curves and pose splits.
    "errors": pa.schema(
        _RUN
        + [
            pa.field("dataset", pa.string()),
            pa.field("split", pa.string()),
            pa.field("direction", pa.string()),
            pa.field("image_id", pa.string()),
            pa.field("nme", pa.float64()),
            pa.field("yaw", pa.float32()),
            pa.field("protocol", pa.string()),
            pa.field("box", pa.string()),
        ]
    ),
    # D-ULD++'s pose clusters against known poses (paper 001, Fig. 7; flows.duldpp_stages), one row per
    # (run, stage, round, split, bin) and one overall row per split (bin_index -1, bin "overall"):
    # each of the Q pose clusters is mapped to the pose bin most of its *train* images are in, and
    # ``accuracy`` = n_correct / n_images is the share of the bin's images whose cluster maps to it;
    # ``clusters`` the pose clusters mapped to the bin; ``pose_source`` "yaw" (binned angles) or
    # "pose_class" (a dataset's annotated classes, e.g. MTFL's five head poses).
    "pose_clusters": pa.schema(
        _RUN
        + [
            pa.field("dataset", pa.string()),
            pa.field("split", pa.string()),
            pa.field("pose_source", pa.string()),
            pa.field("q", pa.int32()),
            pa.field("bin_index", pa.int32()),
            pa.field("bin", pa.string()),
            pa.field("n_images", pa.int32()),
            pa.field("n_correct", pa.int32()),
            pa.field("accuracy", pa.float64()),
            pa.field("clusters", pa.list_(pa.int32())),
        ]
    ),
    # `uld ablation` (flows.ablation): one row per (ablation, table row, seed, pick, metric), long format.
    # ``row`` is the table row's label (e.g. "D-ULD + pose proxy"); ``pick`` = "last" (the method's
    # last round) or "best" (its round with the lowest test forward NME); ``note`` says why a row
    # was not run (then ``run_id`` is '' and ``value`` NaN).
    "ablation": pa.schema(
        [
            pa.field("ablation_id", pa.string()),
            pa.field("row", pa.string()),
            pa.field("method", pa.string()),
            pa.field("stage", pa.string()),
            pa.field("round", pa.int32()),
            pa.field("seed", pa.int32()),
            pa.field("run_id", pa.string()),
            pa.field("pick", pa.string()),
            pa.field("metric", pa.string()),
            pa.field("value", pa.float64()),
            pa.field("note", pa.string()),
        ]
    ),
    # Feature probe (``uld backbone probe``): transfer PCK per feature combination, one row
    # per (combination, kind, landmark); landmark = -1 is the overall PCK. ``features`` is the
    # '+'-joined sorted keys; layer / timestep are set when the combination has one layer /
    # one timestep ('' / -1 otherwise, e.g. for the all-key combination);
    # ``kind`` says how the combination was chosen (single, layer, timestep, all, best2, ...);
    # the ZeroShot columns are NaN except on the overall rows of the combinations run through it.
    "probe": pa.schema(
        [
            pa.field("backbone", pa.string()),
            pa.field("dataset", pa.string()),
            pa.field("features", pa.string()),
            pa.field("kind", pa.string()),
            pa.field("n_keys", pa.int32()),
            pa.field("layer", pa.string()),
            pa.field("timestep", pa.int32()),
            pa.field("alpha", pa.float32()),
            pa.field("object_size", pa.string()),
            pa.field("landmark", pa.int32()),
            pa.field("landmark_name", pa.string()),
            pa.field("pck", pa.float64()),
            pa.field("pck_norm", pa.float64()),
            pa.field("pck_chance", pa.float64()),
            pa.field("n_pairs", pa.int32()),
            pa.field("n_points", pa.int32()),
            pa.field("nme_forward", pa.float64()),
            pa.field("nme_backward", pa.float64()),
            pa.field("hungarian_acc", pa.float64()),
        ]
    ),
}

# Columns added to a schema after tables of that kind were written: the value older
# tables are read with, and rows from writers that do not set it are written with
# (keypoints before `fallback` existed had no fallbacks flagged; metrics and errors
# before `protocol` / `box` existed were all evaluated under `paper` / `landmarks`;
# metrics before `box_source` existed did not record how the boxes were made (null);
# pseudo-labels before `pose_code` existed had no pose codes).
_PROTOCOL_DEFAULTS = {"protocol": "paper", "box": "landmarks"}
ADDED_COLUMNS: dict[str, dict[str, Any]] = {"keypoints": {"fallback": False}, "metrics": {**_PROTOCOL_DEFAULTS, "box_source": None},
                                             "errors": _PROTOCOL_DEFAULTS,
                                             "pseudolabels": {"pose_code": None}, "manifest": {"box_source": None}}

_META_KEY = b"uld"


def table_schema(kind: str) -> pa.Schema:
    try:
        return SCHEMAS[kind]
    except KeyError:
        raise StoreError(f"unknown table kind {kind!r}", fix=f"use one of {sorted(SCHEMAS)}") from None


def _to_arrow(df: pd.DataFrame, kind: str, where: str) -> pa.Table:
    schema = table_schema(kind)
    added = {n: v for n, v in ADDED_COLUMNS.get(kind, {}).items() if n not in df.columns}
    if added:
        df = df.assign(**added)
    missing = [f.name for f in schema if f.name not in df.columns]
    if missing:
        raise StoreError(
            f"{kind} table is missing required columns {missing}",
            where=where,
            fix=f"provide all of {schema.names}",
        )
    extra = [c for c in df.columns if c not in schema.names]
    arrays, fields = [], []
    for f in schema:
        try:
            arrays.append(pa.array(df[f.name].tolist() if pa.types.is_list(f.type) else df[f.name], type=f.type, from_pandas=True))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise StoreError(
                f"column {f.name!r} of the {kind} table cannot be stored as {f.type}: {exc}",
                where=where,
            ) from None
        fields.append(f)
    for name in extra:
        col = pa.array(df[name], from_pandas=True)
        arrays.append(col)
        fields.append(pa.field(name, col.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def write_table(df: pd.DataFrame, path: str | Path, kind: str, metadata: dict[str, Any] | None = None) -> Path:
    """Validate ``df`` against the ``kind`` schema and write it atomically to ``path``.

    ``metadata`` (JSON-serialisable) is stored in the file's key-value metadata
    together with the table kind, and returned by :func:`read_metadata`.
    """
    path = Path(path)
    table = _to_arrow(df.reset_index(drop=True), kind, str(path))
    meta = {"kind": kind, **(metadata or {})}
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta, default=str).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    _require(path)
    try:
        raw = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"not a readable Parquet file: {exc}", where=str(path), fix="delete it and re-run the stage that writes it") from None
    return json.loads(raw[_META_KEY]) if _META_KEY in raw else {}


def read_table(path: str | Path, kind: str) -> pd.DataFrame:
    """Read a table written by :func:`write_table`, checking its kind and columns."""
    path = Path(path)
    _require(path)
    meta = read_metadata(path)
    if meta.get("kind") not in (None, kind):
        raise StoreError(
            f"expected a {kind} table but the file holds a {meta.get('kind')} table",
            where=str(path),
            fix="point to the right file",
        )
    try:
        df = pq.read_table(path).to_pandas()
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"corrupt Parquet file: {exc}", where=str(path), fix="delete it and re-run the stage that writes it") from None
    for name, value in ADDED_COLUMNS.get(kind, {}).items():
        if name not in df.columns:  # a table written before the column existed
            df[name] = value
    missing = [n for n in table_schema(kind).names if n not in df.columns]
    if missing:
        raise StoreError(f"{kind} table lacks columns {missing}", where=str(path), fix="re-run the stage that writes it")
    return df


def append_table(df: pd.DataFrame, path: str | Path, kind: str, replace_on: list[str] | None = None) -> Path:
    """Append rows to a table (creating it), atomically.

    ``replace_on`` names key columns: existing rows whose key matches a new row's
    key are dropped first, so re-running a step replaces its rows instead of
    duplicating them (idempotent reruns).
    """
    path = Path(path)
    meta: dict[str, Any] = {}
    if path.exists():
        old = read_table(path, kind)
        meta = {k: v for k, v in read_metadata(path).items() if k != "kind"}
        if replace_on:
            keys = df[replace_on].drop_duplicates()
            merged = old.merge(keys, on=replace_on, how="left", indicator=True)
            old = old[(merged["_merge"] == "left_only").to_numpy()]
        df = pd.concat([old, df], ignore_index=True)
    return write_table(df, path, kind, metadata=meta)


def _require(path: Path) -> None:
    if not path.exists():
        raise StoreError(f"file not found", where=str(path), fix="run the stage that produces it first (see `uld --help`)")
