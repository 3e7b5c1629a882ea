"""D-ULD++ building blocks on a trained D-ULD run: do pose codes find the pose, and does TSC help?

Takes one checkpoint of a finished D-ULD run (no retraining of the heads) and measures:

1. **Pose clusters** (paper 001, Fig. 7 protocol): a pose VAE (``pipeline.heads.pose_vae``)
   is trained with the ELBO on the run's detector heatmaps H (train split), its target
   the Gaussian map of the run's exemplar keypoints (D-ULD's K-means pseudo-labels).
   Its codes are clustered into Q = 5 clusters; each cluster is mapped to the yaw bin
   holding most of its images, and "clustering accuracy" is the share of images in
   their cluster's bin (the paper's measure), next to a one-to-one (Hungarian)
   mapping. Controls: the same VAE untrained, and k-means on the flattened targets G.
2. **Cluster quality** (Table 3): silhouette and Calinski-Harabasz of the train
   keypoint descriptors under D-ULD's K labels and under TSC's Q x K labels.
3. **Landmarks** from exemplar assignment alone (no heatmap fallback, missing
   landmarks imputed by the evaluator): D-ULD's K centroids vs TSC's per-pose
   centroids mapped to K identities (``match_identities``); forward / backward
   NME and Hungarian accuracy on the test split. This is TSC used as the labeller
   of a fixed model, not D-ULD++ (which retrains the heads on TSC labels).

Run (a few minutes on 2 cores)::

    OMP_NUM_THREADS=1 python bench/bench_duldpp_tsc.py --run workspace/runs/<duld run> \\
        --write bench/results/duldpp_tsc.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.clustering import FaissKMeans, cluster_quality, nearest_centroid  # noqa: E402
from pipeline.datasets.base import Manifest  # noqa: E402
from pipeline.evaluation.nme import YAW_EDGES, EvalData, evaluate_nme, hungarian_accuracy, normaliser_to_unit, to_unit_crop  # noqa: E402
from pipeline.heads.model import ULDHeads  # noqa: E402
from pipeline.heads.pose_losses import elbo_loss  # noqa: E402
from pipeline.heads.pose_vae import PoseVAE, PoseVAEConfig  # noqa: E402
from pipeline.heads.descriptor import crop_to_normalised  # noqa: E402
from pipeline.labelling.two_stage import TwoStageLabeller  # noqa: E402
from pipeline.methods.duld import DULDConfig, extract_keypoints  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402
from storage.feature_loader import make_loader  # noqa: E402
from storage.features import FeatureStore  # noqa: E402
from storage.layout import Workspace  # noqa: E402


@torch.no_grad()
def heatmaps(model: ULDHeads, store: FeatureStore, rows: np.ndarray) -> torch.Tensor:
    out = [torch.sigmoid(model(b["features"]).logits) for b in make_loader(store, rows, batch_size=32)]
    return torch.cat(out)


def train_vae(H: torch.Tensor, G: torch.Tensor, k: int, steps: int, seed: int, beta: float) -> tuple[PoseVAE, list[float], float]:
    torch.manual_seed(seed)
    vae = PoseVAE(PoseVAEConfig(size=H.shape[-1], k=k, latent=64))
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    log, t0 = [], time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(H), (32,), generator=gen)
        out = vae(H[idx], generator=gen)
        terms = elbo_loss(out.logits, G[idx], out.mu, out.logvar, beta)
        opt.zero_grad()
        terms.loss.backward()
        opt.step()
        log.append(terms.loss.item())
    return vae, log, time.perf_counter() - t0


def cluster_accuracy(X: np.ndarray, yaw_bin: np.ndarray, q: int, seed: int) -> tuple[float, float, list[float]]:
    """(majority-mapped accuracy, one-to-one accuracy, per-bin majority accuracy) of a Q-means of X."""
    lab = FaissKMeans(n_clusters=q, seed=seed, use_gpu=False).fit(X).labels_
    nb = len(YAW_EDGES) - 1
    conf = np.zeros((q, nb), np.int64)
    np.add.at(conf, (lab, yaw_bin), 1)
    major = conf.argmax(1)
    hit = major[lab] == yaw_bin
    r, c = linear_sum_assignment(-conf)
    one = conf[r, c].sum() / len(lab)
    per_bin = [float(hit[yaw_bin == b].mean()) if (yaw_bin == b).any() else float("nan") for b in range(nb)]
    return float(hit.mean()), float(one), per_bin


def eval_data(coords: np.ndarray, present: np.ndarray, rows: np.ndarray, store: FeatureStore, man: Manifest, S: int) -> EvalData:
    ids = store.image_ids[rows]
    pos = {i: n for n, i in enumerate(man.image_ids)}
    m = np.asarray([pos[i] for i in ids])
    boxes = store.crop_boxes[rows].astype(np.float64)
    gt = to_unit_crop(man.landmarks()[m], boxes)
    norm = normaliser_to_unit(man.normalisers()[m], boxes)
    yaw = man.frame["yaw"].to_numpy(np.float64)[m] if "yaw" in man.frame else None
    return EvalData(coords / S, present, gt, norm, yaw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--checkpoint", default=None, help="checkpoint folder name (default: the last round)")
    ap.add_argument("--q", type=int, default=5)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--beta", type=float, default=1.0, help="KL weight of the ELBO (1 = the ELBO)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]

    cfg = json.loads((args.run / "config.json").read_text())
    home = args.run.parents[1]
    ckpts = sorted(p.name for p in (args.run / "checkpoints").iterdir() if p.is_dir())
    ckpt = args.checkpoint or ckpts[-1]
    model = ULDHeads.from_pretrained(args.run / "checkpoints" / ckpt).eval()
    dcfg = DULDConfig.from_json(cfg["duld"])
    store = FeatureStore.open(cfg["feature_store"])
    S, K, Q = model.config.crop_size, dcfg.k, args.q
    train_rows, test_rows = store.indices("train"), store.indices("test")
    rois = None
    if cfg.get("roi"):
        from flows.zeroshot import store_rois

        rois = np.zeros((len(store), 4), np.float32)
        for rows in (train_rows, test_rows):
            rois[rows] = store_rois(home, cfg["dataset"], store, rows)
    ws = Workspace(home)
    man = {s: Manifest.load(ws.manifest(cfg["dataset"], s)) for s in ("train", "test")}

    # D-ULD's own labelling of the fixed model: TSC with a single pose cluster is exactly
    # D-ULD's K-means + exemplar assignment (the codes play no part).
    kp = {s: extract_keypoints(model, make_loader(store, r, batch_size=32), dcfg, progress=False, rois=rois)
          for s, r in (("train", train_rows), ("test", test_rows))}
    no_codes = {s: np.zeros((len(r), 1), np.float32) for s, r in (("train", train_rows), ("test", test_rows))}
    single = TwoStageLabeller(q=1, k=K, n_init=dcfg.kmeans_n_init, max_iter=dcfg.kmeans_max_iter).fit(kp["train"], no_codes["train"], train_rows, seed=args.seed)
    pl = {s: single.predict(kp[s], no_codes[s], r) for s, r in (("train", train_rows), ("test", test_rows))}

    # 1. pose VAE on the heatmaps, target = Gaussians at D-ULD's exemplar keypoints
    H = {s: heatmaps(model, store, r) for s, r in (("train", train_rows), ("test", test_rows))}
    R = H["train"].shape[-1]
    G = {}
    for s in ("train", "test"):
        pts = crop_to_normalised(torch.from_numpy(np.nan_to_num(pl[s].coords, nan=0.0)), S)
        G[s] = PoseVAE(PoseVAEConfig(size=R, k=K)).target(pts, torch.from_numpy(pl[s].present))
    vae, log, t_vae = train_vae(H["train"], G["train"], K, args.vae_steps, args.seed, args.beta)
    vae.eval()
    torch.manual_seed(args.seed)
    untrained = PoseVAE(PoseVAEConfig(size=R, k=K, latent=64)).eval()
    with torch.no_grad():
        codes = {s: vae.codes(H[s]).numpy() for s in H}
        rec = elbo_loss(vae(H["test"]).logits, G["test"], *vae.encode(H["test"]), args.beta)
    yaw = man["train"].frame.set_index("image_id").loc[store.image_ids[train_rows], "yaw"].to_numpy(np.float64)
    yaw_bin = np.clip(np.searchsorted(np.asarray(YAW_EDGES), yaw, side="right") - 1, 0, len(YAW_EDGES) - 2)
    acc = {
        "pose VAE codes (trained, ELBO)": cluster_accuracy(codes["train"], yaw_bin, Q, args.seed),
        "pose VAE codes (untrained)": cluster_accuracy(untrained.codes(H["train"]).numpy(), yaw_bin, Q, args.seed),
        "flattened targets G": cluster_accuracy(G["train"].flatten(1).numpy(), yaw_bin, Q, args.seed),
        "flattened heatmaps H": cluster_accuracy(H["train"].flatten(1).numpy(), yaw_bin, Q, args.seed),
    }

    # 2. cluster quality of the train keypoint descriptors, D-ULD (K) vs TSC (Q x K)
    tsc = TwoStageLabeller(q=Q, k=K).fit(kp["train"], codes["train"], train_rows, seed=args.seed)
    d_train = kp["train"].desc
    lab_duld = nearest_centroid(d_train, single.centers_[0], use_gpu=False)[0]
    pose_of_row = dict(zip(train_rows.tolist(), tsc.predict_pose(codes["train"]).tolist()))
    kp_pose = np.asarray([pose_of_row[int(r)] for r in kp["train"].rows])
    lab_tsc = np.empty(len(d_train), np.int64)
    for u in range(Q):
        sel = kp_pose == u
        if sel.any():
            lab_tsc[sel] = u * K + nearest_centroid(d_train[sel], tsc.centers_[u], use_gpu=False)[0]
    quality = {"D-ULD (K)": cluster_quality(d_train, lab_duld, seed=args.seed), "TSC (Q x K)": cluster_quality(d_train, lab_tsc, seed=args.seed)}

    # 3. landmarks by exemplar assignment: D-ULD centroids vs TSC + identities
    landmarks = {}
    for name in ("D-ULD K-means", "TSC + identities"):
        ed = {}
        for s, r in (("train", train_rows), ("test", test_rows)):
            if name == "D-ULD K-means":
                coords, present = pl[s].coords, pl[s].present
            else:
                coords, present = tsc.predict(kp[s], codes[s], r).by_identity()
            ed[s] = eval_data(coords, present, r, store, man[s], S)
        rep = evaluate_nme(ed["train"], ed["test"], n_regressor_images=300, repeats=5, seed=args.seed)
        hun = hungarian_accuracy(ed["train"], ed["test"])
        landmarks[name] = (rep.forward.mean, rep.backward.mean, hun.mean, float(ed["test"].present.mean()))

    wall = time.perf_counter() - t_start
    lines = [
        "# D-ULD++ building blocks on a trained D-ULD run",
        "",
        f"Machine: 2-core CPU shared with other jobs, no GPU ({platform.machine()}, torch {torch.__version__}); "
        f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {wall:.0f} s wall in all.",
        f"Run: `{args.run}` (dataset {cfg['dataset']}, backbone {cfg['backbone']}), checkpoint `{ckpt}`, "
        f"K = {K}, Q = {Q}, heatmaps {R} x {R}, {len(train_rows)} train / {len(test_rows)} test images, "
        f"{len(kp['train'])} train keypoints; seed {args.seed}.",
        "",
        f"Pose VAE: widths (16, 32, 64), latent 64, Adam 1e-3, batch 32, beta {args.beta:g}, {args.vae_steps} ELBO steps in {t_vae:.0f} s; "
        f"ELBO (train batches) {np.mean(log[:20]):.1f} -> {np.mean(log[-20:]):.1f}; on the test split: "
        f"reconstruction {rec.reconstruction.item():.1f}, KL {rec.kl.item():.1f} nats per image.",
        "",
        f"## Pose clusters vs {len(YAW_EDGES) - 1} yaw bins (train split; Fig. 7 protocol)",
        "",
        "| clustered | accuracy (majority bin) | accuracy (one-to-one) | per bin, -90 .. 90 |",
        "|---|---|---|---|",
    ]
    for name, (a, o, per) in acc.items():
        lines.append(f"| {name} | {a:.3f} | {o:.3f} | {' / '.join(f'{p:.2f}' for p in per)} |")
    lines += ["", "## Descriptor cluster quality (train keypoints; Table 3)", "", "| labels | silhouette | Calinski-Harabasz | clusters |", "|---|---|---|---|"]
    for name, qd in quality.items():
        lines.append(f"| {name} | {qd['silhouette']:.3f} | {qd['calinski_harabasz']:.1f} | {int(qd['n_clusters'])} |")
    lines += [
        "",
        "## Landmarks by exemplar assignment on the fixed model (test split, missing imputed)",
        "",
        f"TSC fallback pose clusters: {int(tsc.fallback_.sum())} of {Q}; images per pose cluster {tsc.pose_images_.tolist()}.",
        "",
        "| labeller | forward NME | backward NME | Hungarian acc@0.2 | landmarks present |",
        "|---|---|---|---|---|",
    ]
    for name, (f, b, h, p) in landmarks.items():
        lines.append(f"| {name} | {f:.2f} | {b:.2f} | {h:.3f} | {p:.3f} |")
    lines += ["", f"Command: `OMP_NUM_THREADS=1 python bench/bench_duldpp_tsc.py --run {args.run} --q {Q} --vae-steps {args.vae_steps} --beta {args.beta:g}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        args.write.write_text(text)


if __name__ == "__main__":
    main()
