"""storage.step_checkpoints: marker last, older folders pruned only after the new one is finished."""

from __future__ import annotations

import pytest

from pipeline.errors import StoreError
from storage import step_checkpoints as sc


def test_marker_last_and_pruning(tmp_path):
    first = sc.begin(tmp_path, 5)
    (first / "w.bin").write_bytes(b"1")
    sc.finish(first, {"step": 5})
    second = sc.begin(tmp_path, 10)
    (second / "w.bin").write_bytes(b"2")
    # a crash here: the unfinished step 10 is ignored, step 5 is still there
    assert sc.last(tmp_path) == first and first.is_dir()
    with pytest.raises(StoreError, match="unfinished"):
        sc.read_state(second)
    sc.finish(second, {"step": 10})
    assert sc.last(tmp_path) == second and not first.exists()
    assert sc.read_state(second)["step"] == 10
    # rewriting a finished step removes its marker first
    again = sc.begin(tmp_path, 10)
    assert sc.last(tmp_path) is None and again == second


def test_no_checkpoint(tmp_path):
    assert sc.last(tmp_path / "missing") is None
