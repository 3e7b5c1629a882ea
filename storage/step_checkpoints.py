"""Step-numbered checkpoints of image-trained methods: ``<root>/step-NNNNNN/``, marker last.

The project's one checkpoint rule (also D-ULD's per-round folders): a folder is
finished only when its ``state.json`` exists, which is written after every
other file; older step folders are removed only once the new one is finished,
so a crash never leaves a run without a finished checkpoint. The caller writes
its own files between :func:`begin` and :func:`finish` (safetensors, never a
pickle of anything a user could plant).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError
from storage.atomic import write_json

STATE_NAME = "state.json"


def begin(root: Path, step: int) -> Path:
    """The folder for ``step``, created, with any old marker removed (a rewrite must not look finished half-way)."""
    path = Path(root) / f"step-{int(step):06d}"
    marker = path / STATE_NAME
    if marker.exists():
        marker.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def finish(path: Path, state: dict[str, Any]) -> Path:
    """Write the marker (``state`` plus the finishing time), then remove the older step folders."""
    write_json(path / STATE_NAME, {**state, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    for old in path.parent.glob("step-*"):
        if old != path and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return path


def last(root: Path) -> Path | None:
    """The finished checkpoint with the most steps, or None."""
    done = sorted(p for p in Path(root).glob("step-*") if (p / STATE_NAME).is_file())
    return done[-1] if done else None


def read_state(path: Path) -> dict[str, Any]:
    """The marker of a finished checkpoint; a clear error for an unfinished one."""
    marker = Path(path) / STATE_NAME
    if not marker.is_file():
        raise StoreError("checkpoint is unfinished (no state.json)", where=str(path), fix="resume again: it starts from the last finished checkpoint")
    return json.loads(marker.read_text())
