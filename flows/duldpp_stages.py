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
                           on the encoder), decoder dropped, Adam 5e-4, ``steps_per_round`` steps

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
    training_batches,
    write_predictions,
)
from pipeline.errors import StoreError
from pipeline.heads.model import ULDHeads
from pipeline.heads.pose_vae import PoseVAE, PoseVAEConfig
from pipeline.labelling import KeypointSet, PseudoLabels
from pipeline.labelling.two_stage import TwoStageLabeller, TwoStageLabels
from pipeline.methods.duld import extract_keypoints, predict_landmarks, seeded_generator
from pipeline.methods.duldpp import (
    DULDPPConfig,
    build_pose_vae,
    latent_step,
    make_duldpp_optimizer,
    pose_codes,
    pose_vae_config,
    proxy_task_step,
    train_duldpp_steps,
)
from storage.atomic import atomic_path
from storage.tables import append_table

VAE_WEIGHTS = "vae.safetensors"
VAE_CONFIG = "vae.json"
CODES_NAME = "train-codes.npz"


# ----------------------------------------------------------------- settings and files (no Prefect)
def pp_config(ctx: RunContext, q: int | None = None) -> DULDPPConfig:
    """The D-ULD++ step settings of this run (paper learning rates; ``q`` overrides Q, 1 for the proxy stage)."""
    return DULDPPConfig(duld=ctx.config, q=int(ctx.duldpp["q"] if q is None else q))


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
    """Step 2 (Sec 3.3.2): detector MSE on the TSC labels + Eq. 3 on the encoder's codes (decoder dropped)."""
    t0 = time.perf_counter()
    records = train_duldpp_steps(latent_step, model, vae, optimizer, training_batches(ctx, seed=ctx.seed + 7919 * round_), labels.lookup,
                                 ctx.config.steps_per_round, pp_config(ctx), seeded_generator(ctx.seed, DULDPP, round_), ctx.progress,
                                 desc=f"D-ULD++ round {round_}")
    append_train_log(ctx, DULDPP, round_, records)
    if records:
        print(f"round {round_}: {len(records)} steps in {time.perf_counter() - t0:.0f} s, last Eq. 3 loss {records[-1]['latent']:.3f}")


@task(name="evaluate-tsc", cache_policy=NO_CACHE, persist_result=False)
def evaluate_tsc_task(ctx: RunContext, round_: int, model: ULDHeads, vae: PoseVAE) -> tuple[TwoStageLabeller, KeypointSet, np.ndarray, pd.DataFrame]:
    """Train keypoints + pose codes -> TSC labeller; K landmarks per image with its pose cluster's
    centroids in identity order (both splits) -> keypoints / metrics (``flows.duld.write_predictions``)."""
    kp = extract_keypoints(model, ordered_batches(ctx, ctx.train_rows), ctx.config, ctx.progress, rois=ctx.rois)
    codes = codes_for(ctx, model, vae, ctx.train_rows)
    tsc = make_tsc_labeller(ctx).fit(kp, codes, ctx.train_rows, seed=labeller_seed(ctx, round_))
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
        # After the proxy stage a new Adam at the TSC rounds' rate; after a TSC round its state carries on.
        carry = ctx.stage_of(round_ - 1)[0] == DULDPP
        model, optimizer, tsc, kp = load_checkpoint(prev, ctx.config.lr, make_tsc_labeller(ctx),
                                                    optimizer_for=lambda m: make_duldpp_optimizer(m, vae, "latent", cfg) if carry else None)
        if optimizer is None:
            optimizer = make_duldpp_optimizer(model, vae, "latent", cfg)
        labels = tsc_labels_task(ctx, round_, kp, load_codes(prev, ctx.train_rows), tsc)
        train_tsc_task(ctx, round_, model, vae, optimizer, labels)
    else:  # pragma: no cover - flows.duld.round_flow runs the D-ULD rounds itself
        raise ValueError(f"{stage!r} is not a D-ULD++ stage (expected {PROXY!r} or {DULDPP!r}, {ROUND!r} is D-ULD's)")
    tsc, kp, codes, rows = evaluate_tsc_task(ctx, round_, model, vae)

    def extra(path: Path) -> None:
        save_vae(path, vae)
        save_codes(path, ctx.train_rows, codes)

    save_checkpoint(checkpoint_dir(ctx, stage, round_), model, optimizer, tsc, kp, _state(ctx, round_, rows), extra=extra)

