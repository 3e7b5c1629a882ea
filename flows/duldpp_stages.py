"""D-ULD++'s own stages in the self-training engine (paper 001, Sec 3.3 and Sec 4 "Training details").

``flows.duld`` runs every method's schedule (``RunContext.stage_of``); for ``duld++``
(``config.json``'s ``duldpp``: ``q``, ``proxy_steps``, ``duld_rounds``) it is::

    round 0                bootstrap                       (as D-ULD)
    rounds 1..R            D-ULD rounds, k-means labels    (as D-ULD; R = duld_rounds)
    round R+1  proxy       pose-guided proxy task: a pose VAE appended to the detector,
                           ``proxy_task_step`` (detector MSE + descriptor contrastive + ELBO),
                           descriptor head frozen, Adam 5e-5, ``proxy_steps`` steps
    rounds R+2.. duldpp    TSC rounds: Q pose clusters of the VAE codes x K descriptor
                           clusters (``TwoStageLabeller``), ``latent_step`` (detector MSE + Eq. 3
                           on the encoder), decoder dropped, Adam 5e-4, ``steps_per_round`` steps;
                           with ``tsc_loss = "elbo"`` (Table 2's "+ TSC w/ full VAE")
                           ``full_vae_step`` instead: the decoder kept, the whole VAE trained
                           with the ELBO instead of Eq. 3, everything else the same

The proxy stage's labels are the last D-ULD round's k-means exemplars, handed to the
step as TSC labels with Q = 1 (every image in one pose cluster): TSC needs the pose
codes of a trained VAE, which do not exist before this stage. Its evaluation fits the
first TSC labeller on the codes of the VAE it has just trained.

Every evaluation of these stages (the proxy stage's included) runs the heads and the VAE
over the train images, fits the TSC labeller (seed as D-ULD's labeller) and reads out K
landmarks per image with its pose cluster's stage-2 centroids in identity order
(``match_identities``; :meth:`TwoStageLabeller.identity_centers`), so that landmark ``g``
means the same part in every pose. The checkpoint adds to D-ULD's files
``vae.safetensors`` + ``vae.json`` (the VAE, decoder included: it is dropped from the
optimisation, not from the file) and ``train-codes.npz`` (the train images' pose codes the
labeller was fitted on), all written before ``state.json``; ``labeller.npz`` holds the TSC
state and ``optimizer.pt`` the stage's Adam (the proxy stage's, then the TSC rounds', which
carries over from round to round as D-ULD's does). A resumed run reloads all of it, so it
continues bit-identically on CPU.

After each of these stages' checkpoints, where the dataset knows its images' poses (yaw, or
MTFL's head-pose classes), the pose analysis of paper 001's Fig. 7 is read from it
(:func:`update_pose_analysis`): every pose cluster of the checkpoint's TSC labeller mapped to
the pose bin most of its train images are in, clustering accuracy per bin and overall on both
splits -> ``pose-clusters.parquet`` (table kind ``pose_clusters``, one ``round`` per stage)
and ``figures/pose-clusters.png``. It reads only the checkpoint (and the test images' features
for their pose codes), so a finished run made before it existed gets it the same way
(:func:`ensure_pose_analysis`, which the engine calls at the end of every D-ULD++ run).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import load_file, save_file

from flows.duld import (
    DULDPP,
    PROXY,
    ROUND,
    RunContext,
    _state,
    append_train_log,
    checkpoint_dir,
    labeller_seed,
    load_checkpoint,
    ordered_batches,
    pseudo_labels_task,
    pseudolabels_frame,
    save_checkpoint,
    train_keypoints,
    training_batches,
    write_predictions,
)
from pipeline.errors import StoreError
from pipeline.heads.model import ULDHeads
from pipeline.heads.pose_vae import PoseVAE, PoseVAEConfig
from pipeline.labelling import KeypointSet, PseudoLabels
from pipeline.labelling.two_stage import TwoStageLabeller, TwoStageLabels
from pipeline.methods.duld import predict_landmarks, seeded_generator
from pipeline.methods.duldpp import (
    DULDPPConfig,
    build_pose_vae,
    TSC_LOSSES,
    make_duldpp_optimizer,
    pose_codes,
    pose_vae_config,
    proxy_task_step,
    train_duldpp_steps,
    tsc_step,
)
from storage.atomic import atomic_path
from storage.features import FeatureStore
from storage.layout import Workspace
from storage.tables import append_table, read_table

VAE_WEIGHTS = "vae.safetensors"
VAE_CONFIG = "vae.json"
CODES_NAME = "train-codes.npz"
POSE_TABLE = "pose-clusters.parquet"
POSE_FIGURE = "pose-clusters.png"
# Names of annotated pose classes (manifest column pose_class), per dataset: MTFL's head poses 1..5
# stored as 0..4 (pipeline.datasets.mtfl); a dataset not listed gets "class <c>".
POSE_CLASS_NAMES = {name: ["left profile", "left", "frontal", "right", "right profile"] for name in ("mtfl", "aflw")}


# ----------------------------------------------------------------- settings and files (no Prefect)
def pp_config(ctx: RunContext, q: int | None = None) -> DULDPPConfig:
    """The D-ULD++ step settings of this run (paper learning rates; ``q`` overrides Q, 1 for the proxy stage)."""
    return DULDPPConfig(duld=ctx.config, q=int(ctx.duldpp["q"] if q is None else q))


def tsc_loss(ctx: RunContext) -> str:
    """The run's TSC-round loss on the VAE: ``eq3`` (D-ULD++) or ``elbo`` (the full VAE)."""
    return str(ctx.duldpp.get("tsc_loss", "eq3"))


