"""Losses of D-ULD++'s pose VAE (paper 001, Sec 3.3): the ELBO (step 1) and Eq. 3 (step 2)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError


class ELBOTerms(NamedTuple):
    loss: torch.Tensor  # reconstruction + beta * kl (the negative ELBO, up to a constant)
    reconstruction: torch.Tensor  # per image, 0 for a perfect reconstruction
    kl: torch.Tensor  # KL(q(z | H) || N(0, I)) per image


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-7, 1 - 1e-7)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def elbo_loss(recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float = 1.0) -> ELBOTerms:
    """Negative ELBO of the pose VAE (paper 001, Sec 3.3.1: "the ELBO loss").

    ``recon`` (B, 1, R, R) decoder *logits*; ``target`` (B, 1, R, R) the
    Gaussian landmark map ``G`` in [0, 1] (:func:`pipeline.heads.pose_vae.gaussian_pose_map`);
    ``mu``/``logvar`` (B, L) the posterior; ``beta`` weighs the KL term
    (1 = the ELBO itself; beta-VAE otherwise).

    Reconstruction term (the paper does not say which; our choice): a Bernoulli
    log-likelihood per cell with continuous targets, i.e. binary cross-entropy
    on the logits, **summed over the cells** of a map and averaged over the batch,
    minus the targets' own entropy so that a perfect reconstruction scores 0
    (the subtracted constant changes no gradient). Why:

    - the target lies in [0, 1] with peaks of exactly 1 (the Bernoulli /
      cross-entropy reading of Kingma & Welling's image VAEs fits it; a Gaussian
      likelihood would allow values outside the range);
    - the map is mostly background: a per-cell MSE through a sigmoid is almost
      satisfied by an all-zero map, and its gradient at a missed peak carries an
      extra sigmoid-derivative factor that vanishes once the output saturates,
      while the cross-entropy gradient there is simply ``sigmoid(logit) - 1``;
    - a sum over cells (not a mean) keeps the reconstruction on the scale of a
      log-likelihood of the whole map, balanced against the KL summed over the
      64 latent dimensions; with a per-cell mean the KL is ~R^2 times heavier and
      the posterior collapses to the prior, leaving codes without pose.

    KL term: ``0.5 * sum_l (mu^2 + exp(logvar) - 1 - logvar)``, closed form for
    a diagonal Gaussian against N(0, I), averaged over the batch.
    """
    if recon.shape != target.shape:
        raise ConfigError(f"recon {tuple(recon.shape)} and target {tuple(target.shape)} differ", where="elbo_loss")
    if mu.shape != logvar.shape or mu.shape[0] != recon.shape[0]:
        raise ConfigError(f"mu {tuple(mu.shape)} / logvar {tuple(logvar.shape)} do not fit a batch of {recon.shape[0]}", where="elbo_loss")
    B = recon.shape[0]
    target = target.to(recon.dtype)
    bce = F.binary_cross_entropy_with_logits(recon, target, reduction="none")
    rec = (bce - _binary_entropy(target)).reshape(B, -1).sum(1).mean()
    kl = (0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)).sum(1).mean()
    return ELBOTerms(rec + float(beta) * kl, rec, kl)


def latent_contrastive_loss(codes: torch.Tensor, labels: torch.Tensor, margin: float = 0.8) -> torch.Tensor:
    """Eq. 3 of paper 001 (Sec 3.3.2) on a batch of pose codes.

    ``codes`` (N, L) encoder outputs ``phi``; ``labels`` (N,) stage-1 pose
    clusters ``u`` (negative = ignore). Eq. 3 for an anchor ``j``, one code
    ``j'`` with the same label and one ``j''`` with another::

        L_d = 1[u_j = u_j'] ||phi_j - phi_j'|| + 1[u_j != u_j''] max(0, m - ||phi_j - phi_j''||)

    Both terms are on the *unsquared* Euclidean distance, as printed (unlike the
    descriptor loss of D-ULD, :func:`pipeline.heads.losses.contrastive_loss`,
    which squares both). The paper picks "any" ``j'`` and ``j''``; this is the
    expectation of Eq. 3 over that choice, with every code of the batch as
    anchor: per anchor, the pull term averaged over its same-label partners plus
    the push term averaged over its other-label partners, then the mean over
    anchors. An anchor without a same-label partner (or without an other-label
    one) has no such ``j'`` (``j''``) and contributes only the other term.
    Averaging per anchor, not over all pairs, keeps a large pose cluster from
    outweighing a small one. ``margin``: the paper's single contrastive margin
    m = 0.8 (Sec 4, "Training details"). Returns 0 (with a gradient path) for
    fewer than two labelled codes.
    """
    if codes.dim() != 2 or labels.shape != codes.shape[:1]:
        raise ConfigError(f"codes must be (N, L) and labels (N,), got {tuple(codes.shape)} and {tuple(labels.shape)}", where="latent_contrastive_loss")
    if not margin > 0:
        raise ConfigError(f"margin must be > 0, got {margin}", where="latent_contrastive_loss")
    keep = labels >= 0
    codes, labels = codes[keep], labels[keep]
    n = codes.shape[0]
    if n < 2:
        return codes.sum() * 0.0
    sq = (codes[:, None, :] - codes[None, :, :]).pow(2).sum(-1)
    # eps keeps the gradient of the norm finite where two codes coincide (and on the diagonal)
    dist = torch.sqrt(sq + 1e-12)
    eye = torch.eye(n, dtype=torch.bool, device=codes.device)
    same = (labels[:, None] == labels[None, :]) & ~eye
    diff = labels[:, None] != labels[None, :]
    n_same = same.sum(1)
    n_diff = diff.sum(1)
    pull = (dist * same).sum(1) / n_same.clamp_min(1)
    push = (F.relu(margin - dist) * diff).sum(1) / n_diff.clamp_min(1)
    return (pull + push).mean()
