"""When a failed Prefect task is worth retrying: transient I/O errors only.

A retry costs a whole task again, so it is kept for failures another attempt
can fix: an ``OSError`` that is not the user's to fix (a network file system's
``EIO`` or ``ESTALE``, an interrupted read, a timeout). User errors
(:class:`pipeline.errors.ULDError`, a full disk, a read-only or forbidden path:
see :func:`flows.cli_errors.as_user_error`) and bugs fail at once, so their
message reaches the user without retry delays.
"""

from __future__ import annotations

from typing import Any

from flows.cli_errors import as_user_error

# Tasks using this condition (idempotent ones only: a retry must give the same bytes).
RETRIES = 2
RETRY_DELAY_S = [2, 10]


def is_transient(exc: BaseException | None) -> bool:
    """True for an I/O error that a second attempt may not meet."""
    return isinstance(exc, (OSError, TimeoutError)) and as_user_error(exc) is None


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the task failed with :func:`is_transient`."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the result itself cannot be read: do not retry blindly
        return False
    return is_transient(exc if isinstance(exc, BaseException) else None)
