"""One writer per feature store / run folder: flock-based locks that a dead process cannot leave behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import BusyError
from storage.locks import WriterLock, claim, lock_file_for, lock_owner, releases_claims


def test_second_writer_in_the_same_process_is_refused_until_the_first_releases(tmp_path):
    target = tmp_path / "runs" / "r1"
    first = WriterLock(target, "run").acquire()  # the folder itself need not exist yet
    assert first.lock_file == lock_file_for(target) == tmp_path / "runs" / ".r1.lock"
    assert lock_owner(first.lock_file) == os.getpid()
    with pytest.raises(BusyError) as err:
        WriterLock(target, "run").acquire()  # a separate file descriptor: flock excludes it
    assert f"another uld process is writing {target} (pid {os.getpid()})" in str(err.value)
    assert err.value.where == str(first.lock_file) and "wait" in err.value.fix
    first.release()
    with WriterLock(target, "run") as again:
        assert again.held
    assert not again.held
    with WriterLock(tmp_path / "runs" / "r2"):  # other targets are independent
        with WriterLock(target):
            pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    target = tmp_path / "features" / "store"
    ready = tmp_path / "ready"
    code = (
        "import sys, time; from pathlib import Path; from storage.locks import WriterLock; "
        f"WriterLock(Path({str(target)!r})).acquire(); Path({str(ready)!r}).write_text('1'); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, "lock holder exited early"
            assert time.monotonic() < deadline, "lock holder did not start"
            time.sleep(0.05)
        with pytest.raises(BusyError, match=f"pid {proc.pid}"):
            WriterLock(target).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel releases the flock
        proc.wait()
    with WriterLock(target) as lock:
        assert lock.held and lock_owner(lock.lock_file) == os.getpid()


def test_claims_are_released_when_the_decorated_call_ends(tmp_path):
    target = tmp_path / "run"

    @releases_claims
    def writer(fail: bool) -> None:
        claim(target, "run")
        with pytest.raises(BusyError):
            WriterLock(target).acquire()  # held while the call runs
        if fail:
            raise ValueError("boom")

    writer(False)
    with pytest.raises(ValueError):
        writer(True)
    with WriterLock(target):  # released after a normal return and after an exception
        pass
    with pytest.raises(RuntimeError, match="releases_claims"):
        claim(target)  # nothing would ever release it
