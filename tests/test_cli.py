"""The `uld` entry point: command registration, error printing, Prefect defaults."""

from __future__ import annotations

import subprocess
import sys

from flows import cli


def test_prefect_home_is_created_inside_a_fresh_workspace(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.setenv("ULD_HOME", str(tmp_path / "fresh" / "workspace"))
    cli._prefect_defaults()
    import os

    home = tmp_path / "fresh" / "workspace" / ".prefect"
    assert os.environ["PREFECT_HOME"] == str(home.resolve())
    assert home.is_dir()


def test_help_lists_every_stage_and_user_errors_exit_2(tmp_path):
    env = {"ULD_HOME": str(tmp_path / "ws"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    for command in ("demo", "datasets", "backbone", "features", "zeroshot", "duld", "evaluate"):
        assert command in out.stdout
    bad = subprocess.run(
        [sys.executable, "-c", "from flows.cli import main; main()", "--seed", "-1", "datasets", "list"],
        capture_output=True, text=True, env=env,
    )
    assert bad.returncode == 2
    assert "seed must be >= 0" in bad.stderr and "fix:" in bad.stderr


# ---------------------------------------------------------------- reliability of the entry point
import errno
import logging
import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _uld(*args: str, env: dict[str, str], as_plain_user: bool = False) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.run(
        [sys.executable, "-c", "from flows.cli import main; main()", *args],
        capture_output=True, text=True, env={**base, **env}, cwd=REPO, timeout=900,
        preexec_fn=_drop_file_override_capabilities if as_plain_user and os.geteuid() == 0 else None,
    )


def _drop_file_override_capabilities() -> None:
    """In the child, before exec: remove root's power to ignore file modes (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH, CAP_FOWNER), so a chmod 0555 folder really refuses writes (EACCES)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_read_only_or_uncreatable_workspace_gives_help_and_a_clean_exit_2():
    # chmod does not stop root from writing: as root, the CLI runs without the capabilities
    # that let root ignore file modes, so the write fails for real (EACCES), as for any user.
    with tempfile.TemporaryDirectory() as d:
        ws = Path(d) / "ws"
        ws.mkdir()
        os.chmod(ws, 0o555)
        blocker = Path(d) / "a-file"
        blocker.write_text("not a folder")
        for home, words in ((ws, "permission denied"), (blocker / "ws", "is a file, not a folder")):
            env = {"ULD_HOME": str(home), "HOME": d}
            out = _uld("--help", env=env, as_plain_user=True)
            assert out.returncode == 0, out.stderr
            assert "datasets" in out.stdout and "Traceback" not in out.stderr
            out = _uld("datasets", "generate", "synthetic", "--n-train", "2", "--n-test", "1", "--size", "16", env=env, as_plain_user=True)
            assert out.returncode == 2, out.stderr
            assert words in out.stderr and "fix:" in out.stderr and "--home" in out.stderr
            assert "Traceback" not in out.stderr + out.stdout
        assert not any(ws.iterdir())  # nothing was written, not even Prefect's home


def test_os_errors_the_user_can_fix_become_uld_errors_and_bugs_do_not():
    from flows.cli_errors import as_user_error
    from pipeline.errors import WorkspaceError

    with pytest.raises(OSError) as full:  # a real "disk full" from the kernel
        with open("/dev/full", "wb", buffering=0) as fh:
            fh.write(b"x")
    assert full.value.errno == errno.ENOSPC
    err = as_user_error(full.value)
    assert isinstance(err, WorkspaceError) and "no space left" in err.what and "re-running resumes" in err.fix
    assert as_user_error(FileNotFoundError(errno.ENOENT, "missing", "x")) is None
    assert as_user_error(ValueError("a bug")) is None
    # Prefect's temporary server not coming up on a loaded machine is not a bug of ours
    slow = RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")
    err = as_user_error(slow)
    assert isinstance(err, WorkspaceError) and "run the command again" in err.fix and "PREFECT_API_URL" in err.fix
    assert as_user_error(RuntimeError("some other runtime failure")) is None


def test_prefect_log_records_of_user_errors_lose_only_their_traceback():
    from flows.cli_errors import UserErrorLogFilter
    from pipeline.errors import DatasetError

    logger = logging.getLogger("uld-test-filter")
    logger.propagate = False
    stream = __import__("io").StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.addFilter(UserErrorLogFilter())
    try:
        for exc in (DatasetError("bad line", where="training.txt, line 3"), ValueError("a real bug")):
            try:
                raise exc
            except Exception:
                logger.exception("Task run failed with exception: %r", exc)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "DatasetError('bad line" in text and text.count("Traceback") == 1  # only the bug's
    assert text.index("Traceback") > text.index("a real bug")


def _mtfl_lines(root: Path, lines: list[str]) -> Path:
    import numpy as np
    from PIL import Image

    (root / "lfw_5590").mkdir(parents=True)
    for i in range(len(lines)):
        Image.fromarray(np.full((100, 100, 3), 40 * i, np.uint8)).save(root / "lfw_5590" / f"{i}.jpg")
    (root / "training.txt").write_text("\n".join(lines) + "\n")
    return root


def test_user_errors_inside_flows_exit_2_without_prefect_traceback_and_all_bad_input_is_an_error(prefect_harness, tmp_path):
    from prefect.settings import get_current_settings

    # The subprocess talks to the test session's Prefect server instead of starting its own.
    env = {"ULD_HOME": str(tmp_path / "ws"), "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": str(get_current_settings().api.url)}
    good = "lfw_5590\\0.jpg 40 70 55 42 68 40 40 55 70 70 1 2 2 3"
    short = "lfw_5590\\1.jpg 40 70 55 42 68 40 40 55 70 1 2 2 3"  # 13 numbers
    root = _mtfl_lines(tmp_path / "mtfl", [good, short])
    out = _uld("datasets", "manifest", "mtfl", "--root", str(root), env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "expected 14 numbers" in out.stderr and "training.txt, line 2" in out.stderr and "fix:" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr

    # Every line bad and --skip-bad: nothing usable, so exit 2 with the reasons, not an empty manifest.
    bad = _mtfl_lines(tmp_path / "mtfl-bad", [short, "lfw_5590\\1.jpg 1 2 3"])
    out = _uld("datasets", "manifest", "mtfl", "--root", str(bad), "--skip-bad", env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "every item was bad and skipped (2 items)" in out.stderr and "expected 14 numbers" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert not (tmp_path / "ws" / "manifests" / "mtfl" / "train.parquet").exists()
