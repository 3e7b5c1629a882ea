"""D-ULD++ training steps on one batch (paper 001, Sec 3.3.2 "Training objectives", Sec 4).

Pure functions: a batch of cached feature maps (the D-ULD batch format, see
``pipeline.methods.duld``), the heads, the pose VAE and the batch's TSC labels
(:class:`pipeline.labelling.two_stage.TwoStageLabels`) in, a dict of loss
tensors out. Round loops, re-clustering and persistence belong to the caller.

Step 1 (:func:`proxy_task_step`, the pose-guided proxy task): the D-ULD
self-training losses with the TSC labels (detector MSE to Gaussian heatmaps of
the kept keypoints; descriptor contrastive loss whose classes are the Q x K
labels ``r = u * K + c``) plus the ELBO of the VAE, which reads the detector's
heatmap ``H`` and reconstructs the Gaussian map ``G`` of the same keypoints.
Sec 4 trains this stage with the descriptor head ``Psi_f`` *frozen* at Adam lr
5e-5 while Sec 3.3.2 lists the descriptor contrastive loss among its losses;
both hold when the contrastive gradient reaches the shared aggregator but the
descriptor head's own weights are not updated, which is what
:func:`make_duldpp_optimizer` sets up (the descriptor head is left out of the
optimiser). The ELBO's gradient flows into the detector through ``H``: that is
how the proxy task constrains the landmark configuration.

Step 2 (:func:`latent_step`): the decoder and the ELBO are dropped; the detector
is trained as in step 1 (MSE), the descriptor head stays frozen and the encoder
is trained with Eq. 3 (:func:`pipeline.heads.pose_losses.latent_contrastive_loss`)
on the codes ``phi_j = Enc(Psi_d(Psi_b(x_j)))`` of the batch, labelled with their
stage-1 pose cluster ``u_j``. Paper: Adam lr 5e-4.

Step 2 with the full VAE (:func:`full_vae_step`, Sec 5 / Table 2's "+ TSC w/ full VAE"
row: "we compare it to training the network with the full VAE. The VAE output is
supervised by the ELBO loss"): the same step 2, except that the decoder is kept and the
VAE (encoder and decoder) is trained with the ELBO of step 1 instead of Eq. 3. Which of
the two a run's TSC rounds take is its ``tsc_loss`` (:data:`TSC_LOSSES`).

The D-ULD part reuses :func:`pipeline.methods.duld.self_training_step` (both
views, the flip rule, the optional matching term): the Q x K label space is
handed to it as Q * K pseudo-label columns (:meth:`TwoStageLabels.lookup`, or
``TwoStageLabels.to_pseudo_labels().lookup``), of which each image fills the K
of its pose cluster, so its column index is the TSC label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.heads.descriptor import crop_to_normalised
from pipeline.heads.model import HeadsOutput, ULDHeads
from pipeline.heads.pose_losses import elbo_loss, latent_contrastive_loss
from pipeline.heads.pose_vae import PoseVAE, PoseVAEConfig
from pipeline.methods.duld import Batch, DULDConfig, self_training_step

Step = Literal["proxy", "latent", "full-vae"]
# The TSC rounds' loss on the VAE (a run's ``tsc_loss``): Eq. 3 on the encoder (D-ULD++), or the
# ELBO of the full VAE (the ablation's "+ TSC w/ full VAE"); the name -> the optimiser's step.
TSC_LOSSES: dict[str, Step] = {"eq3": "latent", "elbo": "full-vae"}


def check_tsc_loss(name: str | None) -> str:
    """``name`` if it is one of :data:`TSC_LOSSES` (None = ``eq3``, the paper's D-ULD++)."""
    name = "eq3" if name is None else str(name)
    if name not in TSC_LOSSES:
        raise ConfigError(f"unknown TSC loss {name!r}", where="--tsc-loss",
                          fix=f"use one of: {', '.join(TSC_LOSSES)} (eq3: D-ULD++; elbo: the ablation's TSC with the full VAE)")
    return name


@dataclass(frozen=True)
class DULDPPConfig:
    """Hyper-parameters of the two D-ULD++ steps (paper values where the paper gives them).

    ``duld``: the D-ULD settings the shared losses use (margin m = 0.8, heatmap
    sigma, matching weight, views). ``q``: pose clusters Q. ``proxy_lr`` /
    ``latent_lr``: Adam learning rates of steps 1 / 2 (paper 5e-5 / 5e-4).
    ``elbo_weight``: the ELBO is a log-likelihood summed over the R x R cells,
    the D-ULD losses are means over cells; 1e-3 (~1 / 32^2) puts it on the same
    per-cell scale for the shared aggregator and detector (the VAE's own
    balance of reconstruction and KL is not affected). ``beta``: KL weight
    inside the ELBO (1 = the ELBO). ``latent_weight`` / ``latent_margin``:
    weight and margin m of Eq. 3 (the paper's single margin, 0.8).
    """

    duld: DULDConfig = field(default_factory=DULDConfig)
    q: int = 10
    proxy_lr: float = 5e-5
    latent_lr: float = 5e-4
    elbo_weight: float = 1e-3
    beta: float = 1.0
    latent_weight: float = 1.0
    latent_margin: float = 0.8

    def __post_init__(self) -> None:
        if int(self.q) < 1:
            raise ConfigError(f"q must be >= 1, got {self.q}", where="DULDPPConfig.q")
        for name in ("proxy_lr", "latent_lr", "latent_margin"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}", where=f"DULDPPConfig.{name}")
        for name in ("elbo_weight", "beta", "latent_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}", where=f"DULDPPConfig.{name}")


class _CropRecorder(nn.Module):
    """The heads, remembering their output on one given feature dict (the crop's).

    ``self_training_step`` runs the heads on the crop and on its view; keeping
    the crop's output lets the VAE read that heatmap (with its graph) instead
    of running the aggregator a third time. The crop is recognised by the
    identity of its feature dict, not by call order.
    """

    def __init__(self, heads: ULDHeads, crop_features: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.heads = heads
        self.config = heads.config
        self._crop = crop_features
        self.crop_output: HeadsOutput | None = None

    def forward(self, features: Mapping[str, torch.Tensor]) -> HeadsOutput:
        out = self.heads(features)
        if features is self._crop:
            self.crop_output = out
        return out


def _duld_part(
    model: ULDHeads, batch: Batch, coords: torch.Tensor, present: torch.Tensor, duld: DULDConfig, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], HeadsOutput]:
    recorder = _CropRecorder(model, batch["features"])
    losses = self_training_step(recorder, batch, coords, present, duld, generator)
    if recorder.crop_output is None:  # pragma: no cover - guards a change of self_training_step
        raise ConfigError("the D-ULD step did not run the heads on the crop's features", where="pipeline.methods.duldpp")
    return losses, recorder.crop_output


def _check_labels(coords: torch.Tensor, present: torch.Tensor, pose: torch.Tensor, q: int) -> None:
    B, L = present.shape
    if coords.shape != (B, L, 2) or pose.shape != (B,):
        raise ConfigError(f"coords {tuple(coords.shape)}, present {tuple(present.shape)}, pose {tuple(pose.shape)} do not fit", where="pipeline.methods.duldpp")
    if L % q:
        raise ConfigError(f"{L} label columns are not Q * K for q={q}", where="pipeline.methods.duldpp", fix="pass TwoStageLabels.lookup's Q * K columns")
    if B and (int(pose.min()) < 0 or int(pose.max()) >= q):
        raise ConfigError(f"pose labels must lie in [0, {q})", where="pipeline.methods.duldpp", fix="use the q the labeller was fitted with")


def proxy_task_step(
    model: ULDHeads,
    vae: PoseVAE,
    batch: Batch,
    coords: torch.Tensor,
    present: torch.Tensor,
    pose: torch.Tensor,
    config: DULDPPConfig,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Step 1 losses: D-ULD's (TSC labels) + ``elbo_weight`` * ELBO of the VAE on the crop's heatmap.

    ``coords`` (B, Q*K, 2) crop px / ``present`` (B, Q*K) / ``pose`` (B,): the
    batch's TSC labels (:meth:`TwoStageLabels.lookup`); column ``u * K + c`` is
    TSC label ``r``, the class of the contrastive loss. The VAE's target is the
    map of the image's present labels (its K landmarks: only its own pose
    cluster's columns are filled). The VAE samples its code with ``generator``.
    """
    _check_labels(coords, present, pose, config.q)
    losses, crop = _duld_part(model, batch, coords, present, config.duld, generator)
    heat = torch.sigmoid(crop.logits)
    target = vae.target(crop_to_normalised(coords, model.config.crop_size), present)
    out = vae(heat, sample=True, generator=generator)
    elbo = elbo_loss(out.logits, target, out.mu, out.logvar, config.beta)
    loss = losses["loss"] + config.elbo_weight * elbo.loss
    return {**losses, "loss": loss, "elbo": elbo.loss, "reconstruction": elbo.reconstruction, "kl": elbo.kl}


def latent_step(
    model: ULDHeads,
    vae: PoseVAE,
    batch: Batch,
    coords: torch.Tensor,
    present: torch.Tensor,
    pose: torch.Tensor,
    config: DULDPPConfig,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Step 2 losses: detector MSE as in step 1 + ``latent_weight`` * Eq. 3 on the encoder's codes.

    No descriptor loss (the descriptor head is frozen and its contrastive term
    is not part of this step) and no matching term; the codes are the
    posterior means (deterministic: Eq. 3 compares codes, a sampled one would
    add the posterior's noise to every distance).
    """
    _check_labels(coords, present, pose, config.q)
    duld = replace(config.duld, match_weight=0.0)
    losses, crop = _duld_part(model, batch, coords, present, duld, generator)
    mu, _ = vae.encode(torch.sigmoid(crop.logits))
    l_lat = latent_contrastive_loss(mu, pose.long(), config.latent_margin)
    loss = duld.detector_weight * losses["detector"] + config.latent_weight * l_lat
    return {"loss": loss, "detector": losses["detector"], "latent": l_lat}


def full_vae_step(
    model: ULDHeads,
    vae: PoseVAE,
    batch: Batch,
    coords: torch.Tensor,
    present: torch.Tensor,
    pose: torch.Tensor,
    config: DULDPPConfig,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Step 2 with the full VAE: detector MSE as in :func:`latent_step` + ``elbo_weight`` * ELBO of the VAE.

    Everything but the VAE's loss is :func:`latent_step`'s (TSC labels, no descriptor or
    matching term, the descriptor head frozen, the step-2 learning rate); the VAE keeps its
    decoder and is trained, as in step 1 (:func:`proxy_task_step`), to reconstruct the
    Gaussian map of the image's K labels from a sampled code of the crop's heatmap, with the
    same ``elbo_weight`` and ``beta``. The pose labels ``pose`` are only checked: the ELBO
    does not read them (that is the difference to Eq. 3 the ablation measures).
    """
    _check_labels(coords, present, pose, config.q)
    duld = replace(config.duld, match_weight=0.0)
    losses, crop = _duld_part(model, batch, coords, present, duld, generator)
    target = vae.target(crop_to_normalised(coords, model.config.crop_size), present)
    out = vae(torch.sigmoid(crop.logits), sample=True, generator=generator)
    elbo = elbo_loss(out.logits, target, out.mu, out.logvar, config.beta)
    loss = duld.detector_weight * losses["detector"] + config.elbo_weight * elbo.loss
    return {"loss": loss, "detector": losses["detector"], "elbo": elbo.loss, "reconstruction": elbo.reconstruction, "kl": elbo.kl}


def tsc_step(tsc_loss: str) -> "StepFn":
    """The step function of a run's TSC rounds: :func:`latent_step` (``eq3``) or :func:`full_vae_step` (``elbo``)."""
    return latent_step if TSC_LOSSES[check_tsc_loss(tsc_loss)] == "latent" else full_vae_step


def duldpp_parameters(model: ULDHeads, vae: PoseVAE, step: Step) -> list[nn.Parameter]:
    """What each step trains: aggregator + detector, never the descriptor head; the VAE whole
    (step 1, and step 2 with the full VAE) or its encoder only (step 2 with Eq. 3)."""
    heads = [*model.aggregator.parameters(), *model.detector.parameters()]
    if step in ("proxy", "full-vae"):
        return heads + list(vae.parameters())
    if step == "latent":
        return heads + vae.encoder_parameters()
    raise ConfigError(f"unknown D-ULD++ step {step!r}", where="duldpp_parameters", fix="use 'proxy', 'latent' or 'full-vae'")


def make_duldpp_optimizer(model: ULDHeads, vae: PoseVAE, step: Step, config: DULDPPConfig) -> torch.optim.Optimizer:
    """Adam (betas 0.9, 0.999) over :func:`duldpp_parameters` at the step's learning rate
    (Sec 4: 5e-5 for step 1, 5e-4 for step 2 in either variant)."""
    lr = config.proxy_lr if step == "proxy" else config.latent_lr
    return torch.optim.Adam(duldpp_parameters(model, vae, step), lr=lr, betas=(0.9, 0.999))


@torch.no_grad()
def pose_codes(model: ULDHeads, vae: PoseVAE, batches: Iterable[Batch]) -> tuple[np.ndarray, np.ndarray]:
    """Pose codes of every image for TSC's stage 1: ``(rows (N,), codes (N, latent))``.

    The posterior mean of the detector's heatmap per image (Sec 3.3.1:
    "the latent codes obtained after training ... a k-Means clustering of the
    latent codes"); both modules are put in eval mode.
    """
    model.eval()
    vae.eval()
    rows, codes = [], []
    for batch in batches:
        heat = torch.sigmoid(model(batch["features"]).logits)
        rows.append(batch["index"].numpy())
        codes.append(vae.codes(heat).numpy())
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, vae.config.latent), np.float32)
    return np.concatenate(rows).astype(np.int64), np.concatenate(codes).astype(np.float32)


LabelLookup = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
StepFn = Callable[[ULDHeads, PoseVAE, Batch, torch.Tensor, torch.Tensor, torch.Tensor, DULDPPConfig, torch.Generator], dict[str, torch.Tensor]]


def train_duldpp_steps(
    step_fn: StepFn,
    model: ULDHeads,
    vae: PoseVAE,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    lookup: LabelLookup,
    steps: int,
    config: DULDPPConfig,
    generator: torch.Generator,
    progress: bool = True,
    desc: str = "D-ULD++",
) -> list[dict[str, float]]:
    """``steps`` optimisation steps of one D-ULD++ step (:func:`proxy_task_step` or :func:`latent_step`).

    ``lookup(batch rows) -> (coords (B, Q*K, 2), present, pose (B,))``: the stage's labels
    (:meth:`TwoStageLabels.lookup`, or K-means labels as Q = 1 before any pose code exists).
    One loss record per step, as :func:`pipeline.methods.duld.train_self_round`.
    """
    from pipeline.methods.duld import _steps

    model.train()
    vae.train()
    log: list[dict[str, float]] = []
    for step, batch in _steps(batches, steps, desc, progress):
        coords, present, pose = lookup(batch["index"])
        losses = step_fn(model, vae, batch, coords, present, pose, config, generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        log.append({"step": step, **{k: float(v.detach()) for k, v in losses.items()}})
    return log


def pose_vae_config(out_size: int, k: int, latent: int = 64) -> PoseVAEConfig:
    """The VAE for a detector of ``out_size`` cells: up to three stride-2 stages (16, 32, 64 channels),
    as many as halve ``out_size`` evenly (a 8-cell map gets three, a 12-cell map two)."""
    n = 0
    while n < 3 and out_size % (2 ** (n + 1)) == 0:
        n += 1
    if n == 0:
        raise ConfigError(f"the pose VAE needs an even heatmap size, got {out_size}", where="--resolution", fix="use an even --resolution")
    return PoseVAEConfig(size=int(out_size), k=int(k), latent=int(latent), widths=(16, 32, 64)[:n])


def build_pose_vae(config: PoseVAEConfig, seed: int) -> PoseVAE:
    """A pose VAE with a fixed initialisation seed (does not disturb the global RNG)."""
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        return PoseVAE(config)