def make_tsc_labeller(ctx: RunContext) -> TwoStageLabeller:
    """An unfitted TSC labeller with the run's Q, K and k-means settings."""
    return TwoStageLabeller(q=int(ctx.duldpp["q"]), k=ctx.config.k, n_init=ctx.config.kmeans_n_init, max_iter=ctx.config.kmeans_max_iter)


def save_vae(path: Path, vae: PoseVAE) -> None:
    with atomic_path(path / VAE_WEIGHTS) as tmp:
        save_file({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, str(tmp))
    with atomic_path(path / VAE_CONFIG) as tmp:
        Path(tmp).write_text(json.dumps(vae.config.to_json()))


def load_vae(path: Path) -> PoseVAE:
    if not (path / VAE_WEIGHTS).is_file():
        raise StoreError("checkpoint has no pose VAE", where=str(path), fix="resume the run with the method it was made with")
    cfg = json.loads((path / VAE_CONFIG).read_text())
    vae = PoseVAE(PoseVAEConfig.from_json({**cfg, "widths": tuple(cfg["widths"])}))
    vae.load_state_dict(load_file(str(path / VAE_WEIGHTS)))
    return vae


def save_codes(path: Path, rows: np.ndarray, codes: np.ndarray) -> None:
    with atomic_path(path / CODES_NAME) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, rows=rows, codes=codes)


def load_codes(path: Path, rows: np.ndarray) -> np.ndarray:
    """The checkpoint's train pose codes, which must be those of the store rows ``rows`` in that order."""
    with np.load(path / CODES_NAME) as z:
        if not np.array_equal(z["rows"], rows):
            raise StoreError("the checkpoint's pose codes belong to other training images", where=str(path / CODES_NAME),
                             fix="resume with the run's own feature store, or start a new run")
        return z["codes"]


def codes_for(ctx: RunContext, model: ULDHeads, vae: PoseVAE, rows: np.ndarray) -> np.ndarray:
    """(len(rows), latent) pose codes of the images ``rows``, in that order."""
    got, codes = pose_codes(model, vae, ordered_batches(ctx, rows))
    at = {int(r): i for i, r in enumerate(got)}
    return codes[np.asarray([at[int(r)] for r in rows], np.int64)]


# ----------------------------------------------------------------- tasks
@task(name="train-proxy", cache_policy=NO_CACHE, persist_result=False)
def train_proxy_task(ctx: RunContext, round_: int, model: ULDHeads, vae: PoseVAE, optimizer: torch.optim.Optimizer, pl: PseudoLabels) -> None:
    """Step 1 (Sec 3.3.2) on the D-ULD k-means labels as Q = 1: detector MSE + descriptor contrastive + ELBO."""
    cfg = pp_config(ctx, q=1)

    def lookup(rows: torch.Tensor):
        coords, present = pl.lookup(rows)
        return coords, present, torch.zeros(len(rows), dtype=torch.int64)

    t0 = time.perf_counter()
    records = train_duldpp_steps(proxy_task_step, model, vae, optimizer, training_batches(ctx, seed=ctx.seed + 7919 * round_), lookup,
                                 int(ctx.duldpp["proxy_steps"]), cfg, seeded_generator(ctx.seed, PROXY, round_), ctx.progress, desc="proxy task")
    append_train_log(ctx, PROXY, round_, records)
    if records:
        print(f"proxy task: {len(records)} steps in {time.perf_counter() - t0:.0f} s, last ELBO {records[-1]['elbo']:.1f}")


