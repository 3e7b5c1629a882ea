"""Transient I/O failures of tasks are retried; user errors are not."""

from __future__ import annotations

import errno


from flows.retry import is_transient, retry_transient
from pipeline.errors import DatasetError


def test_only_transient_io_errors_count():
    assert is_transient(OSError(errno.EIO, "I/O error"))
    assert is_transient(TimeoutError("read timed out"))
    assert not is_transient(OSError(errno.ENOSPC, "No space left on device"))  # the user's to fix
    assert not is_transient(OSError(errno.EROFS, "Read-only file system"))
    assert not is_transient(DatasetError("bad image", where="x.png"))
    assert not is_transient(ValueError("a bug"))
    assert not is_transient(None)


def test_the_shard_task_retries_with_this_condition():
    from flows.features import extract_shard_task

    assert extract_shard_task.retries >= 1 and extract_shard_task.retry_condition_fn is retry_transient


def test_a_task_is_retried_after_eio_but_not_after_a_user_error(prefect_harness):
    from prefect import flow, task

    calls = {"eio": 0, "user": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def flaky():
        calls["eio"] += 1
        if calls["eio"] == 1:
            raise OSError(errno.EIO, "Input/output error", "/nfs/shard")
        return "ok"

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def bad_input():
        calls["user"] += 1
        raise DatasetError("cannot read image", where="a.png", fix="repair it")

    @flow
    def run_both():
        first = flaky()
        try:
            bad_input()
        except DatasetError:
            return first
        raise AssertionError("the user error must reach the flow")

    assert run_both() == "ok"
    assert calls == {"eio": 2, "user": 1}
