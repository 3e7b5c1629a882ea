"""Where a feature store lives: a local folder or any fsspec URL (``s3://``, ``gs://``, ``memory://``, ...).

The store's code asks a :class:`Files` object for the few file operations it
needs (is there an object, how big, a byte range, delete one, the sizes under a
prefix) and for the Zarr store to open the group with. Two implementations:

* :class:`LocalFiles`: the folder on this machine, exactly the code paths the
  store always had (``stat``, ``pread``/``preadv`` through
  :mod:`storage.shard_reader`, atomic ``rename`` of a new store);
* :class:`FsspecFiles`: an fsspec file system (``zarr.storage.FsspecStore`` for
  Zarr, ranged GETs for the shard-direct reads).

Object stores differ from a local disk in what is atomic, and the store relies
only on what both have:

* **one object write is all-or-nothing** (an S3 PUT, like a local
  ``os.replace``): every shard file, validity chunk and completion marker is one
  object, written whole, so the "marker last" rule keeps resumption sound;
* **there is no rename of a folder**: a new remote store is built in a local
  temporary folder and uploaded file by file, its root ``zarr.json`` last
  (and, where the file system can, only if absent). A reader or a resumed run
  recognises a store by that root object, so it never meets a store without
  its ids and array metadata; an interrupted upload leaves only objects nobody
  reads, and the next creation overwrites them;
* **no flock**: :mod:`storage.locks` uses a lock object with an owner and an
  expiry instead (see :class:`storage.locks.ObjectLock`).

Credentials and endpoints come from the file system's usual configuration (for
S3: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL`` or
``~/.aws``; fsspec's ``FSSPEC_<PROTOCOL>_<OPTION>`` variables), so no secret is
ever written into a command line, a store or a run's config.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(location: str | Path) -> bool:
    """True for ``proto://...`` locations other than ``file://`` (those are local paths)."""
    if isinstance(location, Path):
        return False
    m = _URL.match(str(location))
    return bool(m) and m.group(1).lower() not in ("file", "local")


def local_path(location: str | Path) -> Path:
    """A local location as a Path (``file://`` prefix removed)."""
    text = str(location)
    m = _URL.match(text)
    return Path(text[len(m.group(0)) :]) if m else Path(text)


def join(location: str | Path, *parts: str) -> str | Path:
    """``location/part/...``: a Path for local locations, a URL string for remote ones."""
    if not is_url(location):
        return local_path(location).joinpath(*parts)
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])


def split_parent(location: str | Path) -> tuple[str | Path, str]:
    """``(parent, name)`` of a location (the lock object lives in the parent, named after ``name``)."""
    if not is_url(location):
        p = local_path(location)
        return p.parent, p.name
    text = str(location).rstrip("/")
    parent, _, name = text.rpartition("/")
    if not name or parent.endswith(":/"):
        raise StoreError(f"{location!r} names a bucket, not a folder inside it", where=str(location), fix="add a prefix, e.g. s3://bucket/features")
    return parent, name


