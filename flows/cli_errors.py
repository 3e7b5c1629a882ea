"""How the CLI tells user errors from bugs: ULDError, plus the OS errors a user fixes.

Two jobs:

* :func:`as_user_error` maps an exception to the :class:`ULDError` to print
  (itself for a ULDError; a :class:`WorkspaceError` with a fix for a full
  disk, a read-only file system, a missing permission, a path through a
  file), or None for anything else, which is a bug and keeps its traceback.
* :class:`UserErrorLogFilter` strips the traceback from Prefect's "task/flow
  run failed" log records when the exception is such a user error. Prefect logs
  every failure with ``exc_info`` (about 130 lines) before the exception reaches
  the CLI, which then prints the clean what/where/fix message; for a malformed
  annotation line the traceback only buries that message. The record itself is
  kept (one line, also sent to the Prefect UI), and records of real bugs are
  left untouched.
"""

from __future__ import annotations

import errno
import logging

from pipeline.errors import ULDError, WorkspaceError

# errno -> (what went wrong, how to fix it). Everything else from the OS is not the user's to fix.
_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: (
        "no space left on the device",
        "free space on that file system or point --home (ULD_HOME) at a disk with room; re-running resumes where it stopped",
    ),
    errno.EDQUOT: (
        "disk quota exceeded",
        "free space within your quota or point --home (ULD_HOME) at another disk; re-running resumes where it stopped",
    ),
    errno.EROFS: (
        "the file system is read-only",
        "point --home (ULD_HOME) at a writable folder, or remount the disk read-write",
    ),
    errno.EACCES: (
        "permission denied",
        "make the folder writable (and readable) for this user, e.g. with chmod/chown, or point --home (ULD_HOME) elsewhere",
    ),
    errno.EPERM: (
        "operation not permitted",
        "make the folder writable for this user, e.g. with chmod/chown, or point --home (ULD_HOME) elsewhere",
    ),
    errno.ENOTDIR: (
        "a part of the path is a file, not a folder",
        "point --home (ULD_HOME) at a folder, or at a path whose parents are folders",
    ),
}


# Prefect's words when its temporary API server did not come up in time (a
# machine so loaded that uvicorn + SQLite migrations take over the timeout).
_PREFECT_SERVER_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


def as_user_error(exc: BaseException) -> ULDError | None:
    """The user-facing error for ``exc``, or None when it is a bug (keep the traceback)."""
    if isinstance(exc, ULDError):
        return exc
    if isinstance(exc, RuntimeError) and _PREFECT_SERVER_TIMEOUT in str(exc):
        return WorkspaceError(
            "Prefect's temporary API server did not start in time (the machine is busy)",
            where="PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
            fix="run the command again (it resumes where it stopped); on a loaded machine raise that variable "
            "(the CLI's default is 120 s), or start one server with `prefect server start` and set PREFECT_API_URL "
            "to it so no command starts its own",
        )
    if isinstance(exc, OSError) and exc.errno in _OS_ERRORS:
        what, fix = _OS_ERRORS[exc.errno]
        where = exc.filename if exc.filename is not None else None
        if exc.filename2 is not None:
            where = f"{exc.filename} -> {exc.filename2}"
        return WorkspaceError(f"cannot write or read a file: {what}", where=str(where) if where else None, fix=fix)
    return None


class UserErrorLogFilter(logging.Filter):
    """Drop the traceback (not the record) of log records whose exception is a user error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and as_user_error(exc) is not None:
            record.exc_info = None
            record.exc_text = None
        return True


# The loggers Prefect's engines report failed task and flow runs on (with exc_info).
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.engine")


def install_log_filter() -> UserErrorLogFilter:
    """Attach one :class:`UserErrorLogFilter` to Prefect's run loggers (idempotent).

    Logger filters survive Prefect's ``logging.config.dictConfig`` set-up (it
    replaces handlers, not filters), so this works before Prefect is imported.
    """
    for name in PREFECT_RUN_LOGGERS:
        for f in logging.getLogger(name).filters:
            if isinstance(f, UserErrorLogFilter):
                break
        else:
            logging.getLogger(name).addFilter(_FILTER)
    return _FILTER


_FILTER = UserErrorLogFilter()
