"""A short D-ULD++ fine-tune of a trained D-ULD run with the building blocks (no flow, no engine).

From one checkpoint of a finished D-ULD run (paper 001, Sec 4 "Training details": D-ULD++
starts from the D-ULD model):

1. pose VAE warm start: ELBO on the frozen detector's heatmaps (as in bench_duldpp_tsc.py);
2. proxy-task stage: TSC labels from its codes, ``proxy_task_step`` for ``--steps`` steps
   (descriptor head frozen);
3. ``--rounds`` D-ULD++ rounds: keypoints + pose codes -> TSC labels -> ``latent_step`` for
   ``--steps`` steps (decoder dropped, Eq. 3 on the codes);
4. landmarks on the test split by exemplar assignment: TSC + identities and, on the same
   fine-tuned heads, D-ULD's K-means (TSC with Q = 1); NME, Hungarian accuracy, and the
   pose-cluster accuracy of the final codes.

``--control``: the same schedule (steps, rounds, learning rates, batches) with plain D-ULD
self-training instead (K-means labels re-fitted each round, every head trained, no VAE), so
that a change in NME can be told apart from "more training".

Learning rates default to the paper's (5e-5 / 5e-4; ``--proxy-lr`` / ``--latent-lr``). The
second view is the feature-warp shortcut (``DULDConfig.views = None``), not the run's view store.

    OMP_NUM_THREADS=1 python bench/bench_duldpp_finetune.py --run workspace/runs/<duld run> \\
        --steps 100 --rounds 2 --write bench/results/duldpp_finetune.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_duldpp_tsc import cluster_accuracy, eval_data, heatmaps, train_vae  # noqa: E402
from flows.duld import endless_batches  # noqa: E402
from pipeline.datasets.base import Manifest  # noqa: E402
from pipeline.evaluation.nme import YAW_EDGES, evaluate_nme, hungarian_accuracy  # noqa: E402
from pipeline.heads.descriptor import crop_to_normalised  # noqa: E402
from pipeline.heads.model import ULDHeads  # noqa: E402
from pipeline.heads.pose_vae import PoseVAE, PoseVAEConfig  # noqa: E402
from pipeline.labelling.two_stage import TwoStageLabeller, TwoStageLabels  # noqa: E402
from pipeline.methods.duld import DULDConfig, extract_keypoints, seeded_generator, self_training_step  # noqa: E402
from pipeline.methods.duldpp import DULDPPConfig, latent_step, make_duldpp_optimizer, pose_codes, proxy_task_step  # noqa: E402
from storage.feature_loader import make_loader  # noqa: E402
from storage.features import FeatureStore  # noqa: E402
from storage.layout import Workspace  # noqa: E402


def run_steps(step_fn, model, vae, opt, batches, labels: TwoStageLabels, steps: int, cfg: DULDPPConfig, gen) -> list[dict[str, float]]:
    model.train()
    if vae is not None:
        vae.train()
    log = []
    for _ in range(steps):
        batch = next(batches)
        coords, present, pose = labels.lookup(batch["index"])  # Q * K label columns
        losses = step_fn(model, vae, batch, coords, present, pose, cfg, gen)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        log.append({k: float(v.detach()) for k, v in losses.items()})
    return log


def summary(log: list[dict[str, float]], key: str, n: int = 10) -> str:
    return f"{np.mean([r[key] for r in log[:n]]):.3f} -> {np.mean([r[key] for r in log[-n:]]):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--q", type=int, default=5)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=100, help="steps of the proxy stage and of every D-ULD++ round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--proxy-lr", type=float, default=5e-5, help="paper: 5e-5")
    ap.add_argument("--latent-lr", type=float, default=5e-4, help="paper: 5e-4")
    ap.add_argument("--control", action="store_true", help="plain D-ULD rounds on the same schedule instead")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0, load0 = time.perf_counter(), os.getloadavg()[0]

    cfg = json.loads((args.run / "config.json").read_text())
    home = args.run.parents[1]
    ckpt = args.checkpoint or sorted(p.name for p in (args.run / "checkpoints").iterdir() if p.is_dir())[-1]
    model = ULDHeads.from_pretrained(args.run / "checkpoints" / ckpt)
    dcfg = replace(DULDConfig.from_json(cfg["duld"]), views=None)
    pp = DULDPPConfig(duld=dcfg, q=args.q, proxy_lr=args.proxy_lr, latent_lr=args.latent_lr)
    store = FeatureStore.open(cfg["feature_store"])
    S, K, Q = model.config.crop_size, dcfg.k, args.q
    splits = {"train": store.indices("train"), "test": store.indices("test")}
    rois = None
    if cfg.get("roi"):
        from flows.zeroshot import store_rois

        rois = np.zeros((len(store), 4), np.float32)
        for rows in splits.values():
            rois[rows] = store_rois(home, cfg["dataset"], store, rows)
    man = {s: Manifest.load(Workspace(home).manifest(cfg["dataset"], s)) for s in splits}
    yaw = man["train"].frame.set_index("image_id").loc[store.image_ids[splits["train"]], "yaw"].to_numpy(np.float64)
    yaw_bin = np.clip(np.searchsorted(np.asarray(YAW_EDGES), yaw, side="right") - 1, 0, len(YAW_EDGES) - 2)

    def keypoints(split: str):
        return extract_keypoints(model, make_loader(store, splits[split], batch_size=32), dcfg, progress=False, rois=rois)

    def codes_of(split: str) -> np.ndarray:
        rows, codes = pose_codes(model, vae, make_loader(store, splits[split], batch_size=32))
        assert np.array_equal(rows, splits[split])
        return codes

    one = {s: np.zeros((len(splits[s]), 1), np.float32) for s in splits}  # TSC with Q = 1 = D-ULD's K-means

    def kmeans_labels(round_: int) -> tuple[TwoStageLabeller, TwoStageLabels, float]:
        kp_r = keypoints("train")
        lab = TwoStageLabeller(q=1, k=K).fit(kp_r, one["train"], splits["train"], seed=args.seed + round_)
        return lab, lab.predict(kp_r, one["train"], splits["train"]), float("nan")

    # 1. VAE warm start on the frozen detector; targets = D-ULD's exemplar keypoints
    vae, t_vae = None, 0.0
    if not args.control:
        _, pl, _ = kmeans_labels(0)
        H = heatmaps(model.eval(), store, splits["train"])
        G = PoseVAE(PoseVAEConfig(size=H.shape[-1], k=K)).target(
            crop_to_normalised(torch.from_numpy(np.nan_to_num(pl.coords)), S), torch.from_numpy(pl.present))
        vae, _, t_vae = train_vae(H, G, K, args.vae_steps, args.seed, 1.0)
    lines_rounds = []

    def tsc_labels(round_: int) -> tuple[TwoStageLabeller, TwoStageLabels, float]:
        if args.control:
            return kmeans_labels(round_)
        kp_r = keypoints("train")
        codes = codes_of("train")
        tsc = TwoStageLabeller(q=Q, k=K).fit(kp_r, codes, splits["train"], seed=args.seed + round_)
        acc = cluster_accuracy(codes, yaw_bin, Q, args.seed)[0]
        return tsc, tsc.predict(kp_r, codes, splits["train"]), acc

    def duld_step(model, vae, batch, coords, present, pose, cfg, gen):
        return self_training_step(model, batch, coords, present, cfg.duld, gen)

    def optimizer(step: str) -> torch.optim.Optimizer:
        if args.control:  # D-ULD trains every head
            return torch.optim.Adam(model.parameters(), lr=pp.proxy_lr if step == "proxy" else pp.latent_lr, betas=(0.9, 0.999))
        return make_duldpp_optimizer(model, vae, step, pp)

    # 2. proxy-task stage
    tsc, labels, acc = tsc_labels(0)
    batches = endless_batches(store, splits["train"], dcfg.batch_size, args.seed)
    opt = optimizer("proxy")
    t = time.perf_counter()
    log = run_steps(duld_step if args.control else proxy_task_step, model, vae, opt, batches, labels, args.steps, pp,
                    seeded_generator(args.seed, "proxy", 0))
    elbo = "" if args.control else f", ELBO {summary(log, 'elbo')}"
    lines_rounds.append(
        f"| {'D-ULD round 1' if args.control else 'proxy task'} | {acc:.3f} | {args.steps} | {time.perf_counter() - t:.0f} s | "
        f"detector {summary(log, 'detector')}, contrastive {summary(log, 'contrastive')}{elbo} |"
    )
    # 3. D-ULD++ rounds (decoder dropped)
    opt = optimizer("latent")
    for r in range(1, args.rounds + 1):
        tsc, labels, acc = tsc_labels(r)
        t = time.perf_counter()
        log = run_steps(duld_step if args.control else latent_step, model, vae, opt, batches, labels, args.steps, pp,
                        seeded_generator(args.seed, "duldpp", r))
        last = f"contrastive {summary(log, 'contrastive')}" if args.control else f"Eq. 3 {summary(log, 'latent')}"
        lines_rounds.append(
            f"| {'D-ULD round ' + str(r + 1) if args.control else 'round ' + str(r)} | {acc:.3f} | {args.steps} | "
            f"{time.perf_counter() - t:.0f} s | detector {summary(log, 'detector')}, {last} |"
        )

    # 4. landmarks on the test split
    tsc, _, acc_final = tsc_labels(args.rounds + 1)
    kps = {"train": keypoints("train"), "test": keypoints("test")}
    single = TwoStageLabeller(q=1, k=K).fit(kps["train"], one["train"], splits["train"], seed=args.seed)
    readouts = [("D-ULD K-means (Q = 1)", single, one)]
    if not args.control:
        readouts.append(("TSC + identities", tsc, {s: codes_of(s) for s in splits}))
    results = {}
    for name, lab, c in readouts:
        ed = {}
        for s in splits:
            coords, present = lab.predict(kps[s], c[s], splits[s]).by_identity()
            ed[s] = eval_data(coords, present, splits[s], store, man[s], S)
        rep = evaluate_nme(ed["train"], ed["test"], n_regressor_images=300, repeats=5, seed=args.seed)
        results[name] = (rep.forward.mean, rep.backward.mean, hungarian_accuracy(ed["train"], ed["test"]).mean, float(ed["test"].present.mean()))

    lines = [
        "# Control: the same schedule with plain D-ULD self-training" if args.control
        else "# A short D-ULD++ fine-tune of a trained D-ULD run (building blocks only)",
        "",
        f"Machine: 2-core CPU shared with other jobs, no GPU ({platform.machine()}, torch {torch.__version__}); load average "
        f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {time.perf_counter() - t0:.0f} s wall in all.",
        f"Run `{args.run}` checkpoint `{ckpt}` (dataset {cfg['dataset']}), K = {K}, Q = {Q}, batch {dcfg.batch_size}, feature-warp views, "
        f"Adam lr {pp.proxy_lr:g} (proxy) / {pp.latent_lr:g} (rounds), ELBO weight {pp.elbo_weight:g}, margin {pp.latent_margin:g}; "
        + ("no VAE" if args.control else f"pose VAE warm start {args.vae_steps} ELBO steps ({t_vae:.0f} s)") + f"; seed {args.seed}.",
        "",
        "| stage | pose-cluster accuracy of the codes it starts from | steps | time | losses (first 10 -> last 10 steps) |",
        "|---|---|---|---|---|",
        *lines_rounds,
        "",
        *([] if args.control else [
            f"Final codes: pose-cluster accuracy {acc_final:.3f} (Q = {Q} vs {len(YAW_EDGES) - 1} yaw bins, majority mapping, train split).",
            ""]),
        "Test split, landmarks by exemplar assignment on the fine-tuned heads (missing imputed):",
        "",
        "| labeller | forward NME | backward NME | Hungarian acc@0.2 | landmarks present |",
        "|---|---|---|---|---|",
        *[f"| {n} | {f:.2f} | {b:.2f} | {h:.3f} | {p:.3f} |" for n, (f, b, h, p) in results.items()],
        "",
        f"Command: `OMP_NUM_THREADS=1 python bench/bench_duldpp_finetune.py --run {args.run} --q {Q} --steps {args.steps} --rounds {args.rounds} --proxy-lr {pp.proxy_lr:g} --latent-lr {pp.latent_lr:g}{' --control' if args.control else ''}`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        args.write.write_text(text)


if __name__ == "__main__":
    main()