def _remote_fs(url: str) -> tuple[Any, str]:
    """The (sync) fsspec file system for ``url`` and the path inside it; clear errors when unusable."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:  # pragma: no cover - fsspec comes with dask[array]
        raise StoreError("fsspec is not installed", where=url, fix="pip install fsspec (and s3fs / gcsfs for s3:// / gs://)") from None
    try:
        return url_to_fs(url)
    except ImportError as exc:
        proto = url.split("://", 1)[0]
        pkg = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(proto, f"the fsspec implementation of {proto}://")
        raise StoreError(f"cannot open {proto}:// locations: {exc}", where=url, fix=f"pip install {pkg}") from None
    except ValueError as exc:  # unknown protocol
        raise StoreError(f"not a usable store URL: {exc}", where=url, fix="use a local path or an fsspec URL such as s3://bucket/prefix") from None


# (protocol, container) pairs already found reachable in this process: the check costs one
# request, and a store is opened many times (each Dask task, each loader worker).
_REACHABLE: set[tuple[str, str]] = set()


def _check_container(fs: Any, url: str, root: str) -> None:
    """Raise a clean :class:`StoreError` unless the bucket (first path part) of ``url`` can be reached.

    Without it a typo in the bucket name, a wrong endpoint or missing credentials
    surface as botocore / aiohttp tracebacks from the first write (or, for a
    missing bucket, as "store not found" followed by a failed upload). The file
    systems raise many exception types for "cannot connect"; only this up-front
    probe turns them all into one message, later I/O errors keep their type
    (a transient one is retried by the flow).
    """
    proto = url.split("://", 1)[0].lower()
    container = root.split("/", 1)[0]
    if proto == "memory" or not container or (proto, container) in _REACHABLE:
        return  # memory:// has no containers to check
    shown = f"{proto}://{container}"
    try:
        # info, not exists(): s3fs's exists() answers False for "cannot connect" too (after its retries).
        fs.info(container)
        found = True
    except FileNotFoundError:
        found = False
    except PermissionError as exc:
        raise StoreError(f"access to {shown} denied: {exc}", where=url, fix=_CREDENTIALS_FIX) from None
    except Exception as exc:  # noqa: BLE001 -- connection, DNS, TLS, credential errors of any client library
        raise StoreError(f"cannot reach {shown}: {type(exc).__name__}: {exc}", where=url, fix=_CREDENTIALS_FIX) from None
    if not found:
        raise StoreError(f"bucket {shown} does not exist (or is not visible with these credentials)", where=url,
                         fix=f"create the bucket or fix the URL; {_CREDENTIALS_FIX}")
    _REACHABLE.add((proto, container))


_CREDENTIALS_FIX = (
    "check the endpoint and credentials in the environment (for S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
    "AWS_SECRET_ACCESS_KEY, or ~/.aws) and that the network reaches it"
)


class Files:
    """The file operations of one store root (``rel`` paths use '/' and are relative to the root)."""

    remote: bool = False

    def show(self, rel: str = "") -> str:
        """The full path or URL of ``rel``, for messages."""
        raise NotImplementedError

    def size(self, rel: str) -> int | None:
        """Size in bytes of the file ``rel``, None when there is none."""
        raise NotImplementedError

    def is_file(self, rel: str) -> bool:
        return self.size(rel) is not None

    def read_range(self, rel: str, offset: int, n: int) -> bytes:
        """``n`` bytes from ``offset`` (fewer at the end of the file); FileNotFoundError when absent."""
        raise NotImplementedError

    def remove(self, rel: str) -> None:
        raise NotImplementedError

    def sizes_under(self, rel: str) -> dict[str, int]:
        """Every file below ``rel`` with its size (keys relative to the root)."""
        raise NotImplementedError

    def zarr_store(self, read_only: bool) -> Any:
        """What ``zarr.open_group`` opens the root with."""
        raise NotImplementedError


class LocalFiles(Files):
    """A store folder on this machine."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def show(self, rel: str = "") -> str:
        return str(self.path(rel))

    def size(self, rel: str) -> int | None:
        try:
            st = os.stat(self.path(rel))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return int(st.st_size) if stat.S_ISREG(st.st_mode) else None

    def is_file(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def read_range(self, rel: str, offset: int, n: int) -> bytes:
        with open(self.path(rel), "rb") as fh:
            fh.seek(offset)
            return fh.read(n)

    def remove(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def sizes_under(self, rel: str) -> dict[str, int]:
        base = self.path(rel)
        return {p.relative_to(self.root).as_posix(): p.stat().st_size for p in base.rglob("*") if p.is_file()}

    def zarr_store(self, read_only: bool) -> Any:
        return str(self.root)


class FsspecFiles(Files):
    """A store root behind an fsspec file system (S3, GCS, Azure, memory, ...)."""

    remote = True

    def __init__(self, url: str) -> None:
        self.url = str(url).rstrip("/")
        self.fs, self.root = _remote_fs(self.url)
        self.root = self.root.rstrip("/")
        _check_container(self.fs, self.url, self.root)

    def key(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def show(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def size(self, rel: str) -> int | None:
        try:
            info = self.fs.info(self.key(rel))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if info.get("type") != "file":
            return None
        return int(info["size"])

    def read_range(self, rel: str, offset: int, n: int) -> bytes:
        return bytes(self.fs.cat_file(self.key(rel), start=int(offset), end=int(offset) + int(n)))

    def read(self, rel: str) -> bytes:
        return bytes(self.fs.cat_file(self.key(rel)))

    def write(self, rel: str, data: bytes, exclusive: bool = False) -> None:
        """One object, written whole; ``exclusive``: FileExistsError if it exists (atomic on S3 and GCS)."""
        if exclusive:
            self.fs.pipe_file(self.key(rel), data, mode="create")
        else:
            self.fs.pipe_file(self.key(rel), data)

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.key(rel))
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.key(rel))

    def sizes_under(self, rel: str) -> dict[str, int]:
        base = self.key(rel)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        finally:
            # The listing (of every folder below) must not answer later existence checks:
            # another process may delete or add objects at any time.
            self.fs.invalidate_cache()
        n = len(self.root) + 1
        return {k[n:]: int(v["size"]) for k, v in found.items() if v.get("type") == "file"}

    def zarr_store(self, read_only: bool) -> Any:
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url, read_only=read_only)


def files_for(location: str | Path) -> Files:
    """The :class:`Files` of a store location (local path, ``file://`` or any fsspec URL)."""
    return FsspecFiles(str(location)) if is_url(location) else LocalFiles(local_path(location))