@task(name="tsc-labels", cache_policy=NO_CACHE, persist_result=False)
def tsc_labels_task(ctx: RunContext, round_: int, kp: KeypointSet, codes: np.ndarray, tsc: TwoStageLabeller) -> TwoStageLabels:
    """TSC pseudo-labels from the previous evaluation's keypoints, codes and labeller ->
    round-NNN-keypoints.parquet + pseudolabels.parquet (with pose cluster and pose code)."""
    from flows.duld import keypoints_parquet

    labels, sq = tsc.assign(kp, codes, ctx.train_rows)
    tl = tsc.predict(kp, codes, ctx.train_rows)
    keypoints_parquet(ctx, round_, kp, labels, sq)
    frame = pseudolabels_frame(ctx, round_, tl.to_pseudo_labels(), stage=DULDPP, pose=tl.pose, codes=codes)
    append_table(frame, ctx.ws.run_file(ctx.run_id, "pseudolabels.parquet"), "pseudolabels", replace_on=["run_id", "round"])
    sizes = np.bincount(tl.pose, minlength=tsc.q)
    print(f"round {round_}: {len(kp)} keypoints, pose clusters of {sizes.tolist()} images, {tl.present.mean():.1%} of K labels present")
    return tl


@task(name="train-tsc-round", cache_policy=NO_CACHE, persist_result=False)
def train_tsc_task(ctx: RunContext, round_: int, model: ULDHeads, vae: PoseVAE, optimizer: torch.optim.Optimizer, labels: TwoStageLabels) -> None:
    """Step 2 (Sec 3.3.2): detector MSE on the TSC labels + Eq. 3 on the encoder's codes (decoder dropped),
    or, with the run's ``tsc_loss = "elbo"``, + the ELBO of the full VAE (Sec 5's ablation)."""
    t0 = time.perf_counter()
    records = train_duldpp_steps(tsc_step(tsc_loss(ctx)), model, vae, optimizer, training_batches(ctx, seed=ctx.seed + 7919 * round_), labels.lookup,
                                 ctx.config.steps_per_round, pp_config(ctx), seeded_generator(ctx.seed, DULDPP, round_), ctx.progress,
                                 desc=f"D-ULD++ round {round_}")
    append_train_log(ctx, DULDPP, round_, records)
    if records:
        last = f"Eq. 3 loss {records[-1]['latent']:.3f}" if "latent" in records[-1] else f"ELBO {records[-1]['elbo']:.1f}"
        print(f"round {round_}: {len(records)} steps in {time.perf_counter() - t0:.0f} s, last {last}")


@task(name="evaluate-tsc", cache_policy=NO_CACHE, persist_result=False)
def evaluate_tsc_task(ctx: RunContext, round_: int, model: ULDHeads, vae: PoseVAE, kp: KeypointSet) -> tuple[TwoStageLabeller, KeypointSet, np.ndarray, pd.DataFrame]:
    """Train keypoints ``kp`` (``flows.duld.train_keypoints``) + pose codes -> TSC labeller; K landmarks
    per image with its pose cluster's centroids in identity order (both splits) -> keypoints / metrics
    (``flows.duld.write_predictions``)."""
    codes = codes_for(ctx, model, vae, ctx.train_rows)
    tsc = make_tsc_labeller(ctx).fit(kp.peaks(), codes, ctx.train_rows, seed=labeller_seed(ctx, round_))
    print(f"round {round_}: pose clusters of {tsc.pose_images_.tolist()} train images, {int(tsc.fallback_.sum())} on the global centroids")

    def predict(split: str, rows: np.ndarray):
        split_codes = codes if split == "train" else codes_for(ctx, model, vae, rows)
        per_row = np.zeros((len(ctx.store), ctx.config.k, tsc.centers_.shape[-1]), np.float32)
        per_row[rows] = tsc.identity_centers(split_codes)
        return predict_landmarks(model, ordered_batches(ctx, rows), tsc.landmark_centers_, ctx.config, ctx.progress, rois=ctx.rois,
                                 image_centers=lambda batch_rows: per_row[batch_rows])

    return tsc, kp, codes, write_predictions(ctx, round_, predict)


