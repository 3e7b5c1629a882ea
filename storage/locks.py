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

Object stores (a feature store at ``s3://...``, ``gs://...``) have no flock:
:func:`writer_lock` gives an :class:`ObjectLock` there, a lock *object*
``.<name>.lock`` beside the store holding its owner (host, pid, a random token)
and an expiry. It is created only if absent (S3's and GCS's conditional PUT),
renewed by a background thread every third of its lifetime, and deleted on
release. Its limits, unlike flock's:

* a holder that dies leaves the object until it expires (``ULD_LOCK_TTL_S``,
  default 300 s); a second writer is refused until then, with the owner and the
  expiry time in the message, and then takes it over;
* a holder that cannot renew for a whole lifetime (a frozen machine, a network
  partition) can lose its lock to another writer without noticing at once: the
  renewal notices and logs it, but the writes in flight are not stopped;
* taking over an expired lock and releasing one are read-then-delete (object
  stores have no compare-and-delete for ordinary buckets), so two writers that
  break the same expired lock in the same instant can both proceed;
* on a file system without exclusive creation the create is check-then-write,
  and the same race applies.

It excludes writers for the usual case, a second ``uld features`` started while
one runs; it is not a consensus protocol.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import fcntl
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from pipeline.errors import BusyError
from storage.locations import FsspecFiles, is_url, split_parent

log = logging.getLogger(__name__)
DEFAULT_TTL_S = 300.0

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


def _ttl_s() -> float:
    try:
        ttl = float(os.environ.get("ULD_LOCK_TTL_S", DEFAULT_TTL_S))
    except ValueError:
        ttl = DEFAULT_TTL_S
    return max(ttl, 1.0)


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


class ObjectLock:
    """A writer lock on an object store: a lock object with owner and expiry (see the module docstring)."""

    def __init__(self, target: str, what: str = "folder", ttl_s: float | None = None) -> None:
        self.target = str(target)
        self.what = what
        parent, name = split_parent(self.target)
        self.lock_name = f".{name}.lock"
        self.lock_file = f"{parent}/{self.lock_name}"
        self._files = FsspecFiles(str(parent))
        self.ttl_s = float(ttl_s) if ttl_s is not None else _ttl_s()
        self.token = uuid.uuid4().hex
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self.lost = False

    @property
    def held(self) -> bool:
        return self._stop is not None

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "target": self.target, "renewed": _iso(now), "expires_at": now + self.ttl_s}).encode()

    def read_owner(self) -> dict | None:
        """The lock object's content, None when there is none (or it is unreadable)."""
        try:
            return json.loads(self._files.read(self.lock_name))
        except (FileNotFoundError, ValueError):
            return None

    def _create(self) -> bool:
        record = self._record()
        try:
            self._files.write(self.lock_name, record, exclusive=True)
            return True
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError, ValueError):
            # This file system has no exclusive create: check, then write (the race the module doc names).
            if self._files.is_file(self.lock_name):
                return False
            self._files.write(self.lock_name, record)
            return True

    def acquire(self) -> "ObjectLock":
        """Take the lock or raise :class:`BusyError` naming the holder and when its lock expires (never waits)."""
        if self.held:
            return self
        if not self._create():
            owner = self.read_owner()
            expired = owner is None or float(owner.get("expires_at", 0)) < time.time()
            # An expired (or unreadable) lock object is a dead holder's: break it and try once more.
            if not (expired and self._take_over(owner)):
                owner = self.read_owner() or {}
                raise BusyError(
                    f"another uld process is writing {self.target} (pid {owner.get('pid', 'unknown')} on {owner.get('host', 'unknown host')})",
                    where=self.lock_file,
                    fix=f"wait for that process to finish or stop it, then re-run; a lock left by a process that died expires at "
                    f"{_iso(float(owner.get('expires_at', time.time())))} (ULD_LOCK_TTL_S) and is then taken over "
                    f"(this {self.what} has one writer at a time)",
                )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"uld-lock-{self.lock_name}", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, seen: dict | None) -> bool:
        now = self.read_owner()
        if now is not None and seen is not None and now.get("token") != seen.get("token"):
            return False  # someone else took it over (or renewed it) meanwhile
        self._files.remove(self.lock_name)
        return self._create()

    def _renew(self) -> None:
        assert self._stop is not None
        while not self._stop.wait(self.ttl_s / 3):
            owner = self.read_owner()
            if owner is None or owner.get("token") != self.token:
                self.lost = True
                log.warning("lost the writer lock of %s (its lock object was removed or taken over)", self.target)
                return
            try:
                self._files.write(self.lock_name, self._record())
            except OSError as exc:  # transient: the next round tries again, within the lifetime
                log.warning("could not renew the writer lock of %s: %s", self.target, exc)

    def release(self) -> None:
        if self._stop is None:
            return
        stop, self._stop = self._stop, None
        stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        owner = self.read_owner()
        if owner is not None and owner.get("token") == self.token:
            self._files.remove(self.lock_name)

    def __enter__(self) -> "ObjectLock":
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"ObjectLock({self.target!r}, held={self.held})"


def writer_lock(target: str | Path, what: str = "folder") -> "WriterLock | ObjectLock":
    """The writer lock for ``target``: a flock for a local path, a lock object for an fsspec URL."""
    return ObjectLock(str(target), what) if is_url(target) else WriterLock(target, what)
