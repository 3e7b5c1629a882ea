"""Fallback landmarks are flagged per row and scored both as given and as missing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation import EvalData
from pipeline.methods.landmarks import LandmarkSet
from test_zeroshot import build_workspace, make_toy


def test_landmark_set_carries_fallback_flags():
    coords = np.zeros((2, 3, 2), np.float32)
    present = np.array([[True, True, False], [True, True, True]])
    fb = np.array([[False, True, True], [False, False, True]])
    ls = LandmarkSet(coords, present, np.zeros((2, 3), np.float32), fallback=fb)
    assert ls.fallback.tolist() == [[False, True, False], [False, False, True]]  # absent cannot be a fallback
    assert LandmarkSet.concat([ls, ls.subset(slice(1, 2))]).fallback.tolist()[-1] == [False, False, True]
    assert not LandmarkSet(coords, present, np.zeros((2, 3), np.float32)).fallback.any()


def test_eval_data_without_marks_landmarks_missing():
    d = EvalData(np.zeros((2, 2, 2)), np.ones((2, 2), bool), np.zeros((2, 1, 2)), np.ones(2))
    e = d.without(np.array([[True, False], [False, False]]))
    assert e.present.tolist() == [[False, True], [True, True]] and d.present.all()


def test_evaluator_reports_metrics_with_and_without_fallbacks(workspace):
    from flows.results import evaluate_keypoints, keypoint_fallback, read_keypoints, write_keypoints

    toy = make_toy(40, 20, seed=1)
    store = build_workspace(workspace, toy, shard_size=16)
    home = workspace.home
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        idx = store.indices(split)
        n = len(idx)
        # every landmark sits exactly on its part, but a quarter of them are flagged as fallbacks
        fb = rng.random((n, 4)) < 0.25
        lms = LandmarkSet(toy["centres"][idx].astype(np.float32), np.ones((n, 4), bool), np.ones((n, 4), np.float32), fallback=fb)
        write_keypoints(home, "fb", "m", "s", 0, store, idx, lms)
        clean = LandmarkSet(toy["centres"][idx].astype(np.float32), np.ones((n, 4), bool), np.ones((n, 4), np.float32))
        write_keypoints(home, "clean", "m", "s", 0, store, idx, clean)
    kp = read_keypoints(home, "fb")
    assert kp["fallback"].dtype == bool and 0.1 < kp["fallback"].mean() < 0.4
    test_kp = kp[kp["split"] == "test"]
    assert keypoint_fallback(test_kp).sum() == int(test_kp["fallback"].sum())

    def metrics(run: str) -> dict[str, float]:
        rows = evaluate_keypoints(home, run, "toyparts", "m", "s", 0, n_regressor_images=30, repeats=2, plot=False)
        return rows[rows["repeat"] == -1].set_index("metric")["value"].to_dict()

    m = metrics("fb")
    # as written, the (correct) fallback points look like perfect detections ...
    assert m["acc0.2_hungarian"] == pytest.approx(1.0)
    assert m["nme_forward"] < 0.5
    # ... treated as missing they are misses and imputed positions
    assert m["acc0.2_hungarian_nofallback"] < 0.9
    assert m["nme_forward_nofallback"] > m["nme_forward"] + 1.0
    assert m["fallback_fraction"] == pytest.approx(test_kp["fallback"].mean())
    c = metrics("clean")
    assert c["fallback_fraction"] == 0.0
    for name in ("nme_forward", "nme_backward", "acc0.2_hungarian"):
        assert c[f"{name}_nofallback"] == pytest.approx(c[name])


def test_keypoints_written_before_the_fallback_column_still_read(workspace):
    from flows.results import read_keypoints
    from storage.tables import write_table

    df = pd.DataFrame({"run_id": ["old"], "method": ["m"], "stage": ["s"], "round": [0], "split": ["test"], "image_id": ["a"],
                       "landmark_id": [0], "x": [1.0], "y": [2.0], "score": [0.5], "present": [True]})
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = workspace.run_file("old", "keypoints.parquet")
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)  # an old file: no `fallback`, no metadata
    kp = read_keypoints(workspace.home, "old")
    assert kp["fallback"].tolist() == [False]
    write_table(kp, path, "keypoints")  # and it round-trips through the current schema
