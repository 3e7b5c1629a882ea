"""`uld train --method mallis-d` end to end on the tiny workspace: tables, M training labels, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.tiny_runs import K, SIZE, invoke_cli, tiny_runs

M = 12


def _register(app) -> None:
    from flows import cli_duld, cli_train

    cli_train.register(app)
    cli_duld.register(app)


def _train(runs, *extra: str):
    return invoke_cli(runs.home, _register, "--seed", "0", "train", "--dataset", "synthetic", "--backbone", runs.backbone,
                      "--store", str(runs.store), "-k", str(K), "--size", str(SIZE), "--steps-per-round", "2", "--bootstrap-steps", "2",
                      "--batch-size", "6", "--views", "0", "--no-progress", *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_harness):
    return tiny_runs(tmp_path_factory)


def test_mallis_d_trains_writes_tables_and_resumes(runs):
    from storage.layout import Workspace
    from storage.run_models import locate_run_model
    from storage.tables import read_table

    res = _train(runs, "--method", "mallis-d", "--m", str(M), "--run-id", "mallis-tiny", "--rounds", "1")
    assert res.exit_code == 0, res.output
    assert "mallis-d per-round NME" in res.output and "run: mallis-tiny" in res.output
    run = Workspace(runs.home).run_dir("mallis-tiny")
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "mallis-d" and config["labeller"]["name"] == "overcluster" and config["labeller"]["m"] == M

    kp = read_table(run / "keypoints.parquet", "keypoints")
    assert set(kp["method"]) == {"mallis-d"} and sorted(kp["round"].unique()) == [0, 1]
    metrics = read_table(run / "metrics.parquet", "metrics")
    assert set(metrics["method"]) == {"mallis-d"} and {"nme_forward", "nme_backward"} <= set(metrics["metric"])
    # training used M over-clustered labels; every label names one of the K landmarks
    pl = read_table(run / "pseudolabels.parquet", "pseudolabels")
    assert pl["label"].max() >= K and pl["label"].max() < M and pl["landmark_id"].between(0, K - 1).all()
    with np.load(run / "checkpoints" / "round-001" / "labeller.npz") as z:
        assert z["label_centers"].shape[0] == M and z["landmark_centers"].shape[0] == K
        assert np.array_equal(np.load(run / "checkpoints" / "round-001" / "centroids.npy"), z["landmark_centers"])
    assert locate_run_model(run).round == 1  # the predictor finds its heads and K centroids

    # --resume after the completed round 1 continues with round 2 only
    finished = {s: (run / "checkpoints" / s / "state.json").stat().st_mtime_ns for s in ("bootstrap-000", "round-001")}
    res = _train(runs, "--method", "mallis-d", "--m", str(M), "--run-id", "mallis-tiny", "--rounds", "2", "--resume")
    assert res.exit_code == 0, res.output
    assert (run / "checkpoints" / "round-002" / "state.json").is_file()
    assert finished == {s: (run / "checkpoints" / s / "state.json").stat().st_mtime_ns for s in finished}  # not redone
    assert sorted(read_table(run / "metrics.parquet", "metrics")["round"].unique()) == [0, 1, 2]

    # ... and equals an uninterrupted 2-round run (the labeller state in the checkpoint is exact)
    from safetensors.torch import load_file

    res = _train(runs, "--method", "mallis-d", "--m", str(M), "--run-id", "mallis-full", "--rounds", "2")
    assert res.exit_code == 0, res.output
    full = Workspace(runs.home).run_dir("mallis-full")
    a = load_file(str(full / "checkpoints" / "round-002" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "round-002" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    with np.load(full / "checkpoints" / "round-002" / "labeller.npz") as za, np.load(run / "checkpoints" / "round-002" / "labeller.npz") as zb:
        assert all(np.array_equal(za[n], zb[n]) for n in za.files)

    # the run is Mallis (D)'s: resuming it as D-ULD or with another M is refused
    res = _train(runs, "--method", "duld", "--run-id", "mallis-tiny", "--rounds", "2", "--resume")
    assert res.exit_code != 0 and "different settings" in str(res.exception) and "method" in str(res.exception)
    res = _train(runs, "--method", "mallis-d", "--m", "20", "--run-id", "mallis-tiny", "--rounds", "2", "--resume")
    assert res.exit_code != 0 and "labeller" in str(res.exception)


def test_mallis_d_with_m_below_k_is_a_user_error(runs):
    from pipeline.errors import ConfigError

    res = _train(runs, "--method", "mallis-d", "--m", str(K - 1), "--run-id", "mallis-bad")
    assert isinstance(res.exception, ConfigError) and "M >= K" in str(res.exception)


def test_a_mallis_d_run_predicts_new_images_like_its_own_keypoints(runs, tmp_path):
    """`uld predict --model <mallis-d run>`: its heads + K landmark centroids, as for D-ULD."""
    from flows import cli_predict
    from flows.results import read_keypoints
    from storage.tables import read_table
    from tests.tiny_runs import N_TEST

    res = _train(runs, "--method", "mallis-d", "--m", str(M), "--run-id", "mallis-predict", "--rounds", "1")
    assert res.exit_code == 0, res.output
    out = tmp_path / "pred.parquet"
    res = invoke_cli(runs.home, cli_predict.register, "predict", "--model", "mallis-predict", "--dataset", "synthetic", "--split", "test",
                     "--out", str(out), "--no-progress")
    assert res.exit_code == 0, res.output
    pred = read_table(out, "predictions").sort_values(["image_id", "landmark_id"]).reset_index(drop=True)
    kp = read_keypoints(runs.home, "mallis-predict")
    kp = kp[(kp["split"] == "test") & (kp["round"] == 1)].sort_values(["image_id", "landmark_id"]).reset_index(drop=True)
    assert len(pred) == len(kp) == N_TEST * K
    for col in ("x", "y", "present", "fallback"):
        np.testing.assert_array_equal(pred[col].to_numpy(), kp[col].to_numpy(), err_msg=col)
