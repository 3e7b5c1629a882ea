"""Losses of D-ULD (paper 001, Sec 3.2; bootstrapping follows SiLK).

Bootstrapping (two views of one crop, a known dense correspondence):

* :func:`matching_nll` -- descriptors: for every cell of one view with a valid
  correspondence, a softmax over *all* cells of the other view (similarity /
  temperature), negative log-likelihood of the true cell; both directions.
* :func:`silk_detector_targets` + :func:`bce_detector_loss` -- detector: a cell
  is a positive when its descriptor's *mutual* nearest neighbour in the other
  view lies within ``tol`` cells of the true corresponding cell (SiLK's
  "keypoints are where matching succeeds"), negative otherwise; cells without a
  correspondence (warped out of view) are ignored. Targets carry no gradient.

Self-training (pseudo-labels from clustering):

* :func:`heatmap_targets` + :func:`mse_heatmap_loss` -- detector MSE to a map of
  Gaussians at the kept pseudo-label keypoints.
* :func:`contrastive_loss` -- descriptors of the same cluster pulled together,
  of different clusters pushed beyond the margin ``m = 0.8`` (paper 001, Sec 4
  "Training details"), in the form of Mallis et al. [32] that Sec 3.2 cites:
  squared distance for positives, squared hinge ``max(0, m - d)^2`` for
  negatives, one average over all pairs (see the function).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _flat(desc: torch.Tensor) -> torch.Tensor:
    B, D = desc.shape[:2]
    return desc.reshape(B, D, -1).transpose(1, 2)  # (B, N, D)


def matching_nll(
    desc_src: torch.Tensor,
    desc_dst: torch.Tensor,
    corr: torch.Tensor,
    temperature: float = 0.1,
    corr_inv: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric matching NLL (InfoNCE over all locations of the other view).

    ``desc_src``/``desc_dst``: (B, D, R, R) unit-norm descriptors;
    ``corr`` (B, R*R): for each cell of ``dst`` the index of its cell in
    ``src``, -1 for none. ``corr_inv`` (B, R*R): the same from ``src`` to
    ``dst``; by default derived from ``corr`` (when several dst cells map to
    one src cell, the last one). Each direction averages the NLL over the
    cells that have a partner. Returns a scalar (0 if no correspondence exists).

    Written as two dense ``cross_entropy`` calls with ``ignore_index=-1`` on the
    (B, R^2, R^2) similarity, not by gathering rows/columns: gathering copies
    every row twice and scatters the gradient back, which was a third of a
    training step at R = 32.
    """
    s, d = _flat(desc_src), _flat(desc_dst)
    valid = corr >= 0
    if not bool(valid.any()):
        return (s.sum() + d.sum()) * 0.0
    if corr_inv is None:
        corr_inv = torch.full(corr.shape, -1, dtype=torch.long, device=corr.device)
        b_idx, q_idx = valid.nonzero(as_tuple=True)
        corr_inv[b_idx, corr[b_idx, q_idx]] = q_idx
    d_t = d / temperature
    # rows: each dst cell classifies its src cell; cols: each src cell classifies its dst cell.
    # Two products so that both softmaxes run over a contiguous last dimension.
    sim_ds = d_t @ s.transpose(1, 2)  # (B, Ndst, Nsrc)
    sim_sd = s @ d_t.transpose(1, 2)  # (B, Nsrc, Ndst)
    loss_rows = F.cross_entropy(sim_ds.reshape(-1, sim_ds.shape[-1]), corr.reshape(-1), ignore_index=-1)
    if not bool((corr_inv >= 0).any()):
        return loss_rows
    loss_cols = F.cross_entropy(sim_sd.reshape(-1, sim_sd.shape[-1]), corr_inv.reshape(-1), ignore_index=-1)
    return 0.5 * (loss_rows + loss_cols)


