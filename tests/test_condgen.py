"""Jakab et al. / C3 (pipeline.methods.condgen, flows.condgen) on tiny generated data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.methods.condgen import C3Landmarks, CondGenConfig, DiffusionPerceptualLoss, JakabLandmarks
from pipeline.methods.condgen.geometry import (
    expected_coordinates,
    gaussian_maps,
    random_affine,
    random_tps,
    sample_grid,
    solve_tps,
    spatial_softmax,
    to_crop_pixels,
    to_normalised,
    tps_control_points,
    tps_grid,
    tps_map,
    warp_images,
    warp_points,
)
from tests.tiny_runs import SIZE, make_backbone

torch.set_num_threads(1)
TINY = dict(k=4, width=4, appearance_channels=8, batch_size=4)


@pytest.fixture(scope="module")
def perceptual(tmp_path_factory):
    from pipeline.backbones.ddpm import CategoryDDPM

    backbone = CategoryDDPM.from_pretrained(make_backbone(tmp_path_factory.mktemp("cg") / "tinyddpm"))
    return DiffusionPerceptualLoss.from_backbone(backbone)


def blob_images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """Crops with one bright disc each at a random place on a dark, random-colour background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < (size * 0.15) ** 2
        bg = rng.uniform(0, 80, 3)
        out[i] = np.where(disc[..., None], rng.uniform(180, 255, 3), bg).astype(np.uint8)
    return out


def test_single_peak_gives_its_coordinate_and_gaussian_peaks_there():
    k, h, w, S = 3, 8, 8, 32
    heat = torch.zeros(2, k, h, w)
    peaks = [(1, 6), (4, 0), (7, 3)]  # (row, column)
    for j, (r, c) in enumerate(peaks):
        heat[:, j, r, c] = 60.0  # softmax puts ~all the mass on this cell
    prob = spatial_softmax(heat)
    assert torch.allclose(prob.sum((-1, -2)), torch.ones(2, k))
    px = to_crop_pixels(expected_coordinates(prob), S)
    want = torch.tensor([[(c + 0.5) * S / w, (r + 0.5) * S / h] for r, c in peaks])
    assert torch.allclose(px[0], want, atol=1e-3)
    maps = gaussian_maps(to_normalised(px, S), h, w, sigma=0.1)
    assert maps.shape == (2, k, h, w)
    for j, (r, c) in enumerate(peaks):
        assert divmod(int(maps[0, j].argmax()), w) == (r, c)
        assert maps[0, j, r, c] == pytest.approx(1.0, abs=1e-4)


def test_warp_moves_points_exactly_with_the_image():
    S = 32
    gen = torch.Generator().manual_seed(3)
    theta = random_affine(4, gen, rotation_deg=20, log_scale=0.1, translation=0.1, shear=0.05)
    # An image whose two channels are the normalised x and y of each pixel centre (linear, so
    # bilinear sampling reproduces it exactly): the warped image at p holds the source point it came from.
    ys = (torch.arange(S) * 2 + 1) / S - 1
    gy, gx = torch.meshgrid(ys, ys, indexing="ij")
    ramp = torch.stack([gx, gy, torch.zeros_like(gx)])[None].repeat(4, 1, 1, 1)
    warped, valid = warp_images(ramp, theta)
    # Target pixel centres well inside the valid area, and the source points warp_points says they show.
    r, c = torch.meshgrid(torch.arange(10, 22), torch.arange(10, 22), indexing="ij")
    tgt = torch.stack([(c.reshape(-1) * 2 + 1) / S - 1, (r.reshape(-1) * 2 + 1) / S - 1], -1)
    src = warped[:, :2, r.reshape(-1), c.reshape(-1)].permute(0, 2, 1)  # (4, n, 2) source coords
    assert (valid[:, 0, r.reshape(-1), c.reshape(-1)] > 0.999).all()
    assert torch.allclose(warp_points(src, theta), tgt.expand(4, -1, -1), atol=1e-4)


