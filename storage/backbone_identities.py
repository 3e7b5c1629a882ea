"""Backbone identities recorded by file content, so a finished store is found without loading the model.

A store's name hashes the backbone's ``identity()`` (for a diffusion model: a
hash of the loaded weights, see :func:`pipeline.backbones.base.weights_hash`).
Computing it means building the model (seconds; much more for Stable
Diffusion). But the identity is a function of the files the loader reads, so
after one load we record ``files digest -> identity`` here:

    <home>/cache/backbone-identities.json
        {"<resolved folder>": {"files": {relpath: [size, mtime_ns, sha256]},
                               "digest": "...", "versions": {...},
                               "identity": {...}, "default_layers": [...], "kind": "ddpm"}}

The per-file SHA-256 is recomputed only when a file's (path, size, mtime)
changed, so checking a backbone costs one ``stat`` per file. Any changed,
added or removed file, or other torch / diffusers versions, gives another
digest: the record no longer applies and the caller loads the model, as
before. Writing is best effort: a read-only workspace only loses the shortcut.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

# What the loaders read from a backbone folder (pipeline.backbones.loading): the
# weights and configs. Other files there (a model card, checkpoints, loss curves) do
# not decide the features, and training checkpoints change often.
LOADED_FILES = ("uld_backbone.json", "model_index.json")
LOADED_DIRS = ("unet", "scheduler", "vae", "text_encoder", "tokenizer")
_VERSIONED = ("torch", "diffusers", "transformers")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RecordedBackbone:
    """What a recorded load told us: enough to name its stores (``identity``, ``default_layers``)."""

    kind: str
    identity: dict
    default_layers: list[str]


def _versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = ""
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def loaded_files(folder: Path) -> list[Path]:
    """The files of ``folder`` the backbone loaders read, sorted."""
    out = [folder / name for name in LOADED_FILES if (folder / name).is_file()]
    for sub in LOADED_DIRS:
        if (folder / sub).is_dir():
            out += [p for p in (folder / sub).rglob("*") if p.is_file()]
    return sorted(out)


def folder_digest(folder: Path, known: dict[str, list] | None = None) -> tuple[str, dict[str, list]]:
    """SHA-256 over the loaded files' names and contents, and the per-file ``[size, mtime_ns, sha256]``.

    A file whose size and mtime equal ``known[relpath]``'s keeps its recorded
    hash instead of being read again.
    """
    folder = Path(folder)
    known = known or {}
    files: dict[str, list] = {}
    h = hashlib.sha256()
    for path in loaded_files(folder):
        rel = path.relative_to(folder).as_posix()
        st = path.stat()
        old = known.get(rel)
        digest = old[2] if old and old[0] == st.st_size and old[1] == st.st_mtime_ns else _sha256(path)
        files[rel] = [st.st_size, st.st_mtime_ns, digest]
        h.update(f"{rel}\x1f{digest}\x1e".encode())
    return h.hexdigest(), files


class IdentityCache:
    """The JSON record of backbone identities at ``path`` (see the module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def lookup(self, folder: Path) -> RecordedBackbone | None:
        """The recorded identity of ``folder`` if its loaded files are unchanged, else None."""
        folder = Path(folder).resolve()
        entry = self._read().get(str(folder))
        if not isinstance(entry, dict) or not folder.is_dir():
            return None
        try:
            digest, _ = folder_digest(folder, entry.get("files"))
            if digest != entry["digest"] or entry["versions"] != _versions():
                return None
            return RecordedBackbone(str(entry["kind"]), dict(entry["identity"]), [str(x) for x in entry["default_layers"]])
        except (OSError, KeyError, TypeError, IndexError):
            return None

    def record(self, folder: Path, kind: str, identity: dict, default_layers: list[str]) -> bool:
        """Record ``folder``'s identity (after a real load); False when it could not be written."""
        from storage.atomic import write_json

        folder = Path(folder).resolve()
        try:
            data = self._read()
            old = data.get(str(folder), {})
            digest, files = folder_digest(folder, old.get("files") if isinstance(old, dict) else None)
            data[str(folder)] = {
                "kind": kind, "identity": identity, "default_layers": list(default_layers),
                "digest": digest, "files": files, "versions": _versions(),
            }
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, json.loads(json.dumps(data, default=str)))
            return True
        except OSError:  # read-only or full workspace: the next run loads the model again
            return False


def identity_cache(home: str | Path) -> IdentityCache:
    """The workspace's record: ``<home>/cache/backbone-identities.json``."""
    from storage.layout import Workspace

    return IdentityCache(Workspace(Path(home)).backbone_identities())
