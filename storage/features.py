"""The hyperfeature store: one sharded Zarr v3 group per (dataset, backbone, feature config).

Layout of a store (a directory, see :meth:`storage.layout.Workspace.feature_store`)::

    zarr.json                 group attrs: config, config_hash, versions, keys, shapes, ...
    features/<layer@tT>/      float16 (N, C, h, w); chunk = 1 image, shard = shard_size images
    image_id/                 (N,) str   row i of the concatenated (train, then test) manifest
    split/                    (N,) str
    crop_box/                 (N, 4) float32 square crop boxes (x0, y0, x1, y1), original pixels
    valid/                    (N,) bool  False where an image could not be read (--skip-bad)
    complete/                 (n_shards,) bool, one chunk per shard: the completion markers
    projection/<layer>/       (C_out, C_in) float32 fixed random projection (only with reduce_channels)

Why this shape:

* **Chunk = one image** so a reader can fetch any single image without decoding
  its neighbours; **shard = shard_size images** so the file count stays small
  (one file per key per shard) on file systems that hate millions of files.
* **Shards are written only as whole, shard-aligned blocks** (``write_shard``):
  a partial write into a shard would make Zarr read-modify-write the shard file,
  which is slow and not safe under concurrency.
* **Completion markers are written after the data** of a shard. Zarr's local
  store replaces every file atomically, but one shard spans one file *per key*;
  a crash between keys leaves a shard half written. Because its marker is still
  False, :meth:`missing_shards` reports it and a resumed run rewrites it whole.
* **Complete means the files are there**, not just the markers: a shard whose
  marker is set but whose shard file (or, for an image that was read, its chunk
  in the shard index) is missing would read back as zeros. :meth:`verify` finds
  such pieces cheaply (one ``stat`` and one small index read per shard file;
  ``deep=True`` also decodes every chunk, checking its CRC32C), they count as
  missing shards, opening the store for reading refuses them, and re-running
  ``uld features`` re-extracts them.
* **Reads use basic slicing only** (``arr[a:b]``): orthogonal/fancy indexing on
  sharded Zarr arrays is much slower and has had correctness bugs;
  :meth:`read_indices` turns any index list into contiguous runs. Uncompressed
  stores skip Zarr's per-chunk decode (the cost of a read was ~0.5 ms per image
  chunk): :mod:`storage.shard_reader` reads the shard index and the chunks'
  bytes directly, checking every CRC32C, same format, same files.
* The store directory is **created atomically** (built next to its final path,
  then renamed), so a reader never finds a store without its metadata and ids.
  On an object store (an fsspec URL, :mod:`storage.locations`), which has no
  rename, it is built in a local temporary folder and uploaded with its root
  ``zarr.json`` last: readers recognise a store by that object.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import shutil
import tempfile
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import StoreError
from storage.crc32c import self_checks
from storage.locations import Files, FsspecFiles, LocalFiles, files_for
from storage.shard_reader import RawShardLayout, layout_of, read_rows, read_rows_ranged

if TYPE_CHECKING:  # dask is imported lazily: most readers never need it
    import dask.array

from storage.store_format import FORMAT, FORMAT_VERSION  # noqa: E402 (re-exported)
DEFAULT_SHARD_SIZE = 64
_FEATURES = "features"
_PROJECTION = "projection"
_REPAIR_FIX = (
    "re-run the same `uld features` command: it re-extracts the shards whose files are missing or damaged "
    "(add --verify to list every problem without extracting)"
)


def _zarr():
    import zarr

    return zarr


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide the bytes in the store (recorded in its attrs)."""
    out = {}
    for name in ("torch", "diffusers", "zarr", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def key_layer(key: str) -> str:
    """The layer part of a feature key ``"layer@tT"``."""
    return key.rsplit("@t", 1)[0]


def random_projection(c_in: int, c_out: int, seed: int, layer: str) -> np.ndarray:
    """A fixed Gaussian random projection (c_out, c_in), float32.

    Entries are N(0, 1/c_out) so squared distances are preserved in expectation
    (Johnson-Lindenstrauss); the seed is mixed with a CRC of the layer name so
    every layer gets its own matrix and the same spec always gives the same one.
    """
    if not 0 < c_out < c_in:
        raise StoreError(
            f"cannot project {c_in} channels of layer {layer!r} to {c_out}",
            where="reduce_channels",
            fix=f"use a reduce_channels value between 1 and {c_in - 1}, or none",
        )
    rng = np.random.default_rng([int(seed), zlib.crc32(layer.encode())])
    return (rng.standard_normal((c_out, c_in)) / np.sqrt(c_out)).astype(np.float32)


@dataclass(frozen=True)
class StoreProblem:
    """One missing or damaged piece of a feature store (see :meth:`FeatureStore.verify`)."""

    array: str  # "features/<layer@tT>", "valid", "complete", "image_id", ...
    start: int  # first image row affected
    stop: int  # one past the last
    shard: int | None  # None for the whole-store arrays (ids, splits, boxes)
    problem: str
    path: str  # the file concerned

    @property
    def repairable(self) -> bool:
        """Re-extracting the shard fixes it (whole-store arrays need a rebuild)."""
        return self.shard is not None

    def __str__(self) -> str:
        shard = f" (shard {self.shard})" if self.shard is not None else ""
        return f"{self.array} images {self.start}:{self.stop}{shard}: {self.problem} [{self.path}]"


# The shard index layout this module can check (the Zarr v3 sharding default: index
# at the end of the shard file, little-endian uint64 (offset, nbytes) per chunk, CRC32C).
_INDEX_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
_EMPTY = np.uint64(2**64 - 1)


def _shard_index_spec(arr: Any) -> tuple[int, ...] | None:
    """Chunks per shard along each axis when ``arr`` uses the checkable index layout, else None."""
    try:
        # JSON round trip: the metadata dict mixes tuples and lists.
        meta = json.loads(json.dumps(arr.metadata.to_dict(), default=str))
        codec = meta["codecs"][0]
        conf = codec["configuration"]
        if codec["name"] != "sharding_indexed" or conf.get("index_location", "end") != "end":
            return None
        if conf["index_codecs"] != _INDEX_CODECS:
            return None
        inner = conf["chunk_shape"]
        outer = meta["chunk_grid"]["configuration"]["chunk_shape"]
        return tuple(int(o) // int(i) for o, i in zip(outer, inner))
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def _upload(folder: Path, files: "FsspecFiles") -> None:
    """Copy a store built in ``folder`` to the object store ``files``, the root ``zarr.json`` last.

    The root object is what makes a store exist for every reader (and for a
    resumed run); it is written only if absent where the file system supports
    exclusive creation, so two creators cannot both believe they made it.
    """
    rels = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    for rel in rels:
        if rel != "zarr.json":
            files.write(rel, (folder / rel).read_bytes())
    root = (folder / "zarr.json").read_bytes()
    try:
        files.write("zarr.json", root, exclusive=True)
    except (TypeError, NotImplementedError, ValueError):  # no exclusive create on this file system
        files.write("zarr.json", root)


def _as_str_array(values: Any) -> np.ndarray:
    """Plain fixed-width numpy strings (zarr returns numpy's variable-width StringDType)."""
    return np.asarray([str(v) for v in np.asarray(values).reshape(-1)], dtype=str)


class FeatureStore:
    """A sharded, resumable Zarr v3 store of per-image diffusion hyperfeatures.

    Build with :meth:`create` (an empty store with ids and boxes, no features)
    or :meth:`open`; fill with :meth:`write_shard`; read with :meth:`read`,
    :meth:`read_indices`, :meth:`to_dask` or ``storage.feature_loader``.
    Row ``i`` of every array is image ``i`` of the concatenated manifest.
    """

    path: Path | str  # a Path for a local store, the URL (str) for a remote one
    config: dict
    config_hash: str
    keys: list[str]
    shapes: dict[str, tuple[int, int, int]]
    image_ids: np.ndarray
    splits: np.ndarray
    crop_boxes: np.ndarray
    image_size: int
    shard_size: int

    def __init__(self, files: Files, group: Any, writable: bool) -> None:
        # Use create()/open(); this only loads what is already on disk.
        self._files = files
        self.path = files.root if isinstance(files, LocalFiles) else files.url
        self._group = group
        self._writable = writable
        attrs = group.attrs.asdict()
        self.attrs: dict = attrs
        self.config = attrs["config"]
        self.config_hash = attrs["config_hash"]
        self.keys = list(attrs["keys"])
        self.shapes = {k: tuple(int(x) for x in v) for k, v in attrs["shapes"].items()}
        self.image_size = int(attrs["image_size"])
        self.shard_size = int(attrs["shard_size"])
        self._n = int(attrs["n_images"])
        # Store a chunk even when it is all zeros (an unreadable image, a black crop): then a
        # chunk missing from a shard index always means damage, never "equal to the fill value".
        # (Zarr still writes no file at all for a shard that is entirely zeros.)
        self._arrays = {k: group[f"{_FEATURES}/{k}"].with_config({"write_empty_chunks": True}) for k in self.keys}
        self.image_ids = _as_str_array(group["image_id"][:])
        self.splits = _as_str_array(group["split"][:])
        self.crop_boxes = np.asarray(group["crop_box"][:], dtype=np.float32)
        self._valid_arr = group["valid"]
        self._complete_arr = group["complete"]
        self._complete = np.asarray(self._complete_arr[:], dtype=bool)
        # Kept in memory for the per-read file checks; write_shard and refresh update it.
        self._valid_now = np.asarray(self._valid_arr[:], dtype=bool)
        self._index_spec = {k: _shard_index_spec(a) for k, a in self._arrays.items()}
        # Keys whose shard files this module reads directly (uncompressed, checksummed chunks).
        self._direct: dict[str, RawShardLayout | None] = {k: layout_of(a) for k, a in self._arrays.items()}
        self._files_of: dict[str, list[str]] = {}
        self._local_of: dict[str, list[Path]] = {}
        # Shards with missing/damaged files, found by the cheap verify on first need (lazy:
        # the loader's worker processes open the store and never ask).
        self._damaged: set[int] | None = None
        self._projections: dict[str, np.ndarray] = {}
        for layer in attrs.get("projection", {}):
            self._projections[layer] = np.asarray(group[f"{_PROJECTION}/{layer}"][:], dtype=np.float32)

    # construction ---------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: "str | Path",
        *,
        config: dict,
        config_hash: str,
        image_ids: Any,
        splits: Any,
        crop_boxes: Any,
        shapes: dict[str, tuple[int, int, int]],
        image_size: int,
        shard_size: int = DEFAULT_SHARD_SIZE,
        projections: dict[str, np.ndarray] | None = None,
        extra_attrs: dict | None = None,
        compression: str = "none",
    ) -> "FeatureStore":
        """Create an empty store (ids, splits, boxes; no features yet) atomically.

        ``shapes`` are the *stored* (C, h, w) per key, i.e. after any channel
        reduction. ``projections`` maps a layer name to its (C_out, C_in)
        matrix; :meth:`write_shard` applies it to features given with C_in
        channels. ``compression``: ``"none"`` (default; every image chunk
        still carries a CRC32C checksum) or ``"zstd"``. Diffusion activations in
        float16 are close to incompressible (zstd saved ~8 % on DDPM features,
        see bench/results/store.md); with one-image chunks the per-chunk overhead
        dominates reads either way, and for large (SD) chunks decompression
        would cost CPU time for little space, hence the default.
        ``path`` is a local folder or an fsspec URL (``s3://bucket/prefix/...``:
        built locally, then uploaded with its root ``zarr.json`` last, see
        :mod:`storage.locations`). Raises :class:`StoreError` if ``path`` already exists.
        """
        zarr = _zarr()
        files = files_for(path)
        path = files.root if isinstance(files, LocalFiles) else files.url
        ids = _as_str_array(image_ids)
        spl = _as_str_array(splits)
        boxes = np.asarray(crop_boxes, dtype=np.float32)
        n = len(ids)
        if n == 0:
            raise StoreError("cannot create a feature store with no images", where=str(path), fix="check the dataset's manifests are not empty")
        if len(spl) != n or boxes.shape != (n, 4):
            raise StoreError(
                f"image_ids ({n}), splits ({len(spl)}) and crop_boxes {boxes.shape} disagree",
                where=str(path),
                fix="pass one split and one (x0, y0, x1, y1) box per image",
            )
        if compression not in ("none", "zstd"):
            raise StoreError(f"unknown compression {compression!r}", where="compression", fix="use 'none' or 'zstd'")
        if shard_size < 1:
            raise StoreError(f"shard_size must be >= 1, got {shard_size}", where="--shard-size", fix="use e.g. 64")
        if not shapes:
            raise StoreError("no feature keys to store", where=str(path), fix="request at least one layer and one timestep")
        projections = {k: np.asarray(v, dtype=np.float32) for k, v in (projections or {}).items()}
        for key, shp in shapes.items():
            if len(shp) != 3 or min(shp) < 1:
                raise StoreError(f"feature {key!r} has shape {shp}; expected (C, h, w)", where=str(path))
            proj = projections.get(key_layer(key))
            if proj is not None and proj.shape[0] != shp[0]:
                raise StoreError(f"projection of {key_layer(key)!r} gives {proj.shape[0]} channels but {key!r} stores {shp[0]}", where=str(path))
        if (files.is_file("zarr.json") if files.remote else Path(path).exists()):
            raise StoreError(
                "feature store already exists",
                where=str(path),
                fix="open it with FeatureStore.open, or delete the folder to rebuild it",
            )
        if files.remote:
            # No folder rename on object stores: build it here, upload it with its root object last.
            staging = Path(tempfile.mkdtemp(prefix="uld-store-"))
            tmp = staging / "store"
        else:
            staging = None
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(path).parent / f".{Path(path).name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        n_shards = -(-n // shard_size)
        try:
            group = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
            # Either way each chunk is checksummed: a corrupted shard fails loudly instead of reading garbage.
            if compression == "zstd":
                compressors: Any = zarr.codecs.ZstdCodec(level=3, checksum=True)
            else:
                compressors = zarr.codecs.Crc32cCodec()
            for key in sorted(shapes):
                c, h, w = (int(x) for x in shapes[key])
                group.create_array(
                    f"{_FEATURES}/{key}",
                    shape=(n, c, h, w),
                    chunks=(1, c, h, w),
                    shards=(shard_size, c, h, w),
                    dtype="float16",
                    compressors=compressors,
                    fill_value=0.0,
                    dimension_names=("image", "channel", "y", "x"),
                )
            group.create_array("image_id", shape=(n,), chunks=(n,), dtype=str)[:] = ids
            group.create_array("split", shape=(n,), chunks=(n,), dtype=str)[:] = spl
            group.create_array("crop_box", shape=(n, 4), chunks=(n, 4), dtype="float32")[:] = boxes
            group.create_array("valid", shape=(n,), chunks=(shard_size,), dtype=bool, fill_value=False)
            # One chunk per marker: shards finishing in parallel never rewrite each other's marker.
            group.create_array("complete", shape=(n_shards,), chunks=(1,), dtype=bool, fill_value=False)
            for layer, mat in sorted(projections.items()):
                group.create_array(f"{_PROJECTION}/{layer}", shape=mat.shape, chunks=mat.shape, dtype="float32")[:] = mat
            attrs = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "config": config,
                "config_hash": config_hash,
                "backbone": config.get("backbone"),
                "versions": library_versions(),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "n_images": n,
                "n_shards": n_shards,
                "shard_size": int(shard_size),
                "compression": compression,
                "image_size": int(image_size),
                "keys": sorted(shapes),
                "shapes": {k: [int(x) for x in shapes[k]] for k in sorted(shapes)},
                "projection": {layer: {"in": int(m.shape[1]), "out": int(m.shape[0])} for layer, m in sorted(projections.items())},
                **(extra_attrs or {}),
            }
            # Round-trip through JSON now so a bad value fails here, not half-way through a run.
            group.attrs.update(json.loads(json.dumps(attrs, default=str)))
            try:
                if staging is not None:
                    _upload(tmp, files)
                else:
                    os.rename(tmp, path)
            except (OSError, FileExistsError):
                if files.is_file("zarr.json") if files.remote else Path(path).exists():
                    raise StoreError(
                        "feature store was created by another process at the same time",
                        where=str(path),
                        fix="open it with FeatureStore.open (re-running the command does this)",
                    ) from None
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return cls.open(path, require_complete=False, writable=True)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        require_complete: bool = True,
        expected_hash: str | None = None,
        writable: bool = False,
    ) -> "FeatureStore":
        """Open an existing store (a local folder or an fsspec URL), checking format, hash and (by default) completeness."""
        zarr = _zarr()
        files = files_for(path)
        path = files.root if isinstance(files, LocalFiles) else files.url
        if not files.is_file("zarr.json"):
            raise StoreError(
                "feature store not found",
                where=str(path),
                fix="extract the features first: `uld features --dataset <name> --backbone <name>`",
            )
        try:
            group = zarr.open_group(files.zarr_store(read_only=not writable), mode="r+" if writable else "r", zarr_format=3)
            attrs = group.attrs.asdict()
        except Exception as exc:  # zarr raises several types for unreadable metadata
            raise StoreError(f"feature store metadata cannot be read: {exc}", where=str(path), fix="delete the folder and re-run `uld features`") from None
        if attrs.get("format") != FORMAT:
            raise StoreError("folder is not a ULD feature store", where=str(path), fix="point at a store written by `uld features`")
        if int(attrs.get("format_version", -1)) != FORMAT_VERSION:
            raise StoreError(
                f"feature store format version {attrs.get('format_version')} is not supported (expected {FORMAT_VERSION})",
                where=str(path),
                fix="delete the folder and re-run `uld features` to rebuild it",
            )
        if expected_hash is not None and attrs.get("config_hash") != expected_hash:
            raise StoreError(
                f"feature store config hash {attrs.get('config_hash')!r} does not match the requested configuration {expected_hash!r}",
                where=str(path),
                fix="the folder was written for another configuration: delete it and re-run `uld features`",
            )
        try:
            store = cls(files, group, writable)
        except KeyError as exc:
            raise StoreError(f"feature store is missing {exc}", where=str(path), fix="delete the folder and re-run `uld features`") from None
        if require_complete:
            store.require_complete()
        return store

    @staticmethod
    def exists(path: "str | Path") -> bool:
        """Is there a store (its root ``zarr.json``, the object written last when a store is created) at ``path``?"""
        return files_for(path).is_file("zarr.json")

    # shape and completion ---------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        done = self.n_shards() - len(self.missing_shards())
        return f"FeatureStore({str(self.path)!r}, n={self._n}, keys={self.keys}, shards={done}/{self.n_shards()})"

    @property
    def backbone(self) -> dict | None:
        """The backbone identity the features were made with."""
        return self.attrs.get("backbone")

    @property
    def valid(self) -> np.ndarray:
        """(N,) bool: False for images that could not be read (skipped with --skip-bad) or not written yet."""
        return np.asarray(self._valid_arr[:], dtype=bool)

    def n_shards(self) -> int:
        return -(-self._n // self.shard_size)

    def shard_range(self, i: int) -> tuple[int, int]:
        """[start, stop) image rows of shard ``i``."""
        if not 0 <= i < self.n_shards():
            raise StoreError(f"shard {i} out of range (store has {self.n_shards()})", where=str(self.path))
        start = i * self.shard_size
        return start, min(start + self.shard_size, self._n)

    def refresh(self) -> None:
        """Re-read the completion markers and validity flags, and forget the last verification."""
        self._complete = np.asarray(self._complete_arr[:], dtype=bool)
        self._valid_now = np.asarray(self._valid_arr[:], dtype=bool)
        self._damaged = None

    def unfinished_shards(self) -> list[int]:
        """Shards whose completion marker is not set (never written, or a crash mid-shard)."""
        return [int(i) for i in np.flatnonzero(~self._complete)]

    def damaged_shards(self) -> list[int]:
        """Finished shards with a missing or damaged file (the cheap :meth:`verify`)."""
        if self._damaged is None:
            self._damaged = {p.shard for p in self._verify_finished(deep=False) if p.shard is not None}
        return sorted(self._damaged)

    def missing_shards(self) -> list[int]:
        """Shards that must be (re-)extracted: unfinished, or finished with files missing on disk."""
        return sorted(set(self.unfinished_shards()) | set(self.damaged_shards()))

    def is_complete(self) -> bool:
        """Every shard finished *and* its files present (whole-store arrays included)."""
        return not self.missing_shards() and not self._store_level_problems()

    def require_complete(self, fix: str | None = None) -> None:
        """Raise :class:`StoreError` naming what is unfinished, missing or damaged (nothing when complete)."""
        unfinished = self.unfinished_shards()
        if unfinished:
            raise StoreError(
                f"feature store is incomplete: {len(unfinished)} of {self.n_shards()} shards were never finished "
                f"(first missing: {unfinished[:5]})",
                where=str(self.path),
                fix=fix or "resume the extraction by re-running the same `uld features` command",
            )
        found = self._verify_finished(deep=False)
        self._damaged = {p.shard for p in found if p.shard is not None}
        problems = self._store_level_problems() + found
        if problems:
            shown = "; ".join(str(p) for p in problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            rebuild = any(not p.repairable for p in problems)
            raise StoreError(
                f"feature store is damaged: {len(problems)} piece(s) missing or unreadable: {shown}",
                where=str(self.path),
                fix="delete the folder and re-run `uld features` to rebuild it" if rebuild else (fix or _REPAIR_FIX),
            )

    # verification -----------------------------------------------------------
    def _file(self, arr: Any, coords: tuple[int, ...]) -> str:
        """The file (relative to the store root) holding chunk (or, for sharded arrays, shard) ``coords`` of ``arr``."""
        return f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"

    def _all_skipped(self, start: int, stop: int) -> bool:
        skipped = self.skipped
        return bool(skipped) and all(str(i) in skipped for i in self.image_ids[start:stop])

    def _store_level_problems(self) -> list[StoreProblem]:
        """Whole-store arrays (ids, splits, boxes, projections): one file each, needed by every row."""
        out = []
        names = ["image_id", "split", "crop_box"] + [f"{_PROJECTION}/{layer}" for layer in self._projections]
        for name in names:
            arr = self._group[name]
            f = self._file(arr, (0,) * arr.ndim)
            if not self._files.is_file(f):
                out.append(StoreProblem(name, 0, self._n, None, "file missing", self._files.show(f)))
        return out

    def _check_index(self, key: str, f: str, shard: int, start: int, stop: int, expect_valid: bool = True, size: int | None = None) -> list[StoreProblem]:
        """Read the shard index at the end of ``f`` (of ``size`` bytes, an existing file): checksum, bounds,
        and (``expect_valid``) a chunk for every valid image."""
        spec = self._index_spec.get(key)
        if spec is None or any(n != 1 for n in spec[1:]):
            return []  # another index layout: presence was checked, the read-time CRCs do the rest
        name = f"{_FEATURES}/{key}"
        index_bytes = spec[0] * 16 + 4
        size = self._files.size(f) if size is None else size
        if size is None:
            return []  # gone meanwhile: the callers check presence
        shown = self._files.show(f)
        if size < index_bytes:
            return [StoreProblem(name, start, stop, shard, f"shard file truncated ({size} bytes)", shown)]
        raw = self._files.read_range(f, size - index_bytes, index_bytes)
        if self_checks(raw) is False:  # None: no CRC32C implementation, the read-time checks do the rest
            return [StoreProblem(name, start, stop, shard, "shard index checksum mismatch", shown)]
        entries = np.frombuffer(raw[:-4], dtype="<u8").reshape(spec[0], 2)[: stop - start]
        present = entries[:, 0] != _EMPTY
        past_end = present & (entries[:, 0] + entries[:, 1] > np.uint64(size - index_bytes))
        lost = past_end | (~present & self._valid_now[start:stop]) if expect_valid else past_end
        if lost.any():
            rows = (start + np.flatnonzero(lost)).tolist()
            return [StoreProblem(name, start, stop, shard, f"chunks of images {rows[:5]}{'...' if len(rows) > 5 else ''} missing or truncated", shown)]
        return []

    def _verify_finished(self, deep: bool) -> list[StoreProblem]:
        """Problems of the shards whose completion marker is set."""
        out: list[StoreProblem] = []
        for i in np.flatnonzero(self._complete):
            i = int(i)
            start, stop = self.shard_range(i)
            vfile = self._file(self._valid_arr, (i,))
            # An all-False validity chunk is not stored (it equals the fill value): fine
            # only when every image of the shard was skipped on purpose.
            if not self._files.is_file(vfile) and not self._all_skipped(start, stop):
                out.append(StoreProblem("valid", start, stop, i, "validity flags missing (its images would be dropped)", self._files.show(vfile)))
            valid = self._valid_now[start:stop]
            for key in self.keys:
                arr = self._arrays[key]
                f = self._file(arr, (i,) + (0,) * (arr.ndim - 1))
                size = self._files.size(f)
                if size is None:
                    if valid.any():  # a shard of skipped images only has no file: nothing to store
                        out.append(StoreProblem(f"{_FEATURES}/{key}", start, stop, i, "shard file missing", self._files.show(f)))
                    continue
                found = self._check_index(key, f, i, start, stop, size=size)
                if not found and deep:
                    try:
                        np.asarray(arr[start:stop])
                    except Exception as exc:  # zarr raises several types for checksum / decode failures
                        found = [StoreProblem(f"{_FEATURES}/{key}", start, stop, i, f"cannot be decoded ({exc})", self._files.show(f))]
                out.extend(found)
        return out

    def verify(self, deep: bool = False) -> list[StoreProblem]:
        """Every missing, damaged or unfinished piece of the store, named by array and image range.

        Cheap by default: per shard, a ``stat`` and a read of the small shard
        index (its CRC32C, and that every image that was read has its chunk);
        ``deep=True`` also decodes every chunk, which checks each chunk's
        CRC32C (as every normal read does). An empty list means the store is
        complete and sound.
        """
        problems = self._store_level_problems()
        for i in self.unfinished_shards():
            start, stop = self.shard_range(i)
            problems.append(StoreProblem("complete", start, stop, i, "never finished (no completion marker)", self._files.show(self._file(self._complete_arr, (i,)))))
        found = self._verify_finished(deep)
        self._damaged = {p.shard for p in found if p.shard is not None}
        return problems + sorted(found, key=lambda p: (p.shard if p.shard is not None else -1, p.array))

    def shard_index_sizes(self) -> dict[str, int]:
        """``{shard file (relative to the root): byte length of its index}`` for the shard files the cheap
        :meth:`verify` checks (finished shards, checkable index layout); used by :mod:`storage.completion_cache`."""
        out = {}
        for key in self.keys:
            spec = self._index_spec.get(key)
            if spec is None or any(n != 1 for n in spec[1:]):
                continue
            files = self._shard_files(key)
            for i in np.flatnonzero(self._complete):
                out[files[int(i)]] = spec[0] * 16 + 4
        return out

    def bytes_per_image(self) -> dict[str, float]:
        """Raw float16 bytes per image (from the shapes) and bytes on disk per written image."""
        raw = sum(2 * c * h * w for c, h, w in self.shapes.values())
        on_disk = sum(n for rel, n in self._files.sizes_under(_FEATURES).items() if not rel.endswith("zarr.json"))
        written = sum(b - a for a, b in (self.shard_range(i) for i in range(self.n_shards()) if self._complete[i]))
        return {"raw": float(raw), "on_disk": float(on_disk / written) if written else float("nan")}

    # writing ---------------------------------------------------------------
    def projection(self, layer: str) -> np.ndarray | None:
        """The (C_out, C_in) projection applied to ``layer`` before storing, or None."""
        return self._projections.get(layer)

    def write_shard(self, i: int, features: dict[str, np.ndarray], valid: np.ndarray | None = None, mark_complete: bool = True) -> None:
        """Write all keys of shard ``i`` ((n_i, C, h, w) each), then mark it complete.

        Features with the *input* channel count of a layer's projection are
        projected first. Values are stored as float16; a value that overflows
        float16 (or is NaN) is refused rather than silently stored as inf/NaN.
        ``valid`` (n_i,) marks images that could not be read; default all True.
        ``mark_complete=False`` writes the data and leaves the marker unset: a Dask
        worker writes its shard, and the coordinator (which owns the group attrs)
        records the skipped images and then calls :meth:`mark_complete`.
        """
        if not self._writable:
            raise StoreError("feature store was opened read-only", where=str(self.path), fix="open it with writable=True to write shards")
        start, stop = self.shard_range(i)
        n_i = stop - start
        if set(features) != set(self.keys):
            raise StoreError(
                f"shard {i} has keys {sorted(features)}; the store expects {self.keys}",
                where=str(self.path),
                fix="extract exactly the store's layers and timesteps",
            )
        prepared: dict[str, np.ndarray] = {}
        for key in self.keys:
            x = np.asarray(features[key])
            proj = self._projections.get(key_layer(key))
            if proj is not None and x.ndim == 4 and x.shape[1] == proj.shape[1]:
                # (C_out, C_in) x (n, C_in, h, w) -> (n, C_out, h, w), in float32 before the cast.
                x = np.einsum("oc,nchw->nohw", proj, x.astype(np.float32, copy=False), optimize=True)
            want = (n_i, *self.shapes[key])
            if x.shape != want:
                raise StoreError(f"shard {i}, key {key!r}: got shape {x.shape}, expected {want}", where=str(self.path))
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked just below
                x16 = x.astype(np.float16)
            if not np.isfinite(x16).all():
                bad = int((~np.isfinite(x16)).sum())
                raise StoreError(
                    f"shard {i}, key {key!r}: {bad} values are NaN or overflow float16 (|x| > 65504)",
                    where=str(self.path),
                    fix="check the backbone's outputs, or reduce channels / pick other layers",
                )
            prepared[key] = x16
        v = np.ones(n_i, bool) if valid is None else np.asarray(valid, dtype=bool).reshape(-1)
        if v.shape != (n_i,):
            raise StoreError(f"shard {i}: valid has shape {v.shape}, expected ({n_i},)", where=str(self.path))
        # The marker goes False first: if a finished shard is being rewritten and we
        # crash half-way, it must not keep claiming to be complete.
        if self._complete[i]:
            self._complete_arr[i] = False
            self._complete[i] = False
        for key in self.keys:
            arr = self._arrays[key]
            f = self._file(arr, (i,) + (0,) * (arr.ndim - 1))
            # Zarr reads the old shard's index even when overwriting the whole shard, and a
            # truncated or corrupt index makes the write fail: a damaged file goes first.
            size = self._files.size(f)
            if size is not None and self._check_index(key, f, i, start, stop, expect_valid=False, size=size):
                self._files.remove(f)
            arr[start:stop] = prepared[key]
        self._valid_arr[start:stop] = v
        self._valid_now[start:stop] = v
        if mark_complete:
            self.mark_complete(i)

    def mark_complete(self, i: int) -> None:
        """Set shard ``i``'s completion marker (its own chunk: no other shard's marker is rewritten)."""
        if not self._writable:
            raise StoreError("feature store was opened read-only", where=str(self.path), fix="open it with writable=True")
        self.shard_range(i)  # range check
        self._complete_arr[i] = True
        self._complete[i] = True
        if self._damaged is not None:
            self._damaged.discard(i)  # every file of the shard was just rewritten

    def record_skipped(self, skipped: dict[str, str]) -> None:
        """Add ``{image_id: reason}`` for images left out with --skip-bad to the ``skipped`` attr.

        Not safe against concurrent writers (read-modify-write of the group
        attrs); the features flow writes shards one at a time.
        """
        if not skipped:
            return
        if not self._writable:
            raise StoreError("feature store was opened read-only", where=str(self.path), fix="open it with writable=True")
        current = dict(self._group.attrs.get("skipped", {}) or {})
        current.update({str(k): str(v) for k, v in skipped.items()})
        self._group.attrs.update({"skipped": current})
        self.attrs["skipped"] = current

    @property
    def skipped(self) -> dict[str, str]:
        """``{image_id: reason}`` of images whose features are zeros because they could not be read."""
        return dict(self.attrs.get("skipped", {}) or {})

    # reading ---------------------------------------------------------------
    def indices(self, split: str) -> np.ndarray:
        """Rows of ``split`` that hold features (invalid/skipped images left out), ascending."""
        if split not in set(self.splits.tolist()):
            raise StoreError(
                f"feature store has no images in split {split!r}",
                where=str(self.path),
                fix=f"available splits: {sorted(set(self.splits.tolist()))}",
            )
        return np.flatnonzero((self.splits == split) & self.valid).astype(np.int64)

    def _check_keys(self, keys: list[str] | None) -> list[str]:
        if keys is None:
            return list(self.keys)
        unknown = [k for k in keys if k not in self._arrays]
        if unknown:
            raise StoreError(f"feature keys {unknown} are not in the store", where=str(self.path), fix=f"available keys: {self.keys}")
        return list(keys)

    def _check_complete(self, start: int, stop: int) -> None:
        if stop <= start:
            return
        first, last = start // self.shard_size, (stop - 1) // self.shard_size
        todo = [s for s in range(first, last + 1) if not self._complete[s]]
        if todo:
            raise StoreError(
                f"rows {start}:{stop} touch unfinished shards {todo[:5]}",
                where=str(self.path),
                fix="finish the extraction by re-running the same `uld features` command",
            )

    def _check_files(self, key: str, start: int, stop: int) -> None:
        """A shard file deleted after the store was opened would read as zeros: refuse instead."""
        files = self._shard_files(key)
        local = self._local_paths(key)
        for s in range(start // self.shard_size, (stop - 1) // self.shard_size + 1):
            if not (local[s].is_file() if local is not None else self._files.is_file(files[s])):
                self._missing_shard_file(key, s, start, stop)

    def _missing_shard_file(self, key: str, s: int, start: int, stop: int) -> None:
        """Raise unless every image of rows [start, stop) in shard ``s`` was skipped (then there is no file)."""
        a, b = self.shard_range(s)
        if self._valid_now[max(a, start) : min(b, stop)].any():
            raise StoreError(
                f"feature data of {key!r} for images {a}:{b} (shard {s}) is missing on disk",
                where=self._files.show(self._shard_files(key)[s]),
                fix=_REPAIR_FIX,
            )

    def set_direct_reads(self, enabled: bool) -> None:
        """Read uncompressed keys from the shard files directly (default) or through Zarr (for comparisons)."""
        self._direct = {k: layout_of(a) if enabled else None for k, a in self._arrays.items()}

    def _read_direct(self, key: str, layout: RawShardLayout, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of ``key`` read from the shard files themselves (see :mod:`storage.shard_reader`)."""
        out = np.empty((stop - start, *self.shapes[key]), np.float16)
        files = self._shard_files(key)
        local = self._local_paths(key)
        for s in range(start // self.shard_size, (stop - 1) // self.shard_size + 1):
            a = s * self.shard_size
            lo, hi = max(a, start), min(a + self.shard_size, stop, self._n)
            try:
                if local is not None:
                    read_rows(local[s], layout, lo - a, hi - a, out=out[lo - start : hi - start])
                else:  # an object store: two ranged GETs per shard (index, then the chunks' span)
                    read_rows_ranged(self._files, files[s], layout, lo - a, hi - a, out=out[lo - start : hi - start])
            except FileNotFoundError:
                # Locally _check_files already made sure every image of these rows was skipped;
                # remotely the GET itself is the presence check (one request less per shard).
                if local is None:
                    self._missing_shard_file(key, s, lo, hi)
                out[lo - start : hi - start] = 0
        return out

    def _shard_files(self, key: str) -> list[str]:
        """The shard file (relative to the root) of every shard of ``key`` (computed once: reads are called per block)."""
        files = self._files_of.get(key)
        if files is None:
            arr = self._arrays[key]
            files = [self._file(arr, (s,) + (0,) * (arr.ndim - 1)) for s in range(self.n_shards())]
            self._files_of[key] = files
        return files

    def _local_paths(self, key: str) -> list[Path] | None:
        """Full paths of :meth:`_shard_files` for a local store (the fast pread path), None for a remote one."""
        if not isinstance(self._files, LocalFiles):
            return None
        paths = self._local_of.get(key)
        if paths is None:
            paths = [self._files.path(rel) for rel in self._shard_files(key)]
            self._local_of[key] = paths
        return paths

    def _get(self, key: str, start: int, stop: int) -> np.ndarray:
        """Basic-slice read of rows [start, stop) of ``key``; missing files and decode failures become StoreError.

        Uncompressed stores are read straight from their shard files (one small
        read per image chunk, each chunk's CRC32C checked; ~25x faster than
        Zarr's per-chunk decode, bench/results/store.md); others through Zarr.
        """
        layout = self._direct.get(key)
        if stop > start and not (layout is not None and self._files.remote):
            self._check_files(key, start, stop)
        try:
            if layout is not None and stop > start:
                return self._read_direct(key, layout, start, stop)
            return np.asarray(self._arrays[key][start:stop])
        except (ValueError, RuntimeError, OSError) as exc:  # checksum mismatch, truncated shard file
            raise StoreError(
                f"feature data of {key!r} rows {start}:{stop} cannot be decoded ({exc})",
                where=str(self.path),
                fix="the store is corrupt on disk: re-run the same `uld features` command with --deep, which re-extracts "
                "the shards that fail to decode (or delete the folder and re-run it)",
            ) from None

    def read(self, start: int, stop: int, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop) of each key as float16 (n, C, h, w), by basic slicing."""
        keys = self._check_keys(keys)
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self._n:
            raise StoreError(f"rows {start}:{stop} out of range for a store of {self._n} images", where=str(self.path))
        self._check_complete(start, stop)
        return {k: self._get(k, start, stop) for k in keys}

    def read_indices(self, idx: Any, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        """Rows ``idx`` (any order, repeats allowed) as float16, read as contiguous basic slices."""
        keys = self._check_keys(keys)
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self._n):
            raise StoreError(f"indices out of range for a store of {self._n} images", where=str(self.path))
        uniq = np.unique(idx)
        # Split the sorted unique rows into runs of consecutive values.
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        runs = np.split(uniq, breaks) if len(uniq) else []
        pos = np.searchsorted(uniq, idx)
        out = {}
        for k in keys:
            c, h, w = self.shapes[k]
            buf = np.empty((len(uniq), c, h, w), np.float16)
            at = 0
            for run in runs:
                a, b = int(run[0]), int(run[-1]) + 1
                self._check_complete(a, b)
                buf[at : at + b - a] = self._get(k, a, b)
                at += b - a
            out[k] = buf[pos]
        return out

    def to_dask(self, key: str) -> "dask.array.Array":
        """Key ``key`` as a dask array with one chunk per shard (N, C, h, w) float16."""
        import dask.array as da

        self._check_keys([key])
        if not self.is_complete():
            raise StoreError(
                "feature store is incomplete; a dask view would silently read zeros for missing shards",
                where=str(self.path),
                fix="finish the extraction by re-running the same `uld features` command",
            )
        c, h, w = self.shapes[key]
        return da.from_zarr(self._arrays[key], chunks=(self.shard_size, c, h, w))
