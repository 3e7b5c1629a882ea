"""Table 2's last two rows on a finished D-ULD run: D-ULD++'s TSC rounds with Eq. 3 vs with the full VAE.

D-ULD++'s first R rounds are D-ULD's, bit for bit (same engine path, seeds and schedule; checked in
tests/test_ablation.py), so a finished D-ULD run of R rounds can seed a D-ULD++ run: for each TSC
loss (``eq3``, ``elbo``) this script

1. creates the D-ULD++ run in ``--home`` (the engine with ``max_rounds=-1``: config.json only), and
   refuses unless its engine settings (``duld``, ``heads``, ``seed``, feature store, ``roi``,
   labeller) equal the D-ULD run's;
2. copies the D-ULD run's finished checkpoints ``bootstrap-000`` .. ``round-R`` into it;
3. resumes it through the engine: the proxy stage and ``--tsc-rounds`` TSC rounds, each with its
   evaluation and Fig. 7's pose analysis (``pose-clusters.parquet``).

It then prints (and with ``--write`` writes) test-split NME / Hungarian accuracy per stage and the
pose clusters' majority-mapped accuracy per yaw bin. One seed, CPU-sized: a measurement, not a ranking.

    OMP_NUM_THREADS=1 python bench/bench_duldpp_tsc_loss.py --home SCRATCH/workspace \\
        --from-run workspace/runs/<duld run> --proxy-steps 150 --tsc-rounds 2 --write bench/results/duldpp_tsc_loss.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.duld import STATE_NAME, duld  # noqa: E402
from flows.results import metrics_table  # noqa: E402
from pipeline.datasets.augment_views import ViewAugmentConfig  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from storage.layout import Workspace  # noqa: E402
from storage.tables import read_table  # noqa: E402

MATCH = ("duld", "heads", "seed", "feature_config_hash", "roi", "labeller", "dataset")


def seed_run(home: Path, src: Path, run_id: str, tsc_loss: str, args: argparse.Namespace) -> float:
    """Seed (once) and resume the D-ULD++ run ``run_id``; the seconds this call's resume took."""
    cfg = json.loads((src / "config.json").read_text())
    d = cfg["duld"]
    views = None if d.get("views") is None else ViewAugmentConfig.from_json(d["views"])
    kw = dict(k=d["k"], rounds=args.tsc_rounds, steps_per_round=d["steps_per_round"], bootstrap_steps=d["bootstrap_steps"], lr=d["lr"],
              batch_size=d["batch_size"], home=home, seed=cfg["seed"], run_id=run_id, progress=False, threads=1, roi=cfg["roi"],
              store_path=args.store or cfg["feature_store"], views=views, method="duld++",
              method_params={"q": args.q, "proxy_steps": args.proxy_steps, "duld_rounds": cfg["rounds"], "tsc_loss": tsc_loss})
    ws = Workspace(home)
    if not ws.run_file(run_id, "config.json").is_file():
        duld(cfg["dataset"], cfg["backbone"], None, max_rounds=-1, **kw)
        new = json.loads(ws.run_file(run_id, "config.json").read_text())
        diff = [k for k in MATCH if json.dumps(new.get(k), sort_keys=True) != json.dumps(cfg.get(k), sort_keys=True)]
        if diff:
            shutil.rmtree(ws.run_dir(run_id))
            raise ConfigError(f"the D-ULD run differs from the D-ULD++ run in {diff}", where=str(src / "config.json"),
                              fix="seed from a D-ULD run made with the current engine settings")
        for r in range(cfg["rounds"] + 1):
            name = "bootstrap-000" if r == 0 else f"round-{r:03d}"
            if not (src / "checkpoints" / name / STATE_NAME).is_file():
                raise ConfigError(f"the D-ULD run has no finished {name}", where=str(src / "checkpoints"))
            shutil.copytree(src / "checkpoints" / name, ws.run_dir(run_id) / "checkpoints" / name)
    t0 = time.perf_counter()
    duld(cfg["dataset"], cfg["backbone"], None, resume=True, **kw)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True, help="workspace for the two D-ULD++ runs (manifests of the dataset needed)")
    ap.add_argument("--from-run", type=Path, required=True, help="a finished D-ULD run folder")
    ap.add_argument("--store", default=None, help="feature store folder (default: the D-ULD run's)")
    ap.add_argument("--q", type=int, default=5)
    ap.add_argument("--proxy-steps", type=int, default=150)
    ap.add_argument("--tsc-rounds", type=int, default=2)
    ap.add_argument("--prefix", default="tscloss")
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    lines = [f"# D-ULD++ TSC rounds: Eq. 3 vs the full VAE (Table 2's last rows), seeded from `{args.from_run.name}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
             f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; Q = {args.q}, proxy stage {args.proxy_steps} steps, {args.tsc_rounds} TSC rounds; one seed.", "",
             "| TSC loss | stage | round | forward NME | backward NME | Hungarian acc | pose acc train | pose acc test |", "|---|---|---|---|---|---|---|---|"]
    pose_rows, seconds = [], {}
    for loss in ("eq3", "elbo"):
        rid = f"{args.prefix}-{loss}"
        seconds[loss] = seed_run(args.home, args.from_run, rid, loss, args)
        m = metrics_table(args.home, rid)
        m = m[(m["split"] == "test") & m["stage"].isin(["proxy", "duldpp"])]
        piv = m.pivot_table(index=["round", "stage"], columns="metric", values="value", aggfunc="first").reset_index()
        pose = read_table(Workspace(args.home).run_file(rid, "pose-clusters.parquet"), "pose_clusters")
        pose_rows.append(pose.assign(tsc_loss=loss))
        overall = pose[pose["bin_index"] == -1].set_index(["round", "split"])["accuracy"]
        for rec in piv.to_dict("records"):
            lines.append(f"| {loss} | {rec['stage']} | {rec['round']} | {rec['nme_forward']:.2f} | {rec['nme_backward']:.2f} | "
                         f"{rec['acc0.2_hungarian']:.3f} | {overall.get((rec['round'], 'train'), float('nan')):.3f} | "
                         f"{overall.get((rec['round'], 'test'), float('nan')):.3f} |")
    allpose = pd.concat(pose_rows, ignore_index=True)
    bins = allpose[allpose["bin_index"] >= 0].sort_values("bin_index")["bin"].drop_duplicates().tolist() + ["overall"]
    lines += ["", "Pose clusters vs yaw bins (majority bin per cluster, mapped on train; accuracy per bin, test split):", "",
              "| TSC loss | stage | round | " + " | ".join(bins) + " |", "|---|---|---|" + "---|" * len(bins)]
    test = allpose[allpose["split"] == "test"]
    for (loss, rnd, stage), part in test.groupby(["tsc_loss", "round", "stage"], sort=True):
        acc = part.set_index("bin")["accuracy"]
        lines.append(f"| {loss} | {stage} | {rnd} | " + " | ".join(f"{acc.get(b, float('nan')):.2f}" for b in bins) + " |")
    lines += ["", "Wall-clock of this call (a run finished before is only read): "
              + ", ".join(f"{loss} {s:.0f} s" for loss, s in seconds.items()) + f"; {time.perf_counter() - t0:.0f} s in all."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        args.write.write_text(text)


if __name__ == "__main__":
    main()
