"""Commands' side of ``--runs-url``: fetch a run before it resumes, push it when it ends.

The copying itself (index last, hashes checked) is :mod:`storage.run_mirror`;
this module decides *when*: :func:`mirrored_run` wraps a command that writes
one run folder, and the self-training engine pushes after every round
(``flows.duld``), so a long run's finished rounds are at the URL before the
command ends.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import BusyError, ConfigError
from storage.layout import Workspace
from storage.locks import WriterLock
from storage.run_mirror import RunMirror


def push(mirror: RunMirror) -> None:
    """Push and say what was copied (one line)."""
    print(mirror.push().describe("run copied:"))


def push_after_round(mirror: RunMirror) -> None:
    """The push at a round's end: a failure (network, another machine's copy) is a warning, not the
    end of a long run; the round is on disk here, and the command's last push tries again."""
    try:
        push(mirror)
    except Exception as exc:  # noqa: BLE001 -- any failure of the copy; training goes on
        print(f"warning: the run was not copied to {mirror.url} after this round: {exc}", file=sys.stderr)


@contextlib.contextmanager
def mirrored_run(home: str | Path, run_id: str | None, runs_url: str | None, resume: bool) -> Iterator[RunMirror | None]:
    """Around a command writing run ``run_id``: with ``runs_url`` (else a no-op yielding None)
    fetch the run first when resuming without its local folder, and push it when the command
    ends (also after an error or Ctrl-C: what finished is not lost)."""
    if runs_url is None or run_id is None:
        yield None
        return
    run_dir = Workspace(Path(home)).run_dir(run_id)
    mirror = RunMirror.for_run(runs_url, run_dir)
    if not (run_dir / "config.json").is_file():
        if resume and mirror.exists():
            print(mirror.pull().describe("run fetched:"))
        elif not resume and mirror.exists():
            # A fresh run under this id would overwrite the copy at the URL with a new run.
            raise ConfigError(f"run {run_id!r} already exists at {mirror.url}", where="--run-id",
                              fix="pass --resume to continue it here (it is fetched first), or choose a new --run-id")
    else:
        mirror.check_can_push()  # a local folder the copy did not come from: refused now, not after the work
    failed = False
    try:
        yield mirror
    except BaseException:
        failed = True
        raise
    finally:
        if (run_dir / "config.json").is_file():
            try:
                with WriterLock(run_dir, "run"):  # not while another process writes the run
                    push(mirror)
            except BusyError:
                print(f"note: not copied to {mirror.url}: another uld process is writing run {run_id} (it copies it when it ends)")
            except Exception as exc:
                if not failed:
                    raise
                # The command's own error is the one to report; say why the copy is missing too.
                print(f"note: run {run_id} was not copied to {mirror.url}: {exc}", file=sys.stderr)