def test_cross_image_flow_carries_landmarks_to_the_matching_place():
    from pipeline.methods.condgen.losses import cross_image_flow_loss, soft_flow, transport_landmarks

    h = w = 8
    # Features that name each cell uniquely (one-hot); image B is image A moved by (+2, +1) cells.
    feat_a = torch.eye(h * w).reshape(1, h * w, h, w)
    feat_b = torch.roll(feat_a, shifts=(1, 2), dims=(2, 3))
    heat = torch.full((1, 2, h, w), -50.0)
    heat[0, 0, 2, 3] = heat[0, 1, 5, 1] = 50.0
    prob_a = spatial_softmax(heat)
    prob_b = torch.roll(prob_a, shifts=(1, 2), dims=(2, 3))
    pts_a, pts_b = expected_coordinates(prob_a), expected_coordinates(prob_b)
    moved = transport_landmarks(prob_a, soft_flow(feat_a, feat_b, temperature=0.01))
    assert torch.allclose(moved, pts_b, atol=1e-4)
    assert torch.allclose(pts_b - pts_a, torch.tensor([2 * 2 / w, 1 * 2 / h]).expand(1, 2, 2), atol=1e-4)
    assert float(cross_image_flow_loss(prob_a, pts_a, feat_a, prob_b, pts_b, feat_b, 0.01, 0.1)) < 1e-6
    # Landmarks of B that did not move with the image violate the equivariance.
    assert float(cross_image_flow_loss(prob_a, pts_a, feat_a, prob_a, pts_a, feat_b, 0.01, 0.1)) > 0.05


