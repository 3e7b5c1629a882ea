"""One writer per feature store and per run directory.

A writer holds an exclusive ``fcntl.flock`` on a small lock file next to what
it writes (``.<name>.lock`` beside the store or run folder). The kernel drops
the lock when the file descriptor closes, which includes the process dying
(kill -9, OOM, power cut of the process), so a crashed writer can never leave
a stale lock behind: there is nothing to clean up and no timeout to guess.

The pid written into the lock file is only for the message ("another uld
process is writing <path> (pid N)"); the lock itself is the flock, not the
file's existence. The file is never deleted: unlinking a lock file while a
second process has it open would let two processes lock two different inodes.

flock is per open file description, so two acquisitions of the same path in
one process through separate file descriptors also exclude each other.

Two ways to hold a lock:

* ``with WriterLock(path, "feature store"): ...`` around the writing code;
* in a flow whose body cannot be wrapped in a ``with`` (the run id is known only
  part-way through), decorate the function with :func:`releases_claims` and call
  :func:`claim` once the path is known; every claimed lock is released when the
  decorated call returns or raises.
"""

from __future__ import annotations

import contextvars
import fcntl
import functools
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from pipeline.errors import BusyError

F = TypeVar("F", bound=Callable[..., Any])


def lock_file_for(target: str | Path) -> Path:
    """The lock file guarding ``target`` (a sibling, so it exists before ``target`` does)."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def lock_owner(lock_file: str | Path) -> int | None:
    """The pid recorded in ``lock_file`` by its last holder, or None if unreadable."""
    try:
        text = Path(lock_file).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class WriterLock:
    """An exclusive, non-blocking flock guarding ``target``; raises :class:`BusyError` when taken."""

    def __init__(self, target: str | Path, what: str = "folder") -> None:
        self.target = Path(target)
        self.what = what
        self.lock_file = lock_file_for(self.target)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "WriterLock":
        """Take the lock or raise :class:`BusyError` naming the holder's pid (never waits)."""
        if self._fd is not None:
            return self
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = lock_owner(self.lock_file)
            raise BusyError(
                f"another uld process is writing {self.target} (pid {pid if pid is not None else 'unknown'})",
                where=str(self.lock_file),
                fix=f"wait for that process to finish or stop it, then re-run; the lock goes away by itself when it exits "
                f"(this {self.what} has one writer at a time)",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # Record who holds it, for the message a second writer prints.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"WriterLock({str(self.target)!r}, held={self.held})"


# Locks claimed during the current call of a @releases_claims function (None outside one).
_CLAIMS: contextvars.ContextVar[list[WriterLock] | None] = contextvars.ContextVar("uld_writer_claims", default=None)


def releases_claims(fn: F) -> F:
    """Decorator: every lock :func:`claim`-ed while ``fn`` runs is released when it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = _CLAIMS.set([])
        try:
            return fn(*args, **kwargs)
        finally:
            held = _CLAIMS.get() or []
            _CLAIMS.reset(token)
            for lock in reversed(held):
                lock.release()

    return wrapper  # type: ignore[return-value]


def claim(target: str | Path, what: str = "folder") -> WriterLock:
    """Acquire the writer lock of ``target`` until the enclosing :func:`releases_claims` call ends."""
    held = _CLAIMS.get()
    if held is None:
        # A programming error, not a user error: without the decorator nothing would release it.
        raise RuntimeError("claim() called outside a function decorated with @releases_claims")
    lock = WriterLock(target, what).acquire()
    held.append(lock)
    return lock
