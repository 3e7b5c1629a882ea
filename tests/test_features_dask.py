"""Dask fan-out of the features stage: a 2-worker LocalCluster writes the same store as one process.

Real components throughout: a small random-init DDPM folder (workers load it by
spec), synthetic images, Prefect's DaskTaskRunner over a ``distributed.LocalCluster``.
One image is unreadable so the skipped-image bookkeeping (done by the coordinator)
is checked too.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytest.importorskip("distributed")
pytest.importorskip("prefect_dask")

from tests.tiny_runs import invoke_cli, make_backbone  # noqa: E402

torch.set_num_threads(1)

N_TRAIN, N_TEST, SIZE = 10, 4, 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Synthetic images (one of them unreadable) and a function writing their manifests into a workspace."""
    from pipeline.datasets.registry import get_loader
    from pipeline.datasets.synthetic import generate_synthetic

    base = tmp_path_factory.mktemp("dask-data")
    root = generate_synthetic(base / "synthetic", N_TRAIN, N_TEST, SIZE, 0)
    manifests = {split: get_loader("synthetic").load(root, split)[0] for split in ("train", "test")}
    bad = manifests["train"].frame["path"].iloc[5]
    with open(bad, "wb") as f:
        f.write(b"not an image")
    backbone = make_backbone(base / "ddpm")

    def write(home):
        from storage.layout import Workspace

        ws = Workspace(home)
        for split, m in manifests.items():
            m.save(ws.manifest("synthetic", split))
        return ws

    return {"write": write, "backbone": backbone, "bad": bad}


def test_dask_options_are_checked_before_any_work():
    from flows.features_dask import DaskSetupError, dask_task_runner, default_workers

    with pytest.raises(DaskSetupError, match="exactly one"):
        dask_task_runner(None, None)
    with pytest.raises(DaskSetupError, match="exactly one"):
        dask_task_runner("tcp://127.0.0.1:8786", 2)
    with pytest.raises(DaskSetupError, match=">= 0"):
        dask_task_runner(None, -1)
    # 0: one worker per GPU, else per core (no GPU here: the cores this process may use).
    assert dask_task_runner(None, 0).cluster_kwargs["n_workers"] == default_workers() >= 1
    with pytest.raises(DaskSetupError, match="scheduler address"):
        dask_task_runner("127.0.0.1", None)
    runner = dask_task_runner(None, 2)
    assert runner.cluster_kwargs["n_workers"] == 2 and runner.cluster_kwargs["threads_per_worker"] == 1


# ~26 s on a quiet 2-core machine, 40 s under load (cluster start, a model load per worker).
@pytest.mark.slow
def test_two_worker_local_cluster_store_equals_single_process_store(prefect_harness, dataset, tmp_path):
    from flows import cli_features
    from flows.features import extract_features
    from pipeline.backbones.base import FeatureSpec
    from storage.features import FeatureStore

    spec = FeatureSpec(image_size=SIZE)
    # shard_size 3 over 14 images: 5 shards (the last partial), spread over both workers.
    ref_home = tmp_path / "single"
    dataset["write"](ref_home)
    t0 = time.perf_counter()
    ref_path = extract_features("synthetic", dataset["backbone"], spec, home=ref_home, batch_size=2, shard_size=3, skip_bad=True)
    single_s = time.perf_counter() - t0

    home = tmp_path / "dask"
    dataset["write"](home)
    t0 = time.perf_counter()
    res = invoke_cli(home, cli_features.register, "features", "--dataset", "synthetic", "--backbone", dataset["backbone"],
                     "--size", str(SIZE), "--batch-size", "2", "--shard-size", "3", "--skip-bad", "--dask-workers", "2")
    dask_s = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    print(f"single process {single_s:.1f} s, 2 Dask workers (incl. cluster start) {dask_s:.1f} s")

    ref, got = FeatureStore.open(ref_path), FeatureStore.open(home / ref_path.relative_to(ref_home))
    assert got.is_complete() and got.n_shards() == 5 and got.config_hash == ref.config_hash
    a, b = ref.read(0, len(ref)), got.read(0, len(got))
    for key in ref.keys:
        assert np.abs(a[key]).max() > 0
        assert np.array_equal(a[key].view(np.uint16), b[key].view(np.uint16)), key  # bit for bit
    assert np.array_equal(ref.valid, got.valid) and int((~got.valid).sum()) == 1
    # The worker's skipped image reached the store's attrs through the coordinator.
    assert got.skipped.keys() == ref.skipped.keys() and len(got.skipped) == 1
    assert dataset["bad"] in next(iter(got.skipped.values()))

    # A re-run finds the finished store without starting a cluster.
    again = invoke_cli(home, cli_features.register, "features", "--dataset", "synthetic", "--backbone", dataset["backbone"],
                       "--size", str(SIZE), "--batch-size", "2", "--shard-size", "3", "--skip-bad", "--dask-workers", "2")
    assert again.exit_code == 0 and "nothing to do" in again.output