# ----------------------------------------------------------------- stages (inside flows.duld.round_flow)
def run_stage(ctx: RunContext, round_: int) -> None:
    """Round ``round_`` of a D-ULD++ run: the proxy-task stage or a TSC round (``ctx.stage_of``)."""
    stage, _ = ctx.stage_of(round_)
    prev = checkpoint_dir(ctx, *ctx.stage_of(round_ - 1))
    if stage == PROXY:
        # From the last D-ULD round: its heads, k-means labeller and train keypoints; a new VAE and
        # a new Adam (the descriptor head left out, Sec 4), so D-ULD's optimizer state is not loaded.
        model, _, labeller, kp = load_checkpoint(prev, ctx.config.lr, ctx.make_labeller(), optimizer_for=lambda m: None)
        vae = build_pose_vae(pose_vae_config(model.config.out_size, ctx.config.k), ctx.seed + 104729)
        optimizer = make_duldpp_optimizer(model, vae, "proxy", pp_config(ctx, q=1))
        pl = pseudo_labels_task(ctx, round_, kp, labeller)
        train_proxy_task(ctx, round_, model, vae, optimizer, pl)
    elif stage == DULDPP:
        vae = load_vae(prev)
        cfg = pp_config(ctx)
        step = TSC_LOSSES[tsc_loss(ctx)]  # which VAE parameters the TSC rounds' Adam holds
        # After the proxy stage a new Adam at the TSC rounds' rate; after a TSC round its state carries on.
        carry = ctx.stage_of(round_ - 1)[0] == DULDPP
        model, optimizer, tsc, kp = load_checkpoint(prev, ctx.config.lr, make_tsc_labeller(ctx),
                                                    optimizer_for=lambda m: make_duldpp_optimizer(m, vae, step, cfg) if carry else None)
        if optimizer is None:
            optimizer = make_duldpp_optimizer(model, vae, step, cfg)
        labels = tsc_labels_task(ctx, round_, kp, load_codes(prev, ctx.train_rows), tsc)
        train_tsc_task(ctx, round_, model, vae, optimizer, labels)
    else:  # pragma: no cover - flows.duld.round_flow runs the D-ULD rounds itself
        raise ValueError(f"{stage!r} is not a D-ULD++ stage (expected {PROXY!r} or {DULDPP!r}, {ROUND!r} is D-ULD's)")
    tsc, kp, codes, rows = evaluate_tsc_task(ctx, round_, model, vae, train_keypoints(ctx, model))

    def extra(path: Path) -> None:
        save_vae(path, vae)
        save_codes(path, ctx.train_rows, codes)

    save_checkpoint(checkpoint_dir(ctx, stage, round_), model, optimizer, tsc, kp, _state(ctx, round_, rows), extra=extra)
    update_pose_analysis(ctx.home, ctx.run_id, ctx.dataset, ctx.store, ctx.method, [(stage, round_)], batch_size=ctx.eval_batch)


# ----------------------------------------------------------------- pose analysis (paper 001, Fig. 7)
def known_poses(home: Path, dataset: str, store: FeatureStore, rows: np.ndarray):
    """:class:`pipeline.evaluation.pose_clusters.PoseBins` of the store rows ``rows`` from the dataset's
    manifests (yaw, else pose class), or None when the dataset annotates neither."""
    from flows.datasets import load_manifest
    from pipeline.evaluation.pose_clusters import pose_bins

    frames = [load_manifest(home, dataset, split).frame for split in sorted(set(store.splits[rows].tolist()))]
    frame = pd.concat(frames, ignore_index=True).drop_duplicates("image_id").set_index("image_id")
    ids = store.image_ids[rows]
    missing = [i for i in ids if i not in frame.index]
    if missing:
        raise StoreError(f"{len(missing)} store images are not in the manifests of {dataset!r} (e.g. {missing[:3]})", where=str(store.path),
                         fix="the store was built from other manifests: re-run `uld features` for this dataset")
    sel = frame.loc[ids]
    pose_class = sel["pose_class"].to_numpy(np.int64) if "pose_class" in sel else None
    return pose_bins(sel["yaw"].to_numpy(np.float64) if "yaw" in sel else None, pose_class, class_names=POSE_CLASS_NAMES.get(dataset))


def _store_codes(store: FeatureStore, model: ULDHeads, vae: PoseVAE, rows: np.ndarray, batch_size: int) -> np.ndarray:
    from storage.feature_loader import make_loader

    got, codes = pose_codes(model, vae, make_loader(store, rows, batch_size=batch_size, shuffle=False))
    at = {int(r): i for i, r in enumerate(got)}
    return codes[np.asarray([at[int(r)] for r in rows], np.int64)]