@torch.no_grad()
def silk_detector_targets(
    desc_src: torch.Tensor, desc_dst: torch.Tensor, corr: torch.Tensor, tol: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detector targets from matching success (mutual nearest neighbours).

    Returns ``(target_src, mask_src, target_dst, mask_dst)``, each (B, R, R)
    float / bool. A dst cell ``q`` with correspondence ``p`` is positive when
    ``nn_src(q)`` is within ``tol`` cells (Chebyshev) of ``p`` and
    ``nn_dst(nn_src(q)) == q``; ``p`` then is a positive in src. Cells
    without a correspondence are masked out.
    """
    B, _, R, W = desc_dst.shape
    s, d = _flat(desc_src), _flat(desc_dst)
    sim = d @ s.transpose(1, 2)
    nn_src = sim.argmax(dim=2)  # (B, Ndst)
    nn_dst = sim.argmax(dim=1)  # (B, Nsrc)
    valid = corr >= 0
    mutual = torch.gather(nn_dst, 1, nn_src) == torch.arange(R * W).expand(B, -1)
    p = corr.clamp_min(0)
    close = ((nn_src % W - p % W).abs() <= tol) & ((nn_src // W - p // W).abs() <= tol)
    pos_dst = valid & mutual & close
    target_src = torch.zeros(B, R * W)
    mask_src = torch.zeros(B, R * W, dtype=torch.bool)
    b_idx, q_idx = valid.nonzero(as_tuple=True)
    mask_src[b_idx, corr[b_idx, q_idx]] = True
    b_pos, q_pos = pos_dst.nonzero(as_tuple=True)
    target_src[b_pos, corr[b_pos, q_pos]] = 1.0
    return (
        target_src.reshape(B, R, W),
        mask_src.reshape(B, R, W),
        pos_dst.float().reshape(B, R, W),
        valid.reshape(B, R, W),
    )


def bce_detector_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy on detector logits (B, 1, R, R) or (B, R, R), averaged over ``mask``."""
    if logits.dim() == 4:
        logits = logits[:, 0]
    loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    if mask is None:
        return loss.mean()
    m = mask.to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp_min(1.0)


def heatmap_targets(points: torch.Tensor, valid: torch.Tensor, size: int, sigma: float = 1.0) -> torch.Tensor:
    """(B, 1, R, R) max over Gaussians (peak 1) at normalised ``points`` (B, T, 2).

    ``sigma`` is in map cells. Points with ``valid`` False contribute nothing.
    """
    cells = ((points + 1.0) * size - 1.0) / 2.0  # (B, T, 2) fractional cells
    ar = torch.arange(size, dtype=points.dtype)
    dx = (ar[None, None, :] - cells[..., 0:1]) ** 2  # (B, T, R)
    dy = (ar[None, None, :] - cells[..., 1:2]) ** 2
    g = torch.exp(-(dy[..., :, None] + dx[..., None, :]) / (2 * sigma**2))  # (B, T, R, R)
    g = g * valid[..., None, None].to(g.dtype)
    if g.shape[1] == 0:
        return torch.zeros(points.shape[0], 1, size, size, dtype=points.dtype)
    return g.amax(dim=1, keepdim=True)


def mse_heatmap_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between ``sigmoid(logits)`` and a target heatmap, averaged over ``mask``."""
    err = (torch.sigmoid(logits) - target) ** 2
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype).reshape(err.shape)
    return (err * m).sum() / m.sum().clamp_min(1.0)


def contrastive_loss(desc: torch.Tensor, labels: torch.Tensor, margin: float = 0.8) -> torch.Tensor:
    """Pull same-label descriptors together, push other labels beyond ``margin``.

    ``desc`` (N, D), ``labels`` (N,) ints (negative labels are ignored). Over
    the pairs ``i < j`` with Euclidean distance ``d_ij``::

        L = ( sum_{same} d_ij^2 + sum_{diff} max(0, m - d_ij)^2 ) / (n_same + n_diff)

    This is the descriptor loss of Mallis et al., "From Keypoints to Object
    Landmarks via Self-Training Correspondence" (TPAMI 2023; ref. [32] of
    paper 001, whose Sec 3.2 uses it for D-ULD's descriptor head, with
    ``m = 0.8`` as in their code): the contrastive loss of Hadsell et al.
    (2006) -- squared for positives, *squared hinge on the unsquared
    distance* for negatives, and the positive and negative terms summed and
    divided by the total number of pairs (not two separate means, which would
    weight the rare positive pairs as much as all negatives together). The
    latent-code loss of D-ULD++ (Eq. 3) is a different, unsquared form.

    Pairs: every pair of the batch's labelled descriptors (both views, all
    images). Mallis et al. draw positives across an image pair and negatives
    within each image (plus random far locations); taking all pairs is the
    dense version of the same positives/negatives. Returns 0 (with a
    gradient path) when there is no pair.
    """
    keep = labels >= 0
    desc, labels = desc[keep], labels[keep]
    n = desc.shape[0]
    if n < 2:
        return desc.sum() * 0.0
    sq = (desc[:, None, :] - desc[None, :, :]).pow(2).sum(-1)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    same = (labels[:, None] == labels[None, :]) & upper
    diff = (labels[:, None] != labels[None, :]) & upper
    # sqrt only where the hinge needs d; eps keeps its gradient finite at d = 0 (coincident descriptors)
    d_neg = torch.sqrt(sq[diff] + 1e-9)
    total = sq[same].sum() + F.relu(margin - d_neg).pow(2).sum()
    return total / max(int(same.sum()) + int(diff.sum()), 1)
