"""Per-command orchestration overhead: Prefect's temporary server vs the reused `uld ui` server.

Each measurement is a fresh process, as a `uld` command is:

* ``imports``: the CLI's Prefect defaults + ``import prefect`` + defining a flow, no run
  (the floor every command pays anyway);
* ``empty flow``: the same plus one run of a flow that does nothing: minus ``imports``,
  that is the orchestration overhead of one command;
* ``uld datasets generate``: a real command (renders 12 tiny images, then the
  ``build-manifests`` flow).

Each is run ``--repeats`` times without a server (Prefect starts its temporary one) and
with the server of ``uld ui`` running for the same workspace. Writes a Markdown table.

Usage: ``python bench/bench_orchestration.py [--repeats 3] [--out bench/results/orchestration.md]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_PRELUDE = "from flows import cli; cli._prefect_defaults()\nfrom prefect import flow\n@flow(name='bench-empty')\ndef f():\n    return 1\n"
CASES = {
    "imports (no flow run)": [sys.executable, "-c", _PRELUDE],
    "empty flow": [sys.executable, "-c", _PRELUDE + "f()\n"],
    "uld datasets generate (12 images + build-manifests flow)": [
        sys.executable, "-c", "from flows.cli import main; main()", "datasets", "generate", "synthetic",
        "--n-train", "8", "--n-test", "4", "--size", "64",
    ],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{out.stderr[-2000:]}")
    return seconds


def _measure(env: dict[str, str], repeats: int) -> dict[str, list[float]]:
    return {name: [_time(cmd, env) for _ in range(repeats)] for name, cmd in CASES.items()}


def _cell(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s (min {min(xs):.2f}, max {max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/orchestration.md")
    args = ap.parse_args()
    from flows.local_server import start_server, stop_server

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "ws"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({"ULD_HOME": str(home), "OMP_NUM_THREADS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
        temporary = _measure(env, args.repeats)
        t0 = time.perf_counter()
        start_server(home / ".prefect", port=_free_port())
        start_s = time.perf_counter() - t0
        try:
            reused = _measure(env, args.repeats)
        finally:
            stop_server(home / ".prefect")
    load = os.getloadavg()
    floor_t, floor_r = statistics.median(temporary["imports (no flow run)"]), statistics.median(reused["imports (no flow run)"])
    lines = [
        "# Orchestration overhead per command",
        "",
        f"Machine: 2-core CPU shared with other jobs, no GPU ({platform.machine()}, Python {platform.python_version()}); "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f}. Produced by `python bench/bench_orchestration.py "
        f"--repeats {args.repeats}` on {dt.date.today().isoformat()}. Each cell: median of {args.repeats} fresh processes.",
        "",
        "| command | temporary server (no `uld ui`) | reused `uld ui` server |",
        "|---|---|---|",
    ]
    for name in CASES:
        lines.append(f"| {name} | {_cell(temporary[name])} | {_cell(reused[name])} |")
    over_t = statistics.median(temporary["empty flow"]) - floor_t
    over_r = statistics.median(reused["empty flow"]) - floor_r
    lines += [
        f"| **orchestration overhead** (empty flow - imports) | **{over_t:.2f} s** | **{over_r:.2f} s** |",
        "",
        f"Starting the server once (`uld ui`, until its health check answers): {start_s:.1f} s. "
        "With it running, a command skips the temporary server's start-up and shut-down; "
        "what is left is creating the flow and task runs over local HTTP.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