def _rolled_pair(heat: torch.Tensor, shift: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """A's maps from ``heat`` and B's = A's moved by ``shift`` cells (consistent landmarks), with their points."""
    prob_a = spatial_softmax(heat)
    prob_b = torch.roll(prob_a, shifts=shift, dims=(2, 3))
    return prob_a, expected_coordinates(prob_a), prob_b, expected_coordinates(prob_b)


def test_flow_term_scores_flat_maps_worse_than_peaked_consistent_ones():
    """The squared-error form scored flat maps 0 (its minimum) and peaked, consistent maps above it
    under a soft flow; the matching form must do the opposite."""
    from pipeline.methods.condgen.losses import cross_image_flow_loss

    h = w = 8
    k, shift, tau = 3, (1, 2), 0.2  # tau 0.2: a soft flow (about 0.7 of each cell's mass on its match)
    feat_a = torch.eye(h * w).reshape(1, h * w, h, w)
    feat_b = torch.roll(feat_a, shifts=shift, dims=(2, 3))
    heat = torch.full((1, k, h, w), -20.0)
    heat[0, 0, 1, 1] = heat[0, 1, 4, 5] = heat[0, 2, 5, 1] = 20.0
    peaked = cross_image_flow_loss(*_interleave(_rolled_pair(heat, shift), feat_a, feat_b), tau, 0.1)
    flat = cross_image_flow_loss(*_interleave(_rolled_pair(torch.zeros(1, k, h, w), shift), feat_a, feat_b), tau, 0.1)
    assert float(flat) == pytest.approx(np.log(k), abs=1e-5)  # all landmarks coincide: the worst matching
    assert float(peaked) < 0.05 * float(flat)
    # Flat maps with an uninformative (constant-feature) flow: still log K, not 0.
    const = torch.ones(1, 4, h, w)
    flat_const = cross_image_flow_loss(*_interleave(_rolled_pair(torch.zeros(1, k, h, w), shift), const, const), tau, 0.1)
    assert float(flat_const) == pytest.approx(np.log(k), abs=1e-5)


def test_flow_term_gradient_moves_near_flat_maps_apart():
    """Descending the flow term from almost-uniform maps (informative flow) must separate the landmarks
    and sharpen the maps; under the squared-error form they stayed at the centre, flat."""
    from pipeline.methods.condgen.losses import cross_image_flow_loss

    h = w = 8
    k, shift = 3, (1, 2)
    feat_a = torch.eye(h * w).reshape(1, h * w, h, w)
    feat_b = torch.roll(feat_a, shifts=shift, dims=(2, 3))
    heat = (torch.randn(1, k, h, w, generator=torch.Generator().manual_seed(0)) * 0.01).requires_grad_()
    peak0 = float(spatial_softmax(heat.detach()).flatten(2).amax(-1).mean())
    opt = torch.optim.SGD([heat], lr=1.0)
    for _ in range(100):
        loss = cross_image_flow_loss(*_interleave(_rolled_pair(heat, shift), feat_a, feat_b), 0.2, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    prob = spatial_softmax(heat.detach())
    pts = expected_coordinates(prob)[0]
    spacing = torch.cdist(pts, pts)[~torch.eye(k, dtype=bool)].min()
    assert float(spacing) > 0.2  # started within 0.003 of each other, at the centre
    assert float(prob.flatten(2).amax(-1).mean()) > 2 * peak0
    assert float(loss.detach()) < 0.5 * np.log(k)


def _interleave(pair: tuple[torch.Tensor, ...], feat_a: torch.Tensor, feat_b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    prob_a, pts_a, prob_b, pts_b = pair
    return prob_a, pts_a, feat_a, prob_b, pts_b, feat_b


# ----------------------------------------------------------------- TPS warps
def test_tps_with_zero_offsets_is_the_identity_and_composes_with_the_affine():
    n, S = 3, 16
    ctrl = tps_control_points(5)
    assert ctrl.shape == (25, 2) and ctrl.min() == -1 and ctrl.max() == 1
    still = ctrl[None].repeat(n, 1, 1)
    grid = tps_grid(still, S)
    assert grid.shape == (n, S, S, 2) and grid.dtype == torch.float32
    identity = torch.nn.functional.affine_grid(torch.eye(2, 3).expand(n, 2, 3), [n, 1, S, S], align_corners=False)
    assert torch.allclose(grid, identity, atol=1e-5)
    theta = random_affine(n, torch.Generator().manual_seed(1))
    assert torch.allclose(tps_grid(still, S, theta), torch.nn.functional.affine_grid(theta, [n, 1, S, S], align_corners=False), atol=1e-5)
    images = torch.rand(n, 3, S, S, dtype=torch.float64)
    warped, valid = sample_grid(images, grid)
    assert warped.dtype == torch.float64 and valid.shape == (n, 1, S, S)
    assert torch.allclose(warped, images, atol=1e-5) and torch.allclose(valid, torch.ones_like(valid), atol=1e-5)


def test_tps_interpolates_its_control_points_and_moves_a_dot_with_them():
    S = 33  # odd: the centre control point (0, 0) is a pixel centre (pixel 16)
    ctrl = tps_control_points(5)
    centre = 12  # (0, 0) in the row-major 5 x 5 grid
    assert torch.equal(ctrl[centre], torch.zeros(2))
    delta = torch.tensor([4.0, -2.0]) * (2 / S)  # 4 pixels right, 2 up: a source pixel centre, so sampling is exact
    displaced = ctrl.clone()
    displaced[centre] += delta
    displaced = displaced[None]
    assert torch.allclose(tps_map(ctrl, ctrl, solve_tps(ctrl, displaced)), displaced, atol=1e-5)
    # A bright dot in the source at (0, 0) + delta: the warp samples there for the target's
    # centre pixel, so the dot appears at the centre, while a dot on an undisplaced control
    # point's place, (-0.5, 0.5), stays where it is.
    ys = (torch.arange(S) * 2 + 1) / S - 1
    gy, gx = torch.meshgrid(ys, ys, indexing="ij")
    def dot(x: float, y: float) -> torch.Tensor:
        return torch.exp(-((gx - x) ** 2 + (gy - y) ** 2) / (2 * 0.06 ** 2))
    source = torch.stack([dot(float(delta[0]), float(delta[1])), dot(-0.5, 0.5)])[None]  # (1, 2, S, S)
    warped, _ = sample_grid(source, tps_grid(displaced, S))
    assert divmod(int(warped[0, 0].argmax()), S) == (16, 16)
    assert float(warped[0, 0, 16, 16]) == pytest.approx(1.0, abs=1e-3)
    # (-0.5, 0.5) is not a pixel centre: compare the dot's centroid with its place.
    m = warped[0, 1] * (warped[0, 1] > 0.2)
    centroid = torch.stack([(m * gx).sum() / m.sum(), (m * gy).sum() / m.sum()])
    assert torch.allclose(centroid, torch.tensor([-0.5, 0.5]), atol=0.02)
    # Without the displacement the first dot stays at (0, 0) + delta, a pixel away from the centre.
    unwarped, _ = sample_grid(source, tps_grid(ctrl[None], S))
    assert divmod(int(unwarped[0, 0].argmax()), S) != (16, 16)


def test_random_tps_is_seeded_and_bounded():
    a = random_tps(4, torch.Generator().manual_seed(7), grid_size=4, scale=0.08)
    b = random_tps(4, torch.Generator().manual_seed(7), grid_size=4, scale=0.08)
    c = random_tps(4, torch.Generator().manual_seed(8), grid_size=4, scale=0.08)
    assert a.shape == (4, 16, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    off = a - tps_control_points(4)[None]
    assert float(off.abs().max()) <= 0.08 and float(off.abs().max()) > 0.04
    assert torch.equal(tps_grid(a, 12), tps_grid(b, 12))
    with pytest.raises(ValueError, match="square grid"):
        tps_grid(a[:, :15], 12)


def test_jakab_loss_falls_and_predicts_crop_pixels(perceptual):
    images = blob_images(24)
    est = JakabLandmarks(CondGenConfig(steps=40, lr=3e-3, **TINY), perceptual=perceptual).fit(images)
    losses = np.array([r["loss"] for r in est.history_])
    assert len(losses) == 40 and {"perceptual", "l1"} <= set(est.history_[0])
    assert losses[-8:].mean() < 0.8 * losses[:8].mean()
    ls = est.predict(images[:5])
    assert ls.coords.shape == (5, 4, 2) and ls.present.all() and not ls.fallback.any()
    assert ((ls.coords >= 0) & (ls.coords <= SIZE)).all()


def test_c3_losses_fall_and_runs_are_deterministic(perceptual):
    images = blob_images(16, seed=1)
    cfg = CondGenConfig(steps=24, lr=3e-3, **TINY)
    a = C3Landmarks(cfg, perceptual=perceptual).fit(images)
    parts = {"cycle", "flow", "paired"}
    assert parts <= set(a.history_[0])
    cycle = np.array([r["cycle"] for r in a.history_])
    assert cycle[-6:].mean() < cycle[:6].mean()
    b = C3Landmarks(cfg, perceptual=perceptual).fit(images)
    np.testing.assert_array_equal(a.predict(images).coords, b.predict(images).coords)
    warm = C3Landmarks(CondGenConfig(steps=3, flow_warmup=2, **TINY), perceptual=perceptual).fit(images)
    assert [r["flow_weight"] for r in warm.history_] == [0.0, 0.0, 1.0]


def test_warp_setting_tps_trains_and_affine_keeps_its_stream(perceptual):
    from pipeline.errors import ConfigError
    from pipeline.methods.condgen.estimators import step_generator

    images = blob_images(8, seed=2)
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    affine = JakabLandmarks(CondGenConfig(**TINY))
    got, _ = affine._warp(x, step_generator(0, 5))
    want, _ = warp_images(x, random_affine(8, step_generator(0, 5)))  # what every run before the setting drew
    assert torch.equal(got, want)
    tps = JakabLandmarks(CondGenConfig(warp="tps", tps_scale=0.08, **TINY))
    bent, valid = tps._warp(x, step_generator(0, 5))
    assert bent.shape == x.shape and valid.shape == (8, 1, SIZE, SIZE) and not torch.allclose(bent, want, atol=1e-3)
    est = JakabLandmarks(CondGenConfig(steps=3, warp="tps", **TINY), perceptual=perceptual).fit(images)
    assert len(est.history_) == 3 and np.isfinite([r["loss"] for r in est.history_]).all()
    with pytest.raises(ConfigError, match="warp"):
        CondGenConfig(warp="elastic")
    with pytest.raises(ConfigError, match="at least 2 landmarks"):
        C3Landmarks(CondGenConfig(**{**TINY, "k": 1}))


# ----------------------------------------------------------------- the flow
@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    from pipeline.datasets.registry import get_loader
    from pipeline.datasets.synthetic import generate_synthetic
    from storage.layout import Workspace

    base = tmp_path_factory.mktemp("condgen-flow")
    ws = Workspace(base / "workspace")
    root = generate_synthetic(ws.generated_dataset("synthetic"), 16, 8, SIZE, 0)
    for split in ("train", "test"):
        manifest, _ = get_loader("synthetic").load(root, split)
        manifest.save(ws.manifest("synthetic", split))
    return ws.home, make_backbone(base / "tinyddpm")


def test_flow_writes_keypoints_metrics_and_resumes_exactly(prefect_harness, tiny_home):
    from flows.condgen import condgen
    from flows.results import read_keypoints
    from storage.tables import read_table

    home, backbone = tiny_home
    cfg = CondGenConfig(steps=6, backbone=backbone, **TINY)
    args = dict(home=home, size=SIZE, checkpoint_every=2, progress=False, threads=1)
    full = condgen("jakab", "synthetic", cfg, run_id="jakab-full", **args)
    assert {"nme_forward", "nme_backward", "acc0.2_hungarian"} <= set(full["metric"])
    kp = read_keypoints(home, "jakab-full")
    assert set(kp["split"]) == {"train", "test"} and len(kp) == 24 * 4 and kp["present"].all()
    run = home / "runs" / "jakab-full"
    assert (run / "figures" / "jakab-test-landmarks.png").is_file()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000006"]
    assert len(pd.read_parquet(run / "train-log.parquet")) == 6
    assert len(read_table(run / "metrics.parquet", "metrics"))

    stopped = condgen("jakab", "synthetic", cfg, run_id="jakab-resumed", stop_after=3, **args)
    assert stopped.empty and not (home / "runs" / "jakab-resumed" / "keypoints.parquet").exists()
    assert (home / "runs" / "jakab-resumed" / "checkpoints" / "step-000002" / "state.json").is_file()
    condgen("jakab", "synthetic", cfg, run_id="jakab-resumed", resume=True, **args)
    cols = ["image_id", "landmark_id", "x", "y", "score"]
    a = kp[cols].sort_values(["image_id", "landmark_id"]).reset_index(drop=True)
    b = read_keypoints(home, "jakab-resumed")[cols].sort_values(["image_id", "landmark_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    # The log of the resumed run: steps 1..6 once each (step 3, past the checkpoint at 2, was re-run).
    assert pd.read_parquet(home / "runs" / "jakab-resumed" / "train-log.parquet")["step"].tolist() == list(range(1, 7))


def test_c3_flow_and_resume_with_other_settings_is_refused(prefect_harness, tiny_home):
    from flows.condgen import condgen
    from pipeline.errors import ConfigError

    home, backbone = tiny_home
    cfg = CondGenConfig(steps=2, backbone=backbone, **TINY)
    rows = condgen("c3", "synthetic", cfg, home=home, size=SIZE, run_id="c3-a", progress=False)
    assert set(rows["method"]) == {"c3"} and "nme_forward" in set(rows["metric"])
    assert (home / "runs" / "c3-a" / "figures" / "c3-test-landmarks.png").is_file()
    with pytest.raises(ConfigError, match="different settings"):
        condgen("c3", "synthetic", CondGenConfig(steps=2, backbone=backbone, **{**TINY, "k": 5}), home=home, size=SIZE, run_id="c3-a", resume=True, progress=False)


def test_uld_train_method_jakab_and_c3(prefect_harness, tiny_home):
    from flows import cli_train
    from tests.tiny_runs import invoke_cli

    home, backbone = tiny_home
    common = ["-d", "synthetic", "--backbone", backbone, "-k", "4", "--steps", "2", "--size", "32", "--batch-size", "4",
              "--param", "width=4", "--param", "appearance_channels=8", "--no-progress"]
    res = invoke_cli(home, cli_train.register, "train", "--method", "jakab", *common, "--run-id", "cli-jakab")
    assert res.exit_code == 0, res.output
    assert "nme_forward" in res.output and (home / "runs" / "cli-jakab" / "metrics.parquet").is_file()
    import json

    cfg = json.loads((home / "runs" / "cli-jakab" / "config.json").read_text())
    assert cfg["condgen"]["width"] == 4 and cfg["condgen"]["steps"] == 2 and cfg["method"] == "jakab"
    # A method-only option of another method is refused before anything runs.
    bad = invoke_cli(home, cli_train.register, "train", "--method", "c3", *common, "--m", "50", "--run-id", "cli-c3")
    assert bad.exit_code != 0 and not (home / "runs" / "cli-c3").exists()
