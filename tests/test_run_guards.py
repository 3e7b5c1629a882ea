"""Guards around run folders: --resume needs an existing run, and one writer per run folder
(D-ULD, ZeroShot, the reference baselines and `uld evaluate` all take the run's lock)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.errors import BusyError, ConfigError
from storage.features import FeatureStore
from storage.layout import Workspace
from storage.locks import WriterLock

N = 12


@pytest.fixture
def store(workspace):
    """A small complete feature store (random features) the flows can open by path."""
    rng = np.random.default_rng(0)
    shapes = {"a@t50": (4, 4, 4), "b@t50": (3, 8, 8)}
    st = FeatureStore.create(
        workspace.home / "features" / "toy" / "rand.zarr" / "abc",
        config={"dataset": "toy"}, config_hash="abc", image_ids=[f"i{i}" for i in range(N)],
        splits=["train"] * 9 + ["test"] * 3, crop_boxes=np.tile([0.0, 0.0, 32.0, 32.0], (N, 1)),
        shapes=shapes, image_size=32, shard_size=N,
    )
    st.write_shard(0, {k: rng.standard_normal((N, *s)).astype(np.float32) for k, s in shapes.items()})
    return st


def test_resume_of_a_run_that_never_started_is_an_error(workspace):
    from flows.duld import resolve_run

    with pytest.raises(ConfigError, match="no run 'nope' to resume") as err:
        resolve_run(workspace.home, "nope", True, {})
    assert "drop --resume" in err.value.fix and err.value.where == str(workspace.run_dir("nope"))
    assert not workspace.run_dir("nope").exists()
    assert resolve_run(workspace.home, "fresh", False, {}) == ("fresh", False)


def test_zeroshot_cli_resume_needs_an_existing_run(workspace, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from flows import cli, cli_zeroshot

    app = typer.Typer()
    app.callback()(cli._main)
    cli_zeroshot.register(app)
    res = CliRunner().invoke(app, ["--home", str(workspace.home), "zeroshot", "--dataset", "toy", "--run-id", "nope", "--resume"])
    assert isinstance(res.exception, ConfigError) and "no run 'nope' to resume" in str(res.exception)
    res = CliRunner().invoke(app, ["--home", str(workspace.home), "zeroshot", "--dataset", "toy", "--resume"])
    assert isinstance(res.exception, ConfigError) and "--run-id" in str(res.exception)


def test_duld_resume_of_a_missing_run_and_a_second_writer_are_refused(workspace, store, prefect_harness):
    from flows.duld import duld

    args = dict(k=3, rounds=1, steps_per_round=1, bootstrap_steps=1, batch_size=4, progress=False, store_path=store.path, roi=False)
    with pytest.raises(ConfigError, match="no run 'ghost' to resume"):
        duld("toy", "rand", None, home=workspace.home, run_id="ghost", resume=True, **args)
    assert not Workspace(workspace.home).run_dir("ghost").exists()
    with WriterLock(workspace.run_dir("busy"), "run"):  # another writer holds the run
        with pytest.raises(BusyError, match=f"another uld process is writing .*busy \\(pid {os.getpid()}\\)"):
            duld("toy", "rand", None, home=workspace.home, run_id="busy", **args)
    assert not workspace.run_file("busy", "config.json").exists()  # refused before writing anything


def test_zeroshot_and_baselines_refuse_a_run_another_writer_holds(workspace, store, prefect_harness):
    from flows.zeroshot import reference_baseline, zeroshot

    with WriterLock(workspace.run_dir("busy"), "run"):
        with pytest.raises(BusyError, match="busy"):
            zeroshot("toy", "rand", None, 3, 10, home=workspace.home, run_id="busy", store_path=store.path)
        with pytest.raises(BusyError, match="busy"):
            reference_baseline("toy", "random", "rand", None, home=workspace.home, run_id="busy", store_path=store.path)
    assert not workspace.run_file("busy", "config.json").exists()


def test_a_duld_run_that_fails_on_its_inputs_leaves_no_run_behind(workspace, store, prefect_harness):
    # The toy store has no images behind it, so its augmented views cannot be made: the run must
    # not be registered (no config.json), so the same (or corrected) command is not told
    # "run already exists, pass --resume".
    from flows.duld import duld
    from pipeline.errors import ULDError

    args = dict(k=3, rounds=1, steps_per_round=1, bootstrap_steps=1, batch_size=4, progress=False, store_path=store.path, roi=False)
    for _ in range(2):
        with pytest.raises(ULDError) as err:
            duld("toy", "rand", None, home=workspace.home, run_id="bad-input", **args)
        assert "already exists" not in str(err.value)
        assert not workspace.run_file("bad-input", "config.json").exists()


def test_runs_url_must_be_a_remote_url(monkeypatch):
    from pipeline.errors import ConfigError
    from pipeline.settings import ENV_RUNS_URL, Settings

    monkeypatch.delenv(ENV_RUNS_URL, raising=False)
    assert Settings.from_env().runs_url is None
    assert Settings.from_env(runs_url="s3://bucket/runs/").runs_url == "s3://bucket/runs"
    monkeypatch.setenv(ENV_RUNS_URL, "s3://other/runs")
    assert Settings.from_env().runs_url == "s3://other/runs" and Settings.from_env(runs_url="").runs_url is None
    for local in ("/tmp/runs", "file:///tmp/runs", "runs"):
        with pytest.raises(ConfigError, match="must be a remote fsspec URL"):
            Settings.from_env(runs_url=local)
