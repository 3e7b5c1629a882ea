"""D-ULD++ building blocks (paper 001, Sec 3.3): pose VAE, ELBO, Eq. 3, two-stage clustering, identities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.heads.pose_losses import elbo_loss, latent_contrastive_loss
from pipeline.heads.pose_vae import PoseVAE, PoseVAEConfig, gaussian_pose_map
from pipeline.heads.model import ULDHeads, ULDHeadsConfig
from pipeline.labelling.base import KeypointSet
from pipeline.labelling.two_stage import TwoStageLabeller, TwoStageLabels, match_identities
from pipeline.methods.duld import DULDConfig
from pipeline.methods.duldpp import (
    DULDPPConfig,
    latent_step,
    make_duldpp_optimizer,
    pose_codes,
    proxy_task_step,
)

torch.set_num_threads(1)


# ------------------------------------------------------------------ pose VAE


def test_gaussian_pose_map_peaks_at_the_landmarks_and_ignores_absent_ones():
    R = 16
    # cell centres 3 and 12 (normalised n = (2 * (j + 0.5)) / R - 1)
    cell = lambda j: (2 * (j + 0.5)) / R - 1
    pts = torch.tensor([[[cell(3), cell(5)], [cell(12), cell(10)], [float("nan"), float("nan")]]])
    present = torch.tensor([[True, True, False]])
    g = gaussian_pose_map(pts, present, R, sigma=1.0)
    assert g.shape == (1, 1, R, R)
    assert g[0, 0, 5, 3].item() == pytest.approx(1.0)
    assert g[0, 0, 10, 12].item() == pytest.approx(1.0)
    assert g[0, 0, 5, 4].item() == pytest.approx(math.exp(-0.5), rel=1e-5)  # one cell away, sigma 1
    assert torch.isfinite(g).all() and g.max() <= 1.0
    # only two blobs: far from both landmarks the map is ~0
    assert g[0, 0, 15, 0].item() < 1e-6
    with pytest.raises(ConfigError):
        gaussian_pose_map(pts[:, :, :1], present, R)


def test_pose_vae_shapes_and_deterministic_codes_in_eval():
    cfg = PoseVAEConfig(size=16, k=4, latent=64, widths=(8, 16))
    torch.manual_seed(0)
    vae = PoseVAE(cfg)
    H = torch.rand(3, 1, 16, 16)
    out = vae(H)
    assert out.logits.shape == (3, 1, 16, 16)
    assert out.mu.shape == out.logvar.shape == out.z.shape == (3, 64)
    assert not torch.equal(out.z, out.mu)  # training mode samples
    vae.eval()
    a, b = vae(H), vae(H)
    assert torch.equal(a.z, a.mu) and torch.equal(a.logits, b.logits)
    assert torch.equal(vae.codes(H), a.mu)
    with pytest.raises(ConfigError):
        vae(torch.rand(3, 1, 8, 8))
    with pytest.raises(ConfigError):
        PoseVAEConfig(size=20, k=4, widths=(8, 16, 32))  # 20 is not a multiple of 8


def test_elbo_kl_term_is_the_closed_form():
    mu = torch.ones(2, 64)
    logvar = torch.zeros(2, 64)
    target = torch.zeros(2, 1, 4, 4)
    recon = torch.full((2, 1, 4, 4), -30.0)  # sigmoid ~ 0: perfect reconstruction of an empty map
    terms = elbo_loss(recon, target, mu, logvar, beta=2.0)
    assert terms.kl.item() == pytest.approx(0.5 * 64)  # 0.5 * (1 + 1 - 1 - 0) per dimension
    assert terms.reconstruction.item() == pytest.approx(0.0, abs=1e-4)
    assert terms.loss.item() == pytest.approx(2.0 * 32, abs=1e-3)


def _toy_heatmaps(n: int, R: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy 'detector heatmaps' of K landmarks in a few shifted configurations, and clean targets."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([[-0.5, -0.4], [0.5, -0.4], [0.0, 0.1], [0.0, 0.5]])[:K]
    shift = (torch.rand(n, 1, 2, generator=g) - 0.5) * 0.6
    pts = base[None] + shift
    present = torch.ones(n, K, dtype=torch.bool)
    target = gaussian_pose_map(pts, present, R, 1.0)
    noisy = gaussian_pose_map(pts + 0.05 * torch.randn(pts.shape, generator=g), present, R, 1.5)
    noisy = (noisy + 0.1 * torch.rand(noisy.shape, generator=g)).clamp(0, 1)
    return noisy, target


def test_elbo_falls_over_100_adam_steps_on_a_toy_set():
    R, K = 16, 4
    H, G = _toy_heatmaps(32, R, K, seed=0)
    torch.manual_seed(0)
    vae = PoseVAE(PoseVAEConfig(size=R, k=K, latent=64, widths=(8, 16)))
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(100):
        out = vae(H, generator=gen)
        terms = elbo_loss(out.logits, G, out.mu, out.logvar, beta=1.0)
        opt.zero_grad()
        terms.loss.backward()
        opt.step()
        losses.append(terms.loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.5 * first, (first, last)
    # the reconstruction really found the blobs: peaks of G are bright in sigmoid(logits)
    vae.eval()
    with torch.no_grad():
        rec = torch.sigmoid(vae(H).logits)
    assert rec[G > 0.9].mean() > 0.5 and rec[G < 0.01].mean() < 0.1


# ------------------------------------------------------------------ Eq. 3


def test_latent_contrastive_loss_hand_checked():
    # 1-D codes: a = 0, b = 0.3 (pose 0), c = 1.0 (pose 1); m = 0.8
    # anchor a: pull |a-b| = 0.3, push max(0, 0.8 - 1.0) = 0        -> 0.3
    # anchor b: pull 0.3,        push max(0, 0.8 - 0.7) = 0.1        -> 0.4
    # anchor c: no same-pose partner; push mean(0, 0.1) = 0.05      -> 0.05
    codes = torch.tensor([[0.0], [0.3], [1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    loss = latent_contrastive_loss(codes, labels, margin=0.8)
    assert loss.item() == pytest.approx((0.3 + 0.4 + 0.05) / 3, abs=1e-6)
    loss.backward()
    assert torch.isfinite(codes.grad).all()


def test_latent_contrastive_loss_is_unsquared_and_ignores_negative_labels():
    # two codes of one pose 2 apart: Eq. 3 pulls with ||.|| = 2 (a squared form would give 4)
    codes = torch.tensor([[0.0, 0.0], [2.0, 0.0], [9.0, 9.0]])
    assert latent_contrastive_loss(codes, torch.tensor([0, 0, -1])).item() == pytest.approx(2.0, abs=1e-6)
    # separated beyond the margin and collapsed within poses: nothing to do
    codes = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    assert latent_contrastive_loss(codes, torch.tensor([0, 0, 1]), margin=0.8).item() == pytest.approx(0.0, abs=1e-5)
    assert latent_contrastive_loss(codes[:1], torch.tensor([0])).item() == 0.0


# ------------------------------------------------------------------ identities


def test_match_identities_recovers_permuted_centroids():
    rng = np.random.default_rng(0)
    K, D, Q = 6, 8, 4
    G = rng.normal(size=(K, D)) * 3
    perms = [rng.permutation(K) for _ in range(Q)]
    P = np.stack([G[p] + 0.2 * rng.normal(size=(K, D)) for p in perms])
    table = match_identities(P, G)
    assert table.shape == (Q, K)
    for u in range(Q):
        np.testing.assert_array_equal(table[u], perms[u])


def test_match_identities_is_one_to_one_where_nearest_would_collide():
    G = np.array([[0.0, 0.0], [3.0, 0.0]])
    P = np.array([[[1.0, 0.0], [1.4, 0.0]]])  # both nearest to global 0; Hungarian: costs 1 + 2.56 < 4 + 1.96
    np.testing.assert_array_equal(match_identities(P, G), [[0, 1]])
    with pytest.raises(ConfigError):
        match_identities(P[:, :1], G)


# ------------------------------------------------------------------ two-stage clustering


def _tsc_case(Q=3, K=4, per_pose=(12, 12, 12), seed=0, drop=0.1):
    """Images in Q well-separated pose-code groups; per image one keypoint per part (some dropped)
    plus a worse duplicate of part 0; part descriptors = part base + pose offset + noise."""
    rng = np.random.default_rng(seed)
    L, D = 64, 16
    pose_centres = rng.normal(size=(Q, L)) * 5
    parts = rng.normal(size=(K, D)) * 2
    parts /= np.linalg.norm(parts, axis=1, keepdims=True) / 3.0  # parts ~3 from the origin, well apart
    offsets = rng.normal(size=(Q, D))
    offsets *= 0.9 / np.linalg.norm(offsets, axis=1, keepdims=True)  # pose shifts every part by 0.9
    true_pose, codes, rows, xy, desc, part_of, kept = [], [], [], [], [], [], []
    img = 0
    for u, n in enumerate(per_pose):
        for _ in range(n):
            true_pose.append(u)
            codes.append(pose_centres[u] + 0.3 * rng.normal(size=L))
            for c in range(K):
                if c > 0 and rng.random() < drop:
                    continue
                d = parts[c] + offsets[u] + 0.05 * rng.normal(size=D)
                rows.append(img); xy.append(rng.uniform(0, 64, 2)); desc.append(d); part_of.append(c); kept.append(True)
                if c == 0:  # a second, worse candidate for part 0: exemplar assignment must not keep it
                    rows.append(img); xy.append(rng.uniform(0, 64, 2)); desc.append(d + 0.4 * rng.normal(size=D))
                    part_of.append(c); kept.append(False)
            img += 1
    image_rows = np.arange(img) + 100  # store rows need not start at 0
    kps = KeypointSet(
        rows=np.asarray(rows) + 100,
        xy=np.asarray(xy, np.float32),
        score=np.ones(len(rows), np.float32),
        desc=np.asarray(desc, np.float32),
    )
    return kps, np.asarray(codes, np.float32), image_rows, np.asarray(true_pose), np.asarray(part_of), np.asarray(kept)


def _one_to_one(pred: np.ndarray, true: np.ndarray) -> dict[int, int]:
    """The mapping pred -> true, asserting it is a bijection consistent on every item."""
    mapping = {}
    for p, t in zip(pred.tolist(), true.tolist()):
        assert mapping.setdefault(p, t) == t, "one predicted cluster holds two true ones"
    assert len(set(mapping.values())) == len(mapping), "two predicted clusters share one true one"
    return mapping


def test_two_stage_labels_recover_the_construction():
    Q, K = 3, 4
    kps, codes, image_rows, true_pose, part_of, kept = _tsc_case(Q, K)
    labeller = TwoStageLabeller(q=Q, k=K).fit(kps, codes, image_rows, seed=0)
    out = labeller.predict(kps, codes, image_rows)
    assert not labeller.fallback_.any()
    # stage 1: the pose clusters are the constructed poses (up to renaming)
    _one_to_one(out.pose, true_pose)
    # the kept keypoints are the good candidates, one per constructed part and image
    idx = out.keypoint[out.present]
    assert kept[idx].all()
    assert out.present.sum() == kept.sum()
    # stage 2 + identities: one global renaming of parts, the same in every pose cluster
    ident = out.identity[out.present]
    _one_to_one(ident, part_of[idx])
    # and the Q x K labels are the (pose, part) pairs
    _one_to_one(out.labels[out.present], true_pose[np.nonzero(out.present)[0]] * K + part_of[idx])
    coords, present = out.by_identity()
    assert present.sum() == out.present.sum()
    # by_identity puts every keypoint under its global id
    n_img, c_loc = np.nonzero(out.present)
    np.testing.assert_array_equal(coords[n_img, out.identity[n_img, c_loc]], out.coords[n_img, c_loc])
    # stage 2 inside a pose cluster is more compact than one clustering of all descriptors (Table 3's point)
    from pipeline.clustering import nearest_centroid

    _, d_global = nearest_centroid(kps.desc[idx], labeller.global_centers_, use_gpu=False)
    assert out.distance[out.present].mean() < 0.25 * d_global.mean()
    # the engine's container: Q * K columns, each image in its pose cluster's block
    pl = out.to_pseudo_labels()
    assert pl.present.shape == (len(image_rows), Q * K) and pl.present.sum() == out.present.sum()
    np.testing.assert_array_equal(pl.landmarks(), labeller.identities_.reshape(-1))
    n_img, c_loc = np.nonzero(out.present)
    np.testing.assert_array_equal(pl.coords[n_img, out.pose[n_img] * K + c_loc], out.coords[n_img, c_loc])
    # a training batch's labels by store row
    c_b, p_b, u_b = out.lookup(image_rows[[5, 0]])
    assert c_b.shape == (2, Q * K, 2) and u_b.tolist() == out.pose[[5, 0]].tolist()
    np.testing.assert_array_equal(p_b.numpy(), pl.present[[5, 0]])
    assert torch.isfinite(c_b).all()
    with pytest.raises(ConfigError):
        out.lookup(np.array([image_rows.max() + 1]))


def test_two_stage_is_deterministic_for_a_seed():
    kps, codes, image_rows, *_ = _tsc_case()
    a = TwoStageLabeller(q=3, k=4).fit(kps, codes, image_rows, seed=7)
    b = TwoStageLabeller(q=3, k=4).fit(kps, codes, image_rows, seed=7)
    np.testing.assert_array_equal(a.centers_, b.centers_)
    np.testing.assert_array_equal(a.identities_, b.identities_)
    la, lb = a.predict(kps, codes, image_rows), b.predict(kps, codes, image_rows)
    np.testing.assert_array_equal(la.keypoint, lb.keypoint)


def test_small_pose_cluster_falls_back_to_global_centroids():
    K = 4
    # pose 2 has 2 images (~9 keypoints) < 5 * K = 20: no centroids of its own
    kps, codes, image_rows, true_pose, part_of, kept = _tsc_case(3, K, per_pose=(15, 15, 2))
    labeller = TwoStageLabeller(q=3, k=K, min_points_per_landmark=5).fit(kps, codes, image_rows, seed=0)
    small = int(np.argmin(labeller.pose_images_))
    assert labeller.pose_images_[small] == 2
    np.testing.assert_array_equal(labeller.fallback_, np.arange(3) == small)
    np.testing.assert_array_equal(labeller.centers_[small], labeller.global_centers_)
    np.testing.assert_array_equal(labeller.identities_[small], np.arange(K))
    out = labeller.predict(kps, codes, image_rows)
    # its images are still labelled, consistently with the rest
    in_small = out.pose == small
    assert out.present[in_small].any()
    idx = out.keypoint[out.present]
    _one_to_one(out.identity[out.present], part_of[idx])


def test_two_stage_state_round_trip_and_engine_attributes():
    kps, codes, image_rows, *_ = _tsc_case()
    a = TwoStageLabeller(q=3, k=4).fit(kps, codes, image_rows, seed=0)
    b = TwoStageLabeller(q=3, k=4).set_state(a.get_state())
    np.testing.assert_array_equal(a.predict(kps, codes, image_rows).keypoint, b.predict(kps, codes, image_rows).keypoint)
    assert b.label_centers_.shape == (12, 16) and b.landmark_centers_.shape == (4, 16)
    np.testing.assert_array_equal(b.landmark_of_label_, a.identities_.reshape(-1))
    with pytest.raises(ConfigError):
        TwoStageLabeller(q=2, k=4).set_state(a.get_state())


def test_two_stage_predicts_images_without_keypoints_as_absent():
    kps, codes, image_rows, *_ = _tsc_case()
    labeller = TwoStageLabeller(q=3, k=4).fit(kps, codes, image_rows, seed=0)
    # a new image (row 7) with a pose code but no detected keypoint
    rows = np.concatenate([image_rows, [7]])
    out = labeller.predict(kps, np.concatenate([codes, codes[:1]]), rows)
    assert not out.present[-1].any() and np.isnan(out.coords[-1]).all() and (out.keypoint[-1] == -1).all()
    assert out.pose[-1] == out.pose[0]  # same code, same pose cluster
    coords, present = out.by_identity()
    assert not present[-1].any()


def test_two_stage_rejects_bad_input():
    kps, codes, image_rows, *_ = _tsc_case()
    with pytest.raises(ConfigError):
        TwoStageLabeller(q=3, k=4).fit(kps, codes[:-1], image_rows)
    with pytest.raises(ConfigError):
        TwoStageLabeller(q=len(image_rows) + 1, k=4).fit(kps, codes, image_rows)
    with pytest.raises(ConfigError):
        TwoStageLabeller(q=3, k=4).predict(kps, codes, image_rows)  # not fitted
    with pytest.raises(ConfigError):
        TwoStageLabeller(q=3, k=4).fit(kps, codes[1:], image_rows[1:])  # keypoints of an unknown image


# ------------------------------------------------------------------ D-ULD++ training steps

_SHAPES = {"up1.res0@t0": (8, 8, 8), "up2.res0@t0": (6, 16, 16)}


def _tiny_step_setup(B: int = 4, q: int = 2, K: int = 3, seed: int = 0):
    """Tiny heads + VAE, one batch, and its TSC labels as Q * K columns (through TwoStageLabels.lookup)."""
    torch.manual_seed(seed)
    heads = ULDHeads(ULDHeadsConfig.from_feature_shapes(_SHAPES, crop_size=32, channels=8, hidden=8, descriptor_dim=6))
    vae = PoseVAE(PoseVAEConfig(size=16, k=K, latent=64, widths=(8, 16)))
    g = torch.Generator().manual_seed(seed)
    batch = {"index": torch.arange(B), "features": {k: torch.randn(B, *s, generator=g) for k, s in _SHAPES.items()}}
    coords = (torch.rand(B, K, 2, generator=g) * 20 + 6).numpy()
    present = np.ones((B, K), bool)
    present[0, 1] = False
    labels = TwoStageLabels(
        rows=np.arange(B), pose=np.arange(B) % q, coords=np.where(present[..., None], coords, np.nan).astype(np.float32),
        present=present, distance=np.zeros((B, K), np.float32), keypoint=np.zeros((B, K), np.int64),
        table=np.tile(np.arange(K), (q, 1)),
    )
    full_c, full_p, pose = labels.lookup(batch["index"])
    cfg = DULDPPConfig(duld=DULDConfig(k=K, views=None), q=q)
    return heads, vae, batch, full_c, full_p, pose, cfg


def test_step_labels_are_q_times_k_columns():
    heads, vae, batch, coords, present, pose, cfg = _tiny_step_setup(B=4, q=2, K=3)
    assert coords.shape == (4, 6, 2) and present.shape == (4, 6)
    # image 1 is in pose cluster 1: its landmarks fill columns 3..5 only
    assert present[1].tolist() == [False, False, False, True, True, True]
    assert present[0].tolist() == [True, False, True, False, False, False]
    with pytest.raises(ConfigError):
        proxy_task_step(heads, vae, batch, coords, present, pose + 5, cfg, torch.Generator())
    with pytest.raises(ConfigError):  # more than K landmarks in one image's target
        vae.target(torch.zeros(1, 6, 2), torch.ones(1, 6, dtype=torch.bool))


def _snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_proxy_step_trains_detector_and_vae_but_not_the_descriptor_head():
    heads, vae, batch, coords, present, pose, cfg = _tiny_step_setup()
    opt = make_duldpp_optimizer(heads, vae, "proxy", cfg)
    assert opt.param_groups[0]["lr"] == 5e-5  # paper, Sec 4
    before = {name: _snapshot(m) for name, m in (("desc", heads.descriptor), ("det", heads.detector), ("vae", vae))}
    losses = proxy_task_step(heads, vae, batch, coords, present, pose, cfg, torch.Generator().manual_seed(0))
    assert {"loss", "detector", "contrastive", "elbo", "reconstruction", "kl"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    opt.zero_grad()
    losses["loss"].backward()
    assert heads.descriptor.net[0].weight.grad is not None  # the contrastive gradient passes through it ...
    opt.step()
    assert not _changed(before["desc"], heads.descriptor)  # ... but it stays frozen
    assert _changed(before["det"], heads.detector) and _changed(before["vae"], vae)


def test_proxy_elbo_reaches_the_detector_through_the_heatmap():
    heads, vae, batch, coords, present, pose, cfg = _tiny_step_setup()
    only_elbo = DULDPPConfig(duld=DULDConfig(k=3, views=None, detector_weight=0.0, match_weight=0.0, margin=1e-6), q=2, elbo_weight=1.0)
    losses = proxy_task_step(heads, vae, batch, coords, present, pose, only_elbo, torch.Generator().manual_seed(0))
    losses["elbo"].backward()
    assert heads.detector.net[0].weight.grad.abs().sum() > 0


def test_latent_step_trains_only_the_encoder_of_the_vae_and_eq3_falls():
    heads, vae, batch, coords, present, pose, cfg = _tiny_step_setup(B=6, q=2)
    cfg = DULDPPConfig(duld=cfg.duld, q=2, latent_lr=1e-2)  # tiny problem: a large step to see Eq. 3 move in 20 steps
    opt = make_duldpp_optimizer(heads, vae, "latent", cfg)
    before_desc, before_dec = _snapshot(heads.descriptor), [p.detach().clone() for p in vae.decoder_parameters()]
    before_enc = [p.detach().clone() for p in vae.encoder_parameters()]
    g = torch.Generator().manual_seed(0)
    lat = []
    for _ in range(20):
        losses = latent_step(heads, vae, batch, coords, present, pose, cfg, g)
        assert set(losses) == {"loss", "detector", "latent"}
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        lat.append(losses["latent"].item())
    assert not _changed(before_desc, heads.descriptor)
    assert all(torch.equal(a, b) for a, b in zip(before_dec, vae.decoder_parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_enc, vae.encoder_parameters()))
    assert lat[-1] < 0.5 * lat[0], lat


def test_pose_codes_one_per_image_and_deterministic():
    heads, vae, batch, *_ = _tiny_step_setup()
    rows, codes = pose_codes(heads, vae, [batch, {**batch, "index": batch["index"] + 10}])
    assert rows.tolist() == [0, 1, 2, 3, 10, 11, 12, 13] and codes.shape == (8, 64)
    np.testing.assert_array_equal(codes[:4], codes[4:])


def test_full_vae_step_trains_detector_and_whole_vae_and_the_elbo_falls():
    from pipeline.methods.duldpp import full_vae_step

    heads, vae, batch, coords, present, pose, cfg = _tiny_step_setup(B=6, q=2)
    cfg = DULDPPConfig(duld=cfg.duld, q=2, latent_lr=1e-2)  # tiny problem: a large step to see the ELBO move in 20 steps
    opt = make_duldpp_optimizer(heads, vae, "full-vae", cfg)
    assert opt.param_groups[0]["lr"] == 1e-2  # step 2's rate, as with Eq. 3
    before_desc, before_dec = _snapshot(heads.descriptor), [p.detach().clone() for p in vae.decoder_parameters()]
    before_det = _snapshot(heads.detector)
    g = torch.Generator().manual_seed(0)
    elbo = []
    for _ in range(20):
        losses = full_vae_step(heads, vae, batch, coords, present, pose, cfg, g)
        assert set(losses) == {"loss", "detector", "elbo", "reconstruction", "kl"}
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        elbo.append(losses["elbo"].item())
    assert not _changed(before_desc, heads.descriptor)  # the descriptor head stays frozen, as in latent_step
    assert _changed(before_det, heads.detector)
    assert any(not torch.equal(a, b) for a, b in zip(before_dec, vae.decoder_parameters()))  # the decoder is kept and trained
    assert elbo[-1] < 0.5 * elbo[0], elbo


def test_full_vae_step_differs_from_latent_step_only_in_the_vae_loss():
    from pipeline.methods.duldpp import full_vae_step

    heads, vae, batch, coords, present, pose, cfg = _tiny_step_setup(B=6, q=2)
    a = latent_step(heads, vae, batch, coords, present, pose, cfg, torch.Generator().manual_seed(0))
    b = full_vae_step(heads, vae, batch, coords, present, pose, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(a["detector"], b["detector"])  # same labels, same detector term
    torch.testing.assert_close(b["loss"], cfg.duld.detector_weight * b["detector"] + cfg.elbo_weight * b["elbo"])
    with pytest.raises(ConfigError):  # the pose labels are still checked against Q
        full_vae_step(heads, vae, batch, coords, present, pose + 5, cfg, torch.Generator())


def test_tsc_loss_names():
    from pipeline.methods.duldpp import check_tsc_loss, full_vae_step, tsc_step

    assert check_tsc_loss(None) == "eq3" and tsc_step("eq3") is latent_step and tsc_step("elbo") is full_vae_step
    with pytest.raises(ConfigError, match="unknown TSC loss"):
        check_tsc_loss("mse")
