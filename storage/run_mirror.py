"""A run folder mirrored at an fsspec URL (``uld --runs-url s3://bucket/runs``).

A run is worked on in its local folder (``<home>/runs/<id>``: atomic renames,
flock, checkpoints written in place) and copied to ``<url>/<id>/`` whenever a
round or the command ends. The remote copy is what other machines and pandas
read (``pd.read_parquet("s3://bucket/runs/<id>/metrics.parquet")``), and what
``--resume`` fetches on a machine that lacks the local folder.

Object stores have no rename of a folder, so a copy is made consistent by its
index, not by moving it into place:

* every file is one object, written whole (an S3 PUT is all-or-nothing);
* the index ``uld-run-index.json`` (every file's size and SHA-256) is written
  **after** the files it lists, and files it no longer lists are deleted only
  after it; so the index always names files that are there, with the content
  it records, and a push interrupted at any point leaves the previous
  snapshot readable (plus objects nobody reads, overwritten by the next push);
* only files whose content changed since the index are uploaded;
* :meth:`RunMirror.pull` checks every file against the index's hash before
  putting it in place (atomically), so a truncated or tampered object is an
  error naming it, never a silently different run.

The index is JSON: nothing fetched is unpickled or executed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError
from storage.atomic import write_bytes
from storage.locations import FsspecFiles, is_url, join

INDEX_NAME = "uld-run-index.json"
INDEX_FORMAT = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _local_files(run_dir: Path) -> dict[str, Path]:
    """The run's files by '/'-relative name; temporary files of an atomic write in progress are skipped."""
    out: dict[str, Path] = {}
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and not path.is_symlink() and not (path.name.startswith(".") and path.name.endswith(".tmp")):
            out[path.relative_to(run_dir).as_posix()] = path
    return out


@dataclass(frozen=True)
class MirrorReport:
    """What one :meth:`RunMirror.push` or :meth:`RunMirror.pull` did."""

    url: str
    files: int  # files in the snapshot
    transferred: int  # files uploaded / downloaded
    bytes: int  # bytes uploaded / downloaded
    removed: int = 0  # objects deleted (no longer in the run)

    def describe(self, verb: str) -> str:
        return f"{verb} {self.transferred} of {self.files} files ({self.bytes / 2**20:.2f} MiB), {self.url}"


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

    # ---------------------------------------------------------------- the index
    def read_index(self) -> dict[str, Any] | None:
        """The remote index, or None when there is no copy at the URL."""
        if not self.files.is_file(INDEX_NAME):
            return None
        try:
            index = json.loads(self.files.read(INDEX_NAME))
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreError(f"the run index is not valid JSON: {exc}", where=self.files.show(INDEX_NAME),
                             fix="push the run again from a machine that has its folder (the next `uld` command on it does)") from None
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("files"), dict):
            raise StoreError("not a run index of this version", where=self.files.show(INDEX_NAME), fix="push the run again with this version")
        return index

    def exists(self) -> bool:
        return self.read_index() is not None

    # ---------------------------------------------------------------- push / pull
    def push(self) -> MirrorReport:
        """Upload what changed since the remote index, then the new index, then delete what the run no longer has."""
        if not (self.run_dir / "config.json").is_file():
            raise StoreError("not a run folder (no config.json)", where=str(self.run_dir), fix="push only runs that have started")
        old = (self.read_index() or {}).get("files", {})
        entries: dict[str, dict[str, Any]] = {}
        sent = sent_bytes = 0
        for rel, path in _local_files(self.run_dir).items():
            if rel == INDEX_NAME:
                continue
            size, digest = path.stat().st_size, _sha256(path)
            entries[rel] = {"size": int(size), "sha256": digest}
            if old.get(rel) == entries[rel] and self.files.size(rel) == size:
                continue  # unchanged since the last push, and still there
            self.files.write(rel, path.read_bytes())
            sent += 1
            sent_bytes += size
        index = {"format": INDEX_FORMAT, "run_id": self.run_dir.name, "files": entries}
        self.files.write(INDEX_NAME, json.dumps(index, indent=1, sort_keys=True).encode())
        gone = [rel for rel in old if rel not in entries]
        for rel in gone:
            self.files.remove(rel)
        return MirrorReport(self.url, len(entries), sent, sent_bytes, len(gone))

    def pull(self) -> MirrorReport:
        """Fetch the remote copy into the local run folder (files already there with the indexed content are kept)."""
        index = self.read_index()
        if index is None:
            raise StoreError("no run at this URL (no run index)", where=self.files.show(INDEX_NAME),
                             fix="check --runs-url and --run-id (the run is pushed there when its first round ends)")
        got = got_bytes = 0
        root = self.run_dir.resolve()
        for rel, entry in sorted(index["files"].items()):
            target = (self.run_dir / rel).resolve()
            if root not in target.parents or rel.startswith("/") or "\\" in rel:
                raise StoreError(f"the run index names a file outside the run folder: {rel!r}", where=self.files.show(INDEX_NAME),
                                 fix="do not resume from this copy; push the run again from a trusted machine")
            if target.is_file() and target.stat().st_size == entry["size"] and _sha256(target) == entry["sha256"]:
                continue
            data = self.files.read(rel)
            if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise StoreError(f"{rel} differs from the run index (size or SHA-256)", where=self.files.show(rel),
                                 fix="push the run again from the machine that has its folder, or resume there")
            target.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(target, data)
            got += 1
            got_bytes += len(data)
        return MirrorReport(self.url, len(index["files"]), got, got_bytes)
