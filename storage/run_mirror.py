"""A run folder mirrored at an fsspec URL (``uld --runs-url s3://bucket/runs``).

A run is worked on in its local folder (``<home>/runs/<id>``: atomic renames,
flock, checkpoints written in place) and copied to ``<url>/<id>/`` whenever a
round or the command ends; ``--resume`` on a machine without the local folder
fetches the copy first.

Layout at ``<url>/<id>/``::

    uld-run-index.json        the snapshot: every file's name, size and SHA-256
    blobs/<sha256>            file contents, named by their hash (the truth)
    <the run's own names>     a readable view of the results (Parquet, JSON, Markdown, HTML,
                              PNG): pd.read_parquet("<url>/<id>/metrics.parquet")

Object stores have no rename of a folder, so the copy is made consistent by
content addressing instead:

* a push uploads the blobs the index does not have yet (each one object,
  written whole: an S3 PUT is all-or-nothing; a blob's name is its content, so
  an upload never changes what an existing name means), then writes the index,
  then refreshes the readable view, then deletes the blobs no index references.
  A push interrupted at any point leaves the previous index and every blob it
  names: the copy is always the last whole snapshot;
* a pull checks every index entry before fetching anything (names inside the
  run folder, well-formed sizes and hashes), fetches the blobs into a temporary
  sibling folder, checks each against its hash and renames the folder into
  place last, so an interrupted pull leaves no half run that looks resumable;
* a machine pushes only over the snapshot it last pushed or fetched (recorded in
  the local folder as ``.uld-mirror-base.json``, never copied): another machine's
  newer rounds at the URL are never replaced by an older local folder; and an
  object lock (:class:`storage.locks.ObjectLock`) keeps two pushes or a push and a
  pull of one run apart.

What the hashes prove: that what is fetched is what the index lists (a truncated,
lost or swapped object is an error naming it). The index lives in the same bucket,
so they do not protect against someone who can rewrite the index too; nothing fetched
is unpickled or executed (the run's files are safetensors, JSON, Parquet, PNG and
``np.load`` archives without pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.errors import StoreError
from storage.atomic import is_temporary, write_json
from storage.locations import FsspecFiles, is_url, join
from storage.locks import writer_lock

INDEX_NAME = "uld-run-index.json"
INDEX_FORMAT = 2
BLOBS = "blobs"
BASE_NAME = ".uld-mirror-base.json"  # local only: the snapshot this folder was last pushed as / fetched from
#: Files also copied under their own names after each snapshot (small results people read directly).
VIEW_SUFFIXES = (".parquet", ".json", ".md", ".html", ".png")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _local_files(run_dir: Path) -> dict[str, Path]:
    """The run's files by '/'-relative name (atomic writes in progress and the local base record left out)."""
    out: dict[str, Path] = {}
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and not path.is_symlink() and not is_temporary(path) and path.name != BASE_NAME:
            out[path.relative_to(run_dir).as_posix()] = path
    return out


def _index_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class MirrorReport:
    """What one :meth:`RunMirror.push` or :meth:`RunMirror.pull` did."""

    url: str
    files: int  # files in the snapshot
    transferred: int  # blobs uploaded / files downloaded
    bytes: int  # bytes uploaded / downloaded
    removed: int = 0  # blobs deleted (no snapshot refers to them any more)

    def describe(self, verb: str) -> str:
        gone = f", {self.removed} old blobs deleted" if self.removed else ""
        return f"{verb} {self.transferred} of {self.files} files ({self.bytes / 2**20:.2f} MiB){gone}, {self.url}"