def pose_analysis_rows(home: Path, run_id: str, dataset: str, store: FeatureStore, method: str, stage: str, round_: int,
                       batch_size: int = 32) -> pd.DataFrame | None:
    """The ``pose_clusters`` rows of one finished D-ULD++ checkpoint, or None without known poses.

    Train images: the checkpoint's pose codes (those its TSC labeller was fitted on); test images:
    the pose codes of its heads and VAE. Each image's pose cluster is the labeller's stage-1
    label of its code (``predict_pose``: the same rule for both splits)."""
    from pipeline.evaluation.pose_clusters import pose_cluster_frame

    train_rows, test_rows = store.indices("train"), store.indices("test")
    train_pose = known_poses(home, dataset, store, train_rows)
    if train_pose is None or not train_pose.known.any():
        return None
    ck = Workspace(home).checkpoint_dir(run_id, stage, round_)
    with np.load(ck / "labeller.npz") as z:
        state = {name: z[name] for name in z.files}
    q, k = (int(n) for n in np.asarray(state["centers"]).shape[:2])
    tsc = TwoStageLabeller(q=q, k=k).set_state(state)
    train_clusters = tsc.predict_pose(load_codes(ck, train_rows))
    test_clusters, test_pose = None, None
    if len(test_rows):
        model, vae = ULDHeads.from_pretrained(ck), load_vae(ck)
        test_clusters = tsc.predict_pose(_store_codes(store, model, vae, test_rows, batch_size))
        test_pose = known_poses(home, dataset, store, test_rows)
        if test_pose is not None and test_pose.labels != train_pose.labels:
            test_pose = None  # e.g. yaw known on one split only: nothing comparable to score
    frame = pose_cluster_frame(train_clusters, train_pose, test_clusters, test_pose, q)
    for i, (name, value) in enumerate((("run_id", run_id), ("method", method), ("stage", stage), ("round", int(round_)), ("dataset", dataset))):
        frame.insert(i, name, value)
    return frame


def update_pose_analysis(home: Path, run_id: str, dataset: str, store: FeatureStore, method: str, stages: list[tuple[str, int]],
                         batch_size: int = 32) -> Path | None:
    """Pose analysis of the checkpoints ``stages`` ((stage, round) pairs) -> pose-clusters.parquet
    (their rows replaced) + figures/pose-clusters.png of every round so far; None without known poses."""
    from pipeline.evaluation.pose_clusters import plot_pose_clusters

    ws = Workspace(home)
    path = ws.run_file(run_id, POSE_TABLE)
    wrote = False
    for stage, round_ in stages:
        frame = pose_analysis_rows(home, run_id, dataset, store, method, stage, round_, batch_size)
        if frame is None:
            return None
        append_table(frame, path, "pose_clusters", replace_on=["run_id", "stage", "round"])
        overall = frame[(frame["bin_index"] == -1)].set_index("split")["accuracy"]
        print(f"{stage} {round_}: pose clusters vs {frame['pose_source'].iloc[0]} bins, majority-mapped accuracy "
              + ", ".join(f"{split} {acc:.2f}" for split, acc in overall.items()))
        wrote = True
    if not path.is_file():
        return None
    figure = ws.figures_dir(run_id) / POSE_FIGURE
    if wrote or not figure.is_file():
        table = read_table(path, "pose_clusters")
        plot_pose_clusters(table[table["run_id"] == run_id], figure, title=f"{run_id}: pose clusters vs known poses")
    return path


def ensure_pose_analysis(home: str | Path, run_id: str, store: FeatureStore | None = None) -> Path | None:
    """Fill in the pose analysis of every finished proxy / TSC checkpoint of a D-ULD++ run that the
    table lacks (runs made before it existed; a stage whose analysis was interrupted). None for
    other methods or datasets without known poses."""
    from flows.duld import STATE_NAME
    from flows.results import read_run_config

    home = Path(home)
    cfg = read_run_config(home, run_id)
    if cfg.get("method") != "duld++":
        return None
    ws = Workspace(home)
    done: set[tuple[str, int]] = set()
    path = ws.run_file(run_id, POSE_TABLE)
    if path.is_file():
        t = read_table(path, "pose_clusters")
        done = {(str(a), int(b)) for a, b in zip(t["stage"], t["round"])}
    todo = []
    for marker in sorted((ws.run_dir(run_id) / "checkpoints").glob(f"*/{STATE_NAME}")):
        stage, _, num = marker.parent.name.rpartition("-")
        if stage in (PROXY, DULDPP) and num.isdigit() and (stage, int(num)) not in done:
            todo.append((stage, int(num)))
    if not todo and not path.is_file():
        return None
    store = FeatureStore.open(cfg["feature_store"]) if store is None else store
    return update_pose_analysis(home, run_id, str(cfg["dataset"]), store, "duld++", sorted(todo, key=lambda t: t[1]))

