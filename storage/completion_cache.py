"""Records that let a no-op ``uld features`` answer without pandas or Zarr: valid only while the files are unchanged.

``uld features`` on a finished store must still notice anything that makes the
store unfinished (a deleted or damaged shard file, a changed manifest). Doing
that the ordinary way needs the manifests (pandas) and the store (Zarr), about
1.5 s of imports on a busy 2-core machine for a check that takes milliseconds.
Two records in the workspace's ``cache/`` folder make the no-op cheap, in the
spirit of :mod:`storage.backbone_identities`:

* ``manifest-fingerprints.json``: per dataset, the manifest files'
  ``(size, mtime_ns, inode)`` and what the store's name is computed from (the
  manifest fingerprint and the number of images). Manifests are written
  atomically (a new inode each time), so any rewrite invalidates the record.
* ``complete-stores.json``: per local store, written right after the ordinary
  check found it complete and usable: every file of the store with its
  ``(size, mtime_ns, inode)``, the byte length of each shard file's index, and
  the summary the CLI prints. The no-op then ``stat``s every file and re-checks
  every shard index's CRC32C (what the ordinary cheap check reads); any
  difference (a file gone, rewritten, truncated, a marker changed) means "not
  known": the caller takes the ordinary path, which decides and says why.

Both are hints, never the truth: a missing, unreadable or stale record only
costs the ordinary check. Remote stores (fsspec URLs) are not recorded (their
objects have no inode and mtime semantics to trust), they take the ordinary path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.features import FeatureStore

_VERSION = 1
_MAX_STORES = 200  # oldest records are dropped beyond this: the file stays small


def _stat_key(path: Path) -> list[int]:
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ino)]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("version") == _VERSION else {}


def _write(path: Path, data: dict) -> bool:
    from storage.atomic import write_json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {**data, "version": _VERSION})
        return True
    except OSError:  # a read-only or full workspace: the next no-op takes the ordinary path
        return False


def _cache_dir(home: str | Path) -> Path:
    from storage.layout import Workspace

    return Workspace(Path(home)).cache_dir()


# manifests ---------------------------------------------------------------------
def recorded_manifest(home: str | Path, dataset: str, manifest_paths: list[Path]) -> dict | None:
    """``{"fingerprint", "n_images"}`` recorded for these unchanged manifest files, else None."""
    entry = _read(_cache_dir(home) / "manifest-fingerprints.json").get("datasets", {}).get(dataset)
    if not isinstance(entry, dict):
        return None
    try:
        if entry["files"] != [[str(p), *_stat_key(p)] for p in manifest_paths]:
            return None
        return {"fingerprint": str(entry["fingerprint"]), "n_images": int(entry["n_images"])}
    except (OSError, KeyError, TypeError, ValueError):
        return None


def record_manifest(home: str | Path, dataset: str, manifest_paths: list[Path], fingerprint: str, n_images: int) -> bool:
    """Record what ``manifest_paths`` (as they are now) fingerprint to."""
    path = _cache_dir(home) / "manifest-fingerprints.json"
    try:
        files = [[str(p), *_stat_key(p)] for p in manifest_paths]
    except OSError:
        return False
    data = _read(path)
    datasets = dict(data.get("datasets", {}))
    datasets[dataset] = {"files": files, "fingerprint": fingerprint, "n_images": int(n_images)}
    return _write(path, {"datasets": datasets})


# complete stores -----------------------------------------------------------------
def store_summary(store: "FeatureStore") -> dict:
    """What ``uld features`` prints about a finished store."""
    splits = store.splits.tolist()
    return {
        "n_images": len(store),
        "splits": {k: int(splits.count(k)) for k in sorted(set(splits))},
        "keys": list(store.keys),
        "shapes": {k: [int(x) for x in store.shapes[k]] for k in store.keys},
        "bytes_per_image": store.bytes_per_image(),
        "n_skipped": len(store.skipped),
    }


def record_complete(home: str | Path, store: "FeatureStore") -> bool:
    """Record a local store the ordinary check just found complete and usable (see the module doc)."""
    if not isinstance(store.path, Path):
        return False  # a remote store: not recorded
    root = store.path
    try:
        files = {p.relative_to(root).as_posix(): _stat_key(p) for p in sorted(root.rglob("*")) if p.is_file()}
    except OSError:
        return False
    indexes = {rel: n for rel, n in store.shard_index_sizes().items() if rel in files}
    entry = {"config_hash": store.config_hash, "config": store.config, "files": files, "indexes": indexes, "summary": store_summary(store)}
    path = _cache_dir(home) / "complete-stores.json"
    data = _read(path)
    stores = {k: v for k, v in dict(data.get("stores", {})).items() if k != str(root)}
    stores[str(root)] = entry
    if len(stores) > _MAX_STORES:
        stores = dict(list(stores.items())[-_MAX_STORES:])
    return _write(path, {"stores": stores})


def recorded_complete(home: str | Path, path: Path, config_hash: str, config: dict) -> dict | None:
    """The recorded summary of the store at ``path`` if it is recorded complete for ``config`` and unchanged, else None."""
    entry = _read(_cache_dir(home) / "complete-stores.json").get("stores", {}).get(str(path))
    if not isinstance(entry, dict):
        return None
    try:
        if entry["config_hash"] != config_hash or entry["config"] != config:
            return None
        root = Path(path)
        for rel, key in entry["files"].items():
            if _stat_key(root / rel) != key:
                return None
        if not _indexes_sound(root, entry["indexes"]):
            return None
        return dict(entry["summary"])
    except (OSError, KeyError, TypeError, ValueError, AttributeError):
        return None


def _indexes_sound(root: Path, indexes: dict[str, Any]) -> bool:
    """Every shard index (the last ``n`` bytes of its file) still passes its CRC32C, as the cheap check reads it."""
    from storage.crc32c import self_checks

    for rel, n in indexes.items():
        with open(root / rel, "rb") as fh:
            fh.seek(-int(n), os.SEEK_END)
            raw = fh.read(int(n))
        # None (no CRC32C implementation): cannot check, let the ordinary path decide
        if len(raw) != int(n) or not self_checks(raw):
            return False
    return True