class RunMirror:
    """The copy of the local run folder ``run_dir`` at ``url`` (``<runs-url>/<run id>``)."""

    def __init__(self, run_dir: str | Path, url: str) -> None:
        if not is_url(url):
            raise StoreError(f"{url!r} is not a URL", where="--runs-url", fix="give an fsspec URL such as s3://bucket/runs")
        self.run_dir = Path(run_dir)
        self.url = str(url).rstrip("/")
        self._files: FsspecFiles | None = None

    @classmethod
    def for_run(cls, runs_url: str, run_dir: str | Path) -> "RunMirror":
        """The mirror of ``run_dir`` below ``runs_url`` (the run id is the folder's name)."""
        return cls(run_dir, str(join(runs_url, Path(run_dir).name)))

    @property
    def files(self) -> FsspecFiles:
        if self._files is None:
            self._files = FsspecFiles(self.url)  # checks the bucket once, with a clean error
        return self._files

    def _io(self, what: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` with the file system's own errors (botocore, aiohttp, OSError) as one clean StoreError."""
        try:
            return fn(*args)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any client library's failure, reported once
            raise StoreError(f"{what} failed: {type(exc).__name__}: {exc}", where=self.url,
                             fix="check the endpoint, credentials and network (for S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), then re-run") from None

    # ---------------------------------------------------------------- the index
    def _read_index_raw(self) -> bytes | None:
        if not self._io("reading the run index", self.files.is_file, INDEX_NAME):
            return None
        return self._io("reading the run index", self.files.read, INDEX_NAME)

    def read_index(self) -> dict[str, Any] | None:
        """The remote index (every entry checked), or None when there is no copy at the URL."""
        raw = self._read_index_raw()
        return None if raw is None else self._parse_index(raw)

    def _parse_index(self, raw: bytes) -> dict[str, Any]:
        where = self.files.show(INDEX_NAME)
        try:
            index = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreError(f"the run index is not valid JSON: {exc}", where=where,
                             fix="push the run again from a machine that has its folder") from None
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("files"), dict):
            raise StoreError("not a run index of this version", where=where, fix="push the run again with this version")
        for rel, entry in index["files"].items():
            parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
            if not parts or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts) or ":" in parts[0]:
                raise StoreError(f"the run index names a file outside the run folder: {rel!r}", where=where,
                                 fix="do not resume from this copy; push the run again from a trusted machine")
            if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] >= 0
                    and isinstance(entry.get("sha256"), str) and _SHA.match(entry["sha256"])):
                raise StoreError(f"the run index entry of {rel!r} is malformed: {entry!r}", where=where,
                                 fix="push the run again from a machine that has its folder")
        return index

    def exists(self) -> bool:
        return self._read_index_raw() is not None

    # ---------------------------------------------------------------- local record of the last snapshot
    def _base(self) -> dict[str, Any]:
        try:
            base = json.loads((self.run_dir / BASE_NAME).read_text())
            return base if isinstance(base, dict) and base.get("url") == self.url else {}
        except (OSError, ValueError):
            return {}

    def _write_base(self, index_raw: bytes, hashes: dict[str, list]) -> None:
        write_json(self.run_dir / BASE_NAME, {"url": self.url, "index_sha256": _index_digest(index_raw), "hashes": hashes})

    def _check_base(self, raw: bytes | None, base: dict[str, Any]) -> None:
        if raw is not None and base.get("index_sha256") != _index_digest(raw):
            raise StoreError(
                "the copy at the URL is not the one this folder was last pushed as or fetched from "
                "(another machine pushed this run, or the id was used twice); not overwriting it",
                where=self.url,
                fix="move this run folder aside and `--resume` from the copy (it is fetched when the local folder is missing), "
                    "or use another --run-id",
            )

    def check_can_push(self) -> None:
        """Raise the :class:`StoreError` a :meth:`push` would raise for a copy this folder did not come from (before any work)."""
        self._check_base(self._read_index_raw(), self._base())

    # ---------------------------------------------------------------- push / pull
    def push(self) -> MirrorReport:
        """Upload a snapshot of the local folder (see the module docstring for the order)."""
        if not (self.run_dir / "config.json").is_file():
            raise StoreError("not a run folder (no config.json)", where=str(self.run_dir), fix="push only runs that have started")
        with writer_lock(self.url, "run copy"):
            raw = self._read_index_raw()
            base = self._base()
            self._check_base(raw, base)
            old = self._parse_index(raw)["files"] if raw is not None else {}
            have = {e["sha256"] for e in old.values()}
            cached: dict[str, list] = base.get("hashes", {}) if raw is not None else {}
            entries: dict[str, dict[str, Any]] = {}
            hashes: dict[str, list] = {}
            sent = sent_bytes = 0
            for rel, path in _local_files(self.run_dir).items():
                st = path.stat()
                seen = cached.get(rel)
                # Hashes are cached by (size, mtime): a round re-hashes only what it wrote.
                digest = seen[2] if seen and seen[:2] == [st.st_size, st.st_mtime_ns] else None
                if digest is None or digest not in have:
                    data = path.read_bytes() if st.st_size <= 64 * _CHUNK else None
                    digest = hashlib.sha256(data).hexdigest() if data is not None else _sha256(path)
                    if digest not in have:
                        key = f"{BLOBS}/{digest}"
                        if data is not None:  # the bytes hashed are the bytes sent
                            self._io(f"uploading {rel}", self.files.write, key, data)
                        else:  # a large file is streamed, not held in memory
                            self._io(f"uploading {rel}", self.files.fs.put_file, str(path), self.files.key(key))
                            after = path.stat()
                            if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                                self._io(f"removing the stale upload of {rel}", self.files.remove, key)
                                raise StoreError(f"{rel} changed while it was copied", where=str(path),
                                                 fix="re-run when no process writes the run (the copy at the URL is unchanged)")
                        have.add(digest)
                        sent += 1
                        sent_bytes += st.st_size
                entries[rel] = {"size": int(st.st_size), "sha256": digest}
                hashes[rel] = [st.st_size, st.st_mtime_ns, digest]
            index_raw = json.dumps({"format": INDEX_FORMAT, "run_id": self.run_dir.name, "files": entries}, indent=1, sort_keys=True).encode()
            self._io("writing the run index", self.files.write, INDEX_NAME, index_raw)
            self._write_base(index_raw, hashes)
            # The readable view (after the index: the snapshot is already whole without it).
            for rel, entry in entries.items():
                if rel.endswith(VIEW_SUFFIXES) and old.get(rel) != entry:
                    self._io(f"writing {rel}", self.files.write, rel, (self.run_dir / rel).read_bytes())
            for rel in old:
                if rel not in entries and rel.endswith(VIEW_SUFFIXES):
                    self._io(f"deleting {rel}", self.files.remove, rel)
            keep = {e["sha256"] for e in entries.values()}
            gone = sorted({e["sha256"] for e in old.values()} - keep)
            for digest in gone:
                self._io("deleting an old blob", self.files.remove, f"{BLOBS}/{digest}")
        return MirrorReport(self.url, len(entries), sent, sent_bytes, len(gone))

    def pull(self) -> MirrorReport:
        """Fetch the copy into the (absent or unfinished) local run folder, whole or not at all."""
        if (self.run_dir / "config.json").is_file():
            raise StoreError("the run folder exists here; not replacing it with the copy", where=str(self.run_dir),
                             fix="resume here without fetching, or move the folder away first")
        with writer_lock(self.url, "run copy"):
            raw = self._read_index_raw()
            if raw is None:
                raise StoreError("no run at this URL (no run index)", where=self.files.show(INDEX_NAME),
                                 fix="check --runs-url and --run-id (the run is pushed there when its first round ends)")
            index = self._parse_index(raw)  # every name and entry checked before anything is fetched
            self.run_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.run_dir.name}.", suffix=".fetch", dir=self.run_dir.parent))
            try:
                got = got_bytes = 0
                hashes: dict[str, list] = {}
                for rel, entry in sorted(index["files"].items()):
                    data = self._io(f"fetching {rel}", self.files.read, f"{BLOBS}/{entry['sha256']}")
                    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                        raise StoreError(f"{rel} differs from the run index (size or SHA-256)", where=self.files.show(f"{BLOBS}/{entry['sha256']}"),
                                         fix="push the run again from the machine that has its folder, or resume there")
                    target = tmp / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                    st = target.stat()
                    hashes[rel] = [st.st_size, st.st_mtime_ns, entry["sha256"]]
                    got += 1
                    got_bytes += len(data)
                write_json(tmp / BASE_NAME, {"url": self.url, "index_sha256": _index_digest(raw), "hashes": hashes})
                if self.run_dir.exists():  # an unfinished folder without config.json (a start that failed early)
                    shutil.rmtree(self.run_dir)
                os.replace(tmp, self.run_dir)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return MirrorReport(self.url, len(index["files"]), got, got_bytes)
