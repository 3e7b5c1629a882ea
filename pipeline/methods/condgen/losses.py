"""Loss terms of the two trainers (Jakab et al., seed 003; C3, seed 004).

* :func:`reconstruction_loss`: perceptual (frozen diffusion UNet features,
  :class:`~pipeline.methods.condgen.perceptual.DiffusionPerceptualLoss`) plus
  pixel L1, both over the valid (non-padded) target pixels.
* :func:`cross_image_flow_loss`: C3's equivariance between the landmarks of two
  *different* images through a dense cross-image flow.

About C3's flow term: seed 004 holds only the abstract of Xu et al. 2020 ("a
cross-image flow module is further introduced to impose the equivariance
between estimated landmarks across images"), not its equations. This module's
reading: the flow from image A to image B is the soft correspondence given by
the correlation of the keypoint encoder's feature maps,
``C(q -> p) = softmax_p(<f_A(q), f_B(p)> / tau)`` over L2-normalised features;
each landmark of A is carried through it, ``x~_B^k = sum_q P_A^k(q) sum_p C(q -> p) p``
with ``P_A^k`` the k-th spatial-softmax map of A, and must land on B's own
landmark ``x_B^k`` (both directions). The paper's module may be parametrised
differently.

How "must land on" is scored (:func:`landmark_matching_loss`). The first
version used the squared error ``mean_k |x~_B^k - x_B^k|^2``. Its minimum (0)
holds every state in which all landmarks sit at one place: a uniform map's
expected coordinate is the crop centre, and so is its transport through any
flow whose target positions average to the centre; with uninformative features
(a flat flow) every map is carried to the centre, so the error is zero for any
maps whose landmark is the centre. Training found that minimum: the maps went
flat, all landmarks on the centre (bench/results/condgen.md). A stop-gradient
on one side does not remove it: the collapsed state still has zero error and
zero gradient, it only changes which side moves toward it.

The term is now a K-way matching: the carried landmark ``k`` must be nearer to
B's landmark ``k`` than to B's other landmarks,

    L = mean_k -log softmax_j( -|x~_B^k - x_B^j|^2 / (2 s^2) )[k],

a cross-entropy over the K landmarks of B with a Gaussian kernel of width
``s`` (``flow_scale``, normalised units). Why no collapsed state is a minimum:
when all carried points coincide at one point ``m`` (flat flow, or maps that
are all alike), with ``d_j = |m - x_B^j|^2``, ``L = d_k / (2 s^2) + log sum_j exp(-d_j / (2 s^2))`` averaged over k, which by
Jensen's inequality is at least ``log K``, with equality only when B's
landmarks are all equally far from that point (e.g. all at it too); in
particular flat maps in both images give exactly ``log K``.
Peaked maps that move with the image and lie more than a few ``s`` apart give
a value near 0. So the flat state is the worst matching, not the best; at the
exactly symmetric point the gradient vanishes by symmetry (a stationary
point, not a minimum: moving the landmarks apart consistently lowers the term,
see tests/test_condgen.py::test_flow_term_gradient_moves_near_flat_maps_apart),
and the network's random initialisation never sits exactly on it. The term is scale-aware only
through ``s``: shrinking every landmark toward one point raises it once their
spacing falls below ``s``. What it cannot do: with an uninformative flow
(constant features) every map is carried to the same point, and the minimum,
``log K``, is met by any landmarks equidistant from it, flat maps among them;
the term then no longer rewards the collapse but cannot reward spread either
until the features tell places apart (they are the keypoint encoder's, trained
by the reconstruction terms as well). With K = 1 there is nothing to match against and the
term is 0 (C3 refuses K = 1 with a flow term).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.methods.condgen.geometry import cell_centres


def masked_l1(x_hat: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute pixel difference over the pixels where ``mask`` (B, 1, S, S) is set."""
    diff = (x_hat - x).abs()
    if mask is None:
        return diff.mean()
    return (diff * mask).sum() / (mask.sum().clamp_min(1e-6) * x.shape[1])


def reconstruction_loss(
    x_hat: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, perceptual, perceptual_weight: float, pixel_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """``perceptual_weight * L_perc + pixel_weight * L1``; returns the total and its parts (floats, for the log)."""
    parts: dict[str, float] = {}
    total = x_hat.new_zeros(())
    if perceptual is not None and perceptual_weight > 0:
        lp = perceptual(x_hat, x, mask)
        total = total + perceptual_weight * lp
        parts["perceptual"] = float(lp.detach())
    if pixel_weight > 0:
        l1 = masked_l1(x_hat, x, mask)
        total = total + pixel_weight * l1
        parts["l1"] = float(l1.detach())
    return total, parts


def soft_flow(feat_a: torch.Tensor, feat_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, C, h, w) x 2 -> (B, h*w, 2): for every cell of A, its expected position in B (normalised units)."""
    b, c, h, w = feat_a.shape
    fa = F.normalize(feat_a.reshape(b, c, h * w), dim=1)
    fb = F.normalize(feat_b.reshape(b, c, h * w), dim=1)
    corr = torch.einsum("bcq,bcp->bqp", fa, fb) / temperature
    ys, xs = cell_centres(h, w, feat_a.device)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(h * w, 2)  # (x, y) per cell, row-major
    return F.softmax(corr, dim=-1) @ grid


def transport_landmarks(prob_a: torch.Tensor, flow_ab: torch.Tensor) -> torch.Tensor:
    """A's spatial-softmax maps (B, K, h, w) carried through ``flow_ab`` (B, h*w, 2) -> (B, K, 2) in B."""
    b, k, h, w = prob_a.shape
    return prob_a.reshape(b, k, h * w) @ flow_ab


def landmark_matching_loss(moved: torch.Tensor, pts: torch.Tensor, scale: float) -> torch.Tensor:
    """K-way matching of carried landmarks ``moved`` (B, K, 2) to the image's own ``pts`` (B, K, 2).

    ``mean_{b,k} -log softmax_j(-|moved_bk - pts_bj|^2 / (2 scale^2))[k]``: see
    the module docstring for why a collapse of the landmarks scores ``log K``
    (the worst matching) here rather than 0.
    """
    b, k, _ = moved.shape
    d2 = ((moved[:, :, None, :] - pts[:, None, :, :]) ** 2).sum(-1)  # (B, K carried, K own)
    logits = -d2 / (2.0 * scale * scale)
    target = torch.arange(k, device=moved.device).repeat(b)
    return F.cross_entropy(logits.reshape(b * k, k), target)


def cross_image_flow_loss(
    prob_a: torch.Tensor, pts_a: torch.Tensor, feat_a: torch.Tensor,
    prob_b: torch.Tensor, pts_b: torch.Tensor, feat_b: torch.Tensor, temperature: float, scale: float,
) -> torch.Tensor:
    """C3's cross-image equivariance, both directions: A's landmarks carried to B matched to B's, and back.

    ``temperature``: the flow's correlation softmax; ``scale``: the matching
    kernel width (normalised units). See the module docstring for the formulation.
    """
    ab = transport_landmarks(prob_a, soft_flow(feat_a, feat_b, temperature))
    ba = transport_landmarks(prob_b, soft_flow(feat_b, feat_a, temperature))
    return 0.5 * (landmark_matching_loss(ab, pts_b, scale) + landmark_matching_loss(ba, pts_a, scale))
