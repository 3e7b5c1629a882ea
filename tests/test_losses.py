"""Losses of D-ULD on tiny cases that can be checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.heads.augment import dense_correspondence, identity_affine, random_affine, AugmentConfig
from pipeline.heads.losses import (
    bce_detector_loss,
    contrastive_loss,
    heatmap_targets,
    matching_nll,
    mse_heatmap_loss,
    silk_detector_targets,
)

torch.set_num_threads(1)


def test_contrastive_zero_when_clusters_separated_beyond_margin():
    # two collapsed clusters 1.0 apart (> margin 0.8): nothing to pull, nothing to push
    desc = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert contrastive_loss(desc, labels, margin=0.8).item() == pytest.approx(0.0, abs=1e-5)


def test_contrastive_positive_when_clusters_too_close_or_spread():
    labels = torch.tensor([0, 0, 1, 1])
    close = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.5, 0.0], [0.5, 0.0]])
    # only the squared hinge is active: 4 of the 6 pairs are cross pairs 0.5 apart -> 4 * 0.3^2 / 6
    assert contrastive_loss(close, labels, margin=0.8).item() == pytest.approx(4 * 0.3**2 / 6, abs=1e-6)
    spread = torch.tensor([[0.0, 0.0], [0.0, 0.6], [3.0, 0.0], [3.0, 0.6]])
    # only the pull is active: both same-label pairs are 0.6 apart -> 2 * 0.6^2 / 6
    assert contrastive_loss(spread, labels, margin=0.8).item() == pytest.approx(2 * 0.36 / 6, abs=1e-6)


def test_contrastive_is_mallis_form_squared_and_averaged_over_all_pairs():
    # Mallis et al.: (sum_pos d^2 + sum_neg max(0, m - d)^2) / (n_pos + n_neg)
    a, b, c = [0.0, 0.0], [0.5, 0.0], [0.0, 0.4]
    loss = contrastive_loss(torch.tensor([a, b, c]), torch.tensor([0, 0, 1]), margin=0.8).item()
    d_bc = math.sqrt(0.5**2 + 0.4**2)
    expected = (0.5**2 + (0.8 - 0.4) ** 2 + (0.8 - d_bc) ** 2) / 3
    assert loss == pytest.approx(expected, abs=1e-6)
    # neither the unsquared form nor two separate means give this value
    assert abs(loss - (0.5 + ((0.8 - 0.4) + (0.8 - d_bc)) / 2)) > 0.1
    assert abs(loss - (0.25 + ((0.8 - 0.4) ** 2 + (0.8 - d_bc) ** 2) / 2)) > 0.05


def test_contrastive_ignores_negative_labels_and_has_gradients():
    desc = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]], requires_grad=True)
    loss = contrastive_loss(desc, torch.tensor([0, 1, -1]), margin=0.8)
    assert loss.item() == pytest.approx(0.7**2, abs=1e-5)
    loss.backward()
    assert desc.grad[2].abs().sum() == 0 and desc.grad[0].abs().sum() > 0
    # coincident descriptors of different labels: a finite gradient, no NaN from sqrt(0)
    same = torch.zeros(2, 3, requires_grad=True)
    contrastive_loss(same, torch.tensor([0, 1])).backward()
    assert torch.isfinite(same.grad).all()


def _one_hot_desc(R: int) -> torch.Tensor:
    # every cell gets its own orthogonal descriptor: perfect matching is possible
    n = R * R
    return torch.eye(n).reshape(n, R, R)[None]


def test_info_nce_lower_for_correct_correspondences():
    R = 4
    d = _one_hot_desc(R)
    corr = torch.arange(R * R)[None]
    good = matching_nll(d, d, corr, temperature=0.1)
    wrong = matching_nll(d, d, torch.roll(corr, 1, dims=1), temperature=0.1)
    assert good.item() < 1e-3 < wrong.item()
    # exact value: logits are 10 at the true cell and 0 elsewhere
    n = R * R
    expected = -math.log(math.exp(10) / (math.exp(10) + n - 1))
    assert good.item() == pytest.approx(expected, rel=1e-4)


def test_info_nce_ignores_cells_without_correspondence():
    R = 4
    d = _one_hot_desc(R)
    corr = torch.full((1, R * R), -1)
    assert matching_nll(d, d, corr).item() == 0.0
    corr[0, 3] = 3
    assert matching_nll(d, d, corr).item() > 0.0


def test_silk_targets_positive_where_mutual_match_is_right():
    R = 4
    d = _one_hot_desc(R)
    corr = torch.arange(R * R)[None].clone()
    corr[0, 5] = -1  # cell 5 has no correspondence
    # make dst cell 10 look like src cell 0: its match is far from the truth (cell 10)
    dst = d.clone()
    dst[0, :, 2, 2] = 0
    dst[0, 0, 2, 2] = 1
    t_src, m_src, t_dst, m_dst = silk_detector_targets(d, dst, corr, tol=0)
    assert not m_dst[0, 1, 1] and m_dst.sum() == R * R - 1
    assert t_dst[0, 2, 2] == 0 and t_dst[0, 0, 1] == 1
    assert t_src[0, 2, 2] == 0  # the true partner of a failed match is a negative
    assert m_src[0, 1, 1] == 0  # nobody maps onto src cell 5


def test_bce_and_mse_targets():
    logits = torch.tensor([[[[0.0, 100.0], [-100.0, 0.0]]]])
    target = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    mask = torch.tensor([[[False, True], [True, False]]])
    # the two masked-in cells are predicted perfectly
    assert bce_detector_loss(logits, target, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert bce_detector_loss(logits, target).item() == pytest.approx(2 * math.log(2) / 4, rel=1e-5)
    # MSE on sigmoid: cells at logit 0 give 0.5 -> errors 0.25 each on the two unmasked cells
    assert mse_heatmap_loss(logits, target[:, None]).item() == pytest.approx(0.5 / 4, rel=1e-5)


def test_heatmap_targets_peak_at_points():
    R = 8
    # cell (col 2, row 5) centre in normalised coords
    p = torch.tensor([[[(2 * 2 + 1) / R - 1, (2 * 5 + 1) / R - 1], [0.0, 0.0]]])
    h = heatmap_targets(p, torch.tensor([[True, False]]), R, sigma=1.0)
    assert h.shape == (1, 1, R, R)
    assert h[0, 0, 5, 2].item() == pytest.approx(1.0)
    assert h[0, 0].argmax().item() == 5 * R + 2
    assert h[0, 0, 5, 3].item() == pytest.approx(math.exp(-0.5), rel=1e-5)
    assert h[0, 0, 0, 7].item() < 1e-6  # far away and the invalid point adds nothing


def test_dense_correspondence_identity_and_warp():
    R = 6
    corr = dense_correspondence(identity_affine(1), R)
    assert torch.equal(corr[0], torch.arange(R * R))
    aff = random_affine(3, AugmentConfig(), torch.Generator().manual_seed(0))
    corr = dense_correspondence(aff, R)
    assert corr.shape == (3, R * R) and (corr >= -1).all() and (corr < R * R).all()
