"""Direct reads of uncompressed Zarr v3 shard files: one ``pread`` per shard instead of a decode per chunk.

The feature store keeps one image per chunk (random access per image) and
``shard_size`` images per file. Reading through Zarr costs ~0.5 ms per chunk
(an async-loop round trip per image), 80x slower than ``np.load`` of the same
bytes. For the store's default codec chain (``bytes`` little-endian +
``crc32c`` inside ``sharding_indexed``, index at the end, itself ``bytes`` +
``crc32c``: the Zarr v3 sharding specification) a chunk is simply its raw
array bytes followed by their CRC32C, so a range of images is read here as:

1. read the shard index (the file's last ``16 * n + 4`` bytes), check its CRC32C;
2. read the byte range spanning the requested chunks in one call;
3. check each chunk's CRC32C and copy its bytes into the output.

Same bytes and same checks as Zarr (a flipped bit fails its CRC), same file
format (writers are untouched, so shards stay resumable), per-image random
access (a single image reads one index and one chunk). Anything else (zstd,
another index layout) is read by Zarr as before: :func:`layout_of` returns None.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from storage.crc32c import RESIDUE as _RESIDUE
from storage.crc32c import implementation as _crc32c

_BYTES_LE = {"name": "bytes", "configuration": {"endian": "little"}}
_CHAIN = [_BYTES_LE, {"name": "crc32c"}]
_EMPTY = np.uint64(2**64 - 1)

_NATIVE: list = []  # [ctypes function or None], resolved once


def _native_crc32c() -> Any:
    """``crc32c_value(ptr, nbytes)`` of the C library behind google_crc32c, via ctypes, or None.

    The Python binding accepts only ``bytes``; calling the library on a numpy
    buffer lets a chunk be read straight into the output array and checked
    there (one copy instead of two). Checked against the binding once.
    """
    if _NATIVE:
        return _NATIVE[0]
    fn = None
    crc = _crc32c()
    if crc is not None:
        import ctypes
        import ctypes.util

        base = Path(crc.__file__).resolve().parent
        candidates = sorted((base.parent / "google_crc32c.libs").glob("libcrc32c*.so*")) + sorted(base.glob("libcrc32c*.so*"))
        name = ctypes.util.find_library("crc32c")
        for lib in [str(c) for c in candidates] + ([name] if name else []):
            try:
                f = ctypes.CDLL(lib).crc32c_value
            except (OSError, AttributeError):
                continue
            f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_uint32
            probe = np.frombuffer(b"uld shard reader self-check", np.uint8)
            if f(probe.ctypes.data, probe.nbytes) == crc.value(probe.tobytes()):
                fn = f
                break
    _NATIVE.append(fn)
    return fn


@dataclass(frozen=True)
class RawShardLayout:
    """Shape of one shard file of an array whose chunks are raw bytes + CRC32C."""

    chunks_per_shard: int
    chunk_shape: tuple[int, ...]  # (1, C, h, w): one image per chunk
    dtype: np.dtype

    @property
    def chunk_nbytes(self) -> int:
        """Encoded size of one chunk: the array bytes and their 4-byte CRC32C."""
        return int(np.prod(self.chunk_shape)) * self.dtype.itemsize + 4

    @property
    def index_nbytes(self) -> int:
        return self.chunks_per_shard * 16 + 4


def layout_of(arr: Any) -> RawShardLayout | None:
    """The raw layout of a Zarr array when this module can read it (and CRC32C is available), else None."""
    if _crc32c() is None:
        return None
    try:
        meta = json.loads(json.dumps(arr.metadata.to_dict(), default=str))
        (codec,) = meta["codecs"]
        conf = codec["configuration"]
        if codec["name"] != "sharding_indexed" or conf.get("index_location", "end") != "end":
            return None
        if conf["codecs"] != _CHAIN or conf["index_codecs"] != _CHAIN:
            return None
        inner = [int(x) for x in conf["chunk_shape"]]
        outer = [int(x) for x in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        # One image per chunk, whole images per shard: chunks are contiguous rows.
        if inner[0] != 1 or inner[1:] != outer[1:]:
            return None
        dtype = np.dtype(str(meta["data_type"])).newbyteorder("<")
        return RawShardLayout(outer[0], tuple(inner), dtype)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def read_rows(path: Path, layout: RawShardLayout, first: int, last: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``[first, last)`` of one shard (positions inside the shard) as an (n, C, h, w) array.

    ``out`` (C-contiguous, (n, C, h, w), the layout's dtype) is filled in place
    instead of allocating, so a multi-shard read copies each byte once.

    Chunks absent from the index (images never read, ``--skip-bad``) are zeros,
    the store's fill value. Raises ``ValueError`` for a truncated file, an
    index or chunk whose CRC32C does not match, or a chunk of unexpected size.
    """
    n = last - first
    if out is None:
        out = np.empty((n, *layout.chunk_shape[1:]), layout.dtype)
    if n <= 0:
        return out
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < layout.index_nbytes:
            raise ValueError(f"shard file truncated ({size} bytes)")
        raw_index = os.pread(fd, layout.index_nbytes, size - layout.index_nbytes)
        located = _locate(raw_index, layout, size, first, last, out)
        if located is None:
            return out
        rows, offsets = located
        flat = out.reshape(n, -1).view(np.uint8)
        nb = layout.chunk_nbytes
        native = _native_crc32c()
        if native is not None and len(rows) == n and (np.diff(offsets) == nb).all():
            _read_contiguous(fd, flat, int(offsets[0]), native, first)
            return out
        for row, off in zip(rows.tolist(), offsets.tolist()):
            # One pread per chunk: the kernel's copy gives a bytes object, the only buffer the
            # CRC32C routine accepts (it refuses numpy / memoryview ones), so no extra copy.
            chunk = os.pread(fd, nb, off)
            _check_chunk(chunk, nb, first + row)
            flat[row] = np.frombuffer(chunk, np.uint8, count=nb - 4)
    finally:
        os.close(fd)
    return out


