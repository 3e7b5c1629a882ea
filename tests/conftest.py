"""Shared fixtures. Tests never touch ../shared/data unless marked ``shared_data``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_data_root() -> Path | None:
    """The real development data, when present (ULD_SHARED_DATA or ../shared/data)."""
    env = os.environ.get("ULD_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def pytest_collection_modifyitems(config, items):
    if shared_data_root() is None:
        skip = pytest.mark.skip(reason="real development data not found (set ULD_SHARED_DATA)")
        for item in items:
            if "shared_data" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A throw-away Prefect server for the tests that run flows (one per session)."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    # The server needs ~10 s on an idle machine but well over a minute on 2 cores shared
    # with training jobs; a start-up timeout is not what these tests are about.
    with prefect_test_harness(server_startup_timeout=300):
        _warm_up_prefect_logging()
        yield


def _warm_up_prefect_logging() -> None:
    """Run one trivial flow now, outside any test.

    Prefect's console log handler binds to the stream that is ``sys.stderr`` when
    it first prints. If that first print happens inside typer's CliRunner, the
    stream is CliRunner's capture buffer, closed when the invocation ends, and
    every later Prefect log line in the session fails ("I/O operation on closed
    file"), so tests failed or passed depending on their order.
    """
    from prefect import flow

    @flow(name="warm-up-logging")
    def warm_up() -> None:
        return None

    warm_up()


@pytest.fixture
def workspace(tmp_path):
    from storage.layout import Workspace

    return Workspace(tmp_path / "workspace")
