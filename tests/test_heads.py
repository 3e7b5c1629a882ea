"""ULDHeads: shapes, warps, NMS, persistence."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import ConfigError, StoreError
from pipeline.heads import AugmentConfig, ULDHeads, ULDHeadsConfig, nms_keypoints, random_affine
from pipeline.heads.augment import invert_affine, warp_features, warp_map, warp_points
from pipeline.heads.detector import local_maxima
from pipeline.heads.descriptor import cells_to_normalised, sample_descriptors

torch.set_num_threads(1)

SHAPES = {"up0.res0@t50": (12, 4, 4), "up1.res0@t50": (8, 8, 8), "up1.res0@t150": (8, 8, 8)}


def _features(n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, *s, generator=g) for k, s in SHAPES.items()}


def test_forward_shapes_and_unit_descriptors():
    cfg = ULDHeadsConfig.from_feature_shapes(SHAPES, crop_size=16, channels=8, hidden=8, descriptor_dim=6)
    assert cfg.out_size == 8 and cfg.feature_keys == tuple(sorted(SHAPES))
    out = ULDHeads(cfg)(_features())
    assert out.logits.shape == (2, 1, 8, 8) and out.descriptors.shape == (2, 6, 8, 8)
    assert torch.allclose(out.descriptors.norm(dim=1), torch.ones(2, 8, 8), atol=1e-5)
    agg = ULDHeads(cfg).aggregator
    w = agg.mixing_weights()
    # Eq. 2: one weight per (layer, timestep) pair, softmax over the pairs that exist
    assert w.shape == (2, 2) and w.sum().item() == pytest.approx(1.0)
    assert agg.layers == ["up0.res0", "up1.res0"] and agg.timesteps == [50, 150]
    assert w[0, 1].item() == 0.0  # up0.res0 has no t=150 map
    assert agg.key_weights().tolist() == pytest.approx([1 / 3] * 3)


def test_aggregator_shares_one_bottleneck_per_layer_over_timesteps():
    cfg = ULDHeadsConfig.from_feature_shapes(SHAPES, crop_size=16, channels=8, hidden=8)
    agg = ULDHeads(cfg).aggregator
    assert len(agg.bottlenecks) == 2  # two layers, three (layer, timestep) maps
    torch.manual_seed(0)
    with torch.no_grad():
        agg.mixing_logits.copy_(torch.randn(2, 2))
    f = _features()
    # Eq. 2 written out, key by key: sum_{l,t} w[l,t] * resize(B_l(r_{l,t}))
    w = agg.mixing_weights()
    ref = 0
    for key in SHAPES:
        layer, t = key.split("@t")
        li, ti = agg.layers.index(layer), agg.timesteps.index(int(t))
        y = agg.bottlenecks[li](f[key])
        ref = ref + w[li, ti] * torch.nn.functional.interpolate(y, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(agg(f), ref, atol=1e-5)
    # the same for the ResNet bottleneck (no mixing-before-bottleneck shortcut there)
    cfg_r = ULDHeadsConfig.from_feature_shapes(SHAPES, crop_size=16, channels=8, hidden=8, bottleneck="resnet")
    agg_r = ULDHeads(cfg_r).aggregator.eval()
    w = agg_r.mixing_weights()
    ref = 0
    for key in SHAPES:
        layer, t = key.split("@t")
        li, ti = agg_r.layers.index(layer), agg_r.timesteps.index(int(t))
        y = agg_r.bottlenecks[li](f[key])
        ref = ref + w[li, ti] * torch.nn.functional.interpolate(y, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(agg_r(f), ref, atol=1e-5)


def test_aggregator_refuses_a_layer_with_different_channels_per_timestep():
    shapes = {"a@t50": (8, 4, 4), "a@t150": (6, 4, 4)}
    with pytest.raises(ConfigError, match="one bottleneck per layer"):
        ULDHeads(ULDHeadsConfig.from_feature_shapes(shapes, crop_size=16, channels=8, hidden=8))


def test_missing_feature_is_an_actionable_error():
    cfg = ULDHeadsConfig.from_feature_shapes(SHAPES, crop_size=16, channels=8, hidden=8)
    feats = _features()
    feats.pop("up1.res0@t150")
    with pytest.raises(ConfigError, match="missing"):
        ULDHeads(cfg)(feats)


@pytest.mark.parametrize("bottleneck", ["conv1x1", "resnet"])
def test_save_load_round_trip(tmp_path, bottleneck):
    cfg = ULDHeadsConfig.from_feature_shapes(SHAPES, crop_size=16, channels=8, hidden=8, bottleneck=bottleneck)
    torch.manual_seed(1)
    model = ULDHeads(cfg)
    with torch.no_grad():
        model.aggregator.mixing_logits.copy_(torch.tensor([[0.3, -0.2], [1.0, 0.5]]))
    model.save_pretrained(tmp_path / "ckpt")
    loaded = ULDHeads.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == cfg
    f = _features()
    a, b = model.eval()(f), loaded.eval()(f)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.descriptors, b.descriptors)
    with pytest.raises(StoreError, match="no saved heads"):
        ULDHeads.from_pretrained(tmp_path / "nothing")


def test_nms_keeps_local_maxima_topk_threshold():
    h = torch.zeros(1, 1, 8, 8)
    h[0, 0, 2, 3] = 0.9
    h[0, 0, 2, 4] = 0.8  # suppressed: neighbour of a stronger peak
    h[0, 0, 6, 6] = 0.7
    h[0, 0, 0, 7] = 0.05  # below threshold
    kp = nms_keypoints(h, radius=1, top_k=5, threshold=0.1)
    got = kp.xy[0][kp.valid[0]].tolist()
    assert got == [[3.0, 2.0], [6.0, 6.0]]
    assert kp.score[0, :2].tolist() == pytest.approx([0.9, 0.7])
    assert kp.valid[0].tolist() == [True, True, False, False, False]
    kp1 = nms_keypoints(h, radius=1, top_k=1, threshold=0.1)
    assert kp1.xy.shape == (1, 1, 2) and kp1.xy[0, 0].tolist() == [3.0, 2.0]


def test_local_maxima_flags_the_cells_that_win_their_neighbourhood():
    h = torch.zeros(1, 1, 8, 8)
    h[0, 0, 2, 3] = 0.9
    h[0, 0, 2, 4] = 0.8  # beaten by its left neighbour at radius >= 1
    h[0, 0, 2, 6] = 0.7  # two cells from the 0.8: a maximum at radius 1, not at radius 2 (0.8 within reach)
    h[0, 0, 6, 6] = 0.5
    kp = nms_keypoints(h, radius=0, top_k=4)  # dense: the four strongest cells
    assert kp.xy[0].tolist() == [[3.0, 2.0], [4.0, 2.0], [6.0, 2.0], [6.0, 6.0]]
    assert local_maxima(h, kp.xy, 1)[0].tolist() == [True, False, True, True]
    assert local_maxima(h, kp.xy, 2)[0].tolist() == [True, False, False, True]
    assert local_maxima(h, kp.xy, 0).all()


def test_warp_moves_a_feature_peak_to_the_warped_coordinate():
    R = 32
    aff = random_affine(4, AugmentConfig(max_rotation_deg=30, scale_range=(0.9, 1.1), max_translation=0.1),
                        torch.Generator().manual_seed(3))
    # a sharp blob at cell (col 13, row 18) on two maps of different resolution
    yy, xx = torch.meshgrid(torch.arange(R).float(), torch.arange(R).float(), indexing="ij")
    blob = torch.exp(-((xx - 13) ** 2 + (yy - 18) ** 2) / 2.0)[None, None].repeat(4, 1, 1, 1)
    small = torch.nn.functional.interpolate(blob, size=(16, 16), mode="bilinear", align_corners=False)
    warped = warp_features({"a": blob, "b": small}, aff)
    p = cells_to_normalised(torch.tensor([[[13.0, 18.0]]]), R).expand(4, 1, 2)
    q = warp_points(p, aff)
    for key, size, tol in (("a", R, 1.0), ("b", 16, 1.0)):
        m = warped[key][:, 0]
        flat = m.reshape(4, -1).argmax(1)
        peak = torch.stack([flat % size, flat // size], 1).float()
        expect = ((q[:, 0] + 1) * size - 1) / 2
        assert (peak - expect).abs().max().item() <= tol, key
    # the inverse transform undoes the forward one
    assert torch.allclose(warp_points(q, invert_affine(aff)), p, atol=1e-5)


def test_sample_descriptors_at_cell_centres():
    d = torch.nn.functional.normalize(torch.randn(1, 5, 8, 8), dim=1)
    pts = cells_to_normalised(torch.tensor([[[2.0, 6.0], [7.0, 0.0]]]), 8)
    s = sample_descriptors(d, pts)
    assert torch.allclose(s[0, 0], d[0, :, 6, 2], atol=1e-5)
    assert torch.allclose(s[0, 1], d[0, :, 0, 7], atol=1e-5)


def test_warp_identity_is_exact():
    x = torch.randn(2, 3, 8, 8)
    ident = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3)
    assert torch.allclose(warp_map(x, ident), x, atol=1e-5)
    rot = torch.tensor([[math.cos(0.3), -math.sin(0.3), 0.0], [math.sin(0.3), math.cos(0.3), 0.0]])[None]
    assert not torch.allclose(warp_map(x[:1], rot), x[:1], atol=1e-2)


def test_refine_subcell_moves_towards_the_heavier_neighbour():
    from pipeline.heads.detector import refine_subcell

    h = torch.zeros(1, 1, 6, 6)
    h[0, 0, 2, 3] = 1.0
    h[0, 0, 2, 4] = 1.0  # equal right neighbour: centroid half a cell to the right
    h[0, 0, 5, 0] = 1.0  # isolated peak at the border stays put
    xy = torch.tensor([[[3.0, 2.0], [0.0, 5.0]]])
    r = refine_subcell(h, xy)
    assert r[0, 0].tolist() == pytest.approx([3.5, 2.0])
    assert r[0, 1].tolist() == pytest.approx([0.0, 5.0])


def test_nms_relative_gate_filters_weak_maxima_per_image():
    h = torch.zeros(2, 1, 8, 8)
    h[0, 0, 1, 1], h[0, 0, 5, 5], h[0, 0, 1, 6] = 0.40, 0.30, 0.10  # a head far from peak 1 (short MSE training)
    h[1, 0, 2, 2], h[1, 0, 6, 6] = 0.95, 0.90
    kp = nms_keypoints(h, radius=1, top_k=4, threshold=0.05, relative=0.5)
    assert kp.xy[0][kp.valid[0]].tolist() == [[1.0, 1.0], [5.0, 5.0]]  # 0.10 < 0.5 * 0.40
    assert kp.xy[1][kp.valid[1]].tolist() == [[2.0, 2.0], [6.0, 6.0]]
    # the absolute floor still applies: an image with no response keeps nothing
    flat = torch.full((1, 1, 8, 8), 0.01)
    flat[0, 0, 3, 3] = 0.02
    assert not nms_keypoints(flat, 1, 4, threshold=0.05, relative=0.5).valid.any()
    # the old gate (threshold 0, no relative) keeps every maximum
    assert nms_keypoints(h, 1, 4, 0.0).valid[0].sum() == 3
