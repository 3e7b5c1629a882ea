"""Benchmark of the no-op ``uld features`` (a finished store): wall time, work after interpreter start, heavy imports.

Builds (once) a workspace with ``--n`` random images and the finished store of
``--backbone``, then runs the no-op ``uld features`` ``--repeats`` times in fresh
processes for each ``--repo`` given (a checkout whose code is run, e.g. a
``git worktree`` of an older commit for a before/after comparison; default: this
one), and prints one Markdown row per checkout: best and median wall and work
(after the interpreter started: imports + the check), which of torch / Prefect /
pandas / Zarr / numpy were imported, and the three largest top-level imports
measured with ``python -X importtime``.

Usage: ``python bench/bench_features_noop.py --home /some/dir [--n 128] [--repeats 5] [--repo OLD_CHECKOUT --repo .]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

HEAVY = ("torch", "prefect", "pandas", "zarr", "numpy")
_TIMED = (
    "import sys, time, json\nt0 = time.perf_counter()\nfrom flows.cli import main\nsys.argv = ['uld'] + sys.argv[1:]\n"
    "try:\n    main()\nfinally:\n"
    "    print('WORK ' + json.dumps({'work': time.perf_counter() - t0, 'file': sys.modules['flows.cli'].__file__, "
    f"**{{m: m in sys.modules for m in {HEAVY!r}}}}}))\n"
)


def _env(home: Path, repo: Path) -> dict:
    env = {**os.environ, "ULD_HOME": str(home), "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(home / ".prefect"), "PYTHONPATH": str(repo)}
    env.pop("PREFECT_API_URL", None)
    return env


def _run(home: Path, repo: Path, args: list[str]) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _TIMED, *args], capture_output=True, text=True, env=_env(home, repo), cwd=repo)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"uld {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    line = next(x for x in reversed(out.stdout.splitlines()) if x.startswith("WORK "))
    res = json.loads(line[5:])
    if not Path(res["file"]).resolve().is_relative_to(repo.resolve()):
        raise SystemExit(f"ran the code of {res['file']}, not of {repo}")
    return {"wall": wall, "stdout": out.stdout, **res}


def _top_imports(home: Path, repo: Path, args: list[str], k: int = 3) -> list[tuple[str, float]]:
    """The ``k`` largest top-level imports (cumulative seconds) of one run under ``-X importtime``."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", _TIMED, *args], capture_output=True, text=True, env=_env(home, repo), cwd=repo)
    rows = []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cum, name = line.split("|", 2)
        if name.startswith(" ") and not name.startswith("  ") and cum.strip().isdigit():  # depth 1 only
            rows.append((name.strip(), int(cum) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True, help="workspace to build (once) and re-use")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--backbone", default="shipped")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--repo", type=Path, action="append", help="checkout whose code runs the no-op (repeatable; default this one)")
    args = ap.parse_args()
    from bench_store import _toy_dataset

    home = args.home.resolve()
    cmd = ["features", "--dataset", "bench", "--backbone", args.backbone]
    _toy_dataset(home, home.parent / f"{home.name}-images", args.n)
    first = _run(home, REPO, cmd)  # extracts when the store is missing, else already a no-op
    print(f"first run: {first['wall']:.1f} s wall", flush=True)
    repos = args.repo or [REPO]
    load = os.getloadavg()
    print("| code | wall (best / median) | work after interpreter start (best / median) | imports torch / Prefect / pandas / Zarr / numpy | largest top-level imports |")
    print("|---|---|---|---|---|")
    for repo in repos:
        repo = repo.resolve()
        _run(home, repo, cmd)  # warm the page cache and this code's records
        runs = [_run(home, repo, cmd) for _ in range(args.repeats)]
        assert all("nothing to do" in r["stdout"] for r in runs)
        walls, works = [r["wall"] for r in runs], [r["work"] for r in runs]
        imports = " / ".join("yes" if runs[0][m] else "no" for m in HEAVY)
        top = ", ".join(f"{name} {s:.2f} s" for name, s in _top_imports(home, repo, cmd))
        print(f"| {repo.name} | {min(walls):.2f} / {statistics.median(walls):.2f} s | {min(works):.2f} / {statistics.median(works):.2f} s | {imports} | {top} |", flush=True)
    bare = min(_bare() for _ in range(3))
    print(f"\nbare `python -c pass`: {bare:.2f} s; load average before / after: {load[0]:.1f} / {os.getloadavg()[0]:.1f}")


def _bare() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