@pytest.mark.slow
def test_a_worker_error_reaches_the_user_as_a_clean_message_and_leaves_the_shard_unfinished(prefect_harness, dataset, tmp_path):
    from flows import cli_features
    from pipeline.errors import DatasetError
    from storage.features import FeatureStore

    home = tmp_path / "ws"
    dataset["write"](home)
    # Without --skip-bad the unreadable image (row 5, shard 1) stops its worker's task with a DatasetError.
    res = invoke_cli(home, cli_features.register, "features", "--dataset", "synthetic", "--backbone", dataset["backbone"],
                     "--size", str(SIZE), "--batch-size", "2", "--shard-size", "3", "--dask-workers", "2")
    assert res.exit_code != 0
    # The worker's DatasetError crossed the process boundary intact: main() prints it cleanly, exit 2.
    assert isinstance(res.exception, DatasetError) and dataset["bad"] in str(res.exception), repr(res.exception)
    (path,) = [p.parent for p in (home / "features" / "synthetic").glob("*.zarr/*/zarr.json")]
    store = FeatureStore.open(path, require_complete=False)
    # Only the failed shard is left: the others were finished before the error was raised.
    assert store.unfinished_shards() == [1]


def test_round_keypoints_fanned_out_over_two_workers_equal_the_single_process_run(prefect_harness, dataset, tmp_path, monkeypatch):
    """`uld train --dask-workers 2`: every round's keypoint extraction runs as `keypoints-block` tasks on a
    2-worker LocalCluster (blocks of 4 train images here) and the run's keypoints, pseudo-labels and
    metrics are the single-process run's, bit for bit."""
    import json
    import urllib.request

    import pandas as pd
    from prefect.settings import get_current_settings

    from flows import keypoints_dask
    from flows.duld import duld
    from flows.features import extract_features
    from pipeline.backbones.base import FeatureSpec

    monkeypatch.setattr(keypoints_dask, "BATCHES_PER_BLOCK", 2)  # 9 usable train images -> 3 blocks of 2 batches of 2
    spec = FeatureSpec(image_size=SIZE)
    home = tmp_path / "ws"
    dataset["write"](home)
    store = extract_features("synthetic", dataset["backbone"], spec, home=home, batch_size=2, skip_bad=True)
    engine = dict(k=3, rounds=1, steps_per_round=2, bootstrap_steps=2, batch_size=4, home=home, progress=False, views=None, threads=1,
                  store_path=store, eval_batch=2, cluster_nms_radius=1)
    duld("synthetic", dataset["backbone"], spec, run_id="one-process", **engine)
    duld("synthetic", dataset["backbone"], spec, run_id="two-workers", dask_workers=2, **engine)
    runs = home / "runs"
    for name in ("bootstrap-000", "round-001"):
        with np.load(runs / "one-process" / "checkpoints" / name / "train-keypoints.npz") as a, \
                np.load(runs / "two-workers" / "checkpoints" / name / "train-keypoints.npz") as b:
            assert a.files == b.files and "peak" in a.files and len(a["rows"]) > 0
            for f in a.files:
                assert np.array_equal(a[f], b[f]), (name, f)
    for table in ("pseudolabels", "metrics"):
        a = pd.read_parquet(runs / "one-process" / f"{table}.parquet").drop(columns="run_id")
        b = pd.read_parquet(runs / "two-workers" / f"{table}.parquet").drop(columns="run_id")
        assert a.equals(b), table
    # The blocks were Prefect task runs (two rounds x 3 blocks), not an in-process loop; a block is named
    # after its first store row (train rows 0-4, 6-9: row 5 is the unreadable image).
    req = urllib.request.Request(f"{get_current_settings().api.url}/task_runs/filter",
                                 data=json.dumps({"task_runs": {"name": {"like_": "keypoints-"}}, "limit": 50}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        # (the session's server also holds other tests' runs, e.g. `evaluate-keypoints-<hash>` tasks)
        names = sorted(r["name"] for r in json.load(resp) if r["name"].startswith("keypoints-"))
    assert len(names) == 6 and set(names) == {"keypoints-0", "keypoints-4", "keypoints-9"}, names