def _locate(raw_index: bytes, layout: RawShardLayout, size: int, first: int, last: int, out: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Check the shard index; zero the rows without a chunk; (rows, offsets) of the others, or None if none."""
    crc = _crc32c()
    if len(raw_index) != layout.index_nbytes or crc.value(raw_index) != _RESIDUE:
        raise ValueError("shard index checksum mismatch")
    entries = np.frombuffer(raw_index, "<u8", count=2 * layout.chunks_per_shard).reshape(-1, 2)[first:last]
    present = entries[:, 0] != _EMPTY
    out[~present] = 0  # the store's fill value (rows written below need no clearing)
    if not present.any():
        return None
    offsets = entries[present, 0].astype(np.int64)
    sizes = entries[present, 1].astype(np.int64)
    if (sizes != layout.chunk_nbytes).any():
        raise ValueError("chunk of unexpected size (not the uncompressed layout)")
    if int((offsets + sizes).max()) > size - layout.index_nbytes:
        raise ValueError("chunk extends past the shard's data")
    return np.flatnonzero(present), offsets


def _check_chunk(chunk: bytes, nb: int, image: int) -> None:
    if len(chunk) != nb:
        raise ValueError(f"shard file ends inside the chunk of image {image} of the shard")
    if _crc32c().value(chunk) != _RESIDUE:
        raise ValueError(f"chunk checksum mismatch (image {image} of the shard)")


def read_rows_ranged(files: Any, rel: str, layout: RawShardLayout, first: int, last: int, out: np.ndarray | None = None) -> np.ndarray:
    """:func:`read_rows` through ranged reads of ``files`` (a :class:`storage.locations.Files`): object stores.

    Two requests per shard whatever the number of images: the index (the
    object's last bytes), then one range spanning the requested chunks; every
    CRC32C is checked as in :func:`read_rows`. Raises FileNotFoundError when the
    shard object does not exist (the caller decides whether that is damage).
    """
    n = last - first
    if out is None:
        out = np.empty((n, *layout.chunk_shape[1:]), layout.dtype)
    if n <= 0:
        return out
    size = files.size(rel)
    if size is None:
        raise FileNotFoundError(files.show(rel))
    if size < layout.index_nbytes:
        raise ValueError(f"shard file truncated ({size} bytes)")
    raw_index = files.read_range(rel, size - layout.index_nbytes, layout.index_nbytes)
    located = _locate(raw_index, layout, size, first, last, out)
    if located is None:
        return out
    rows, offsets = located
    nb = layout.chunk_nbytes
    lo, hi = int(offsets.min()), int(offsets.max()) + nb
    span = files.read_range(rel, lo, hi - lo)
    flat = out.reshape(n, -1).view(np.uint8)
    for row, off in zip(rows.tolist(), offsets.tolist()):
        a = off - lo
        chunk = span[a : a + nb]
        _check_chunk(chunk, nb, first + row)
        flat[row] = np.frombuffer(chunk, np.uint8, count=nb - 4)
    return out


_IOV_PAIRS = 256  # chunks per preadv call (2 buffers each; IOV_MAX is 1024 on Linux)


def _read_contiguous(fd: int, flat: np.ndarray, offset: int, native: Any, first: int) -> None:
    """Chunks stored back to back from ``offset``: scatter-read each chunk's bytes into its row of
    ``flat`` and its CRC into a side buffer (one ``preadv`` per 256 chunks), then check every row."""
    n, row_bytes = flat.shape
    crcs = np.empty((n, 4), np.uint8)
    for a in range(0, n, _IOV_PAIRS):
        b = min(a + _IOV_PAIRS, n)
        bufs = []
        for i in range(a, b):
            bufs += [memoryview(flat[i]), memoryview(crcs[i])]
        want = (b - a) * (row_bytes + 4)
        got = os.preadv(fd, bufs, offset + a * (row_bytes + 4))
        if got != want:  # a short read: only at the end of a truncated file
            raise ValueError(f"shard file ends {want - got} bytes early")
    stored = crcs.view("<u4").reshape(n)
    base = flat.ctypes.data
    for i in range(n):
        if native(base + i * row_bytes, row_bytes) != stored[i]:
            raise ValueError(f"chunk checksum mismatch (image {first + i} of the shard)")
