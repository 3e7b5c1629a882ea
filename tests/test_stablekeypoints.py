"""StableKeypoints (seed 002): attention capture, losses, selection, estimator, context-DDPM, SD, flow and CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.backbones.context_ddpm import ContextDDPM, train_context_ddpm
from pipeline.methods.condgen.geometry import gaussian_maps, random_affine, warp_points
from pipeline.methods.stablekeypoints import StableKeypoints, StableKeypointsConfig
from pipeline.methods.stablekeypoints.attention import (
    AttentionStore,
    CaptureCrossAttention,
    capture_cross_attention,
    cross_attention_layers,
    run_unet,
)
from pipeline.methods.stablekeypoints.losses import argmax_points, equivariance_loss, localisation_loss, unwarp_maps
from pipeline.methods.stablekeypoints.model import from_context_ddpm
from pipeline.methods.stablekeypoints.selection import furthest_point_sampling, most_frequent_tokens, tokens_per_image

SIZE = 32
TINY = dict(k=3, n_tokens=12, batch_size=2, token_chunk=6, map_size=16, select_images=6, augmentations=2)

torch.set_num_threads(1)


def tiny_context_ddpm(seed: int = 0) -> ContextDDPM:
    return ContextDDPM.create(image_size=SIZE, channels=(16, 32), n_context=4, context_dim=16, heads=2, seed=seed)


def crops(n: int = 8, seed: int = 0) -> np.ndarray:
    """Grey crops with one bright blob each (at a random place)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = np.full((n, SIZE, SIZE, 3), 60, np.uint8)
    for i in range(n):
        cx, cy = rng.uniform(8, 24, 2)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 18.0)
        out[i] = np.clip(60 + 190 * blob[..., None] * np.array([1.0, 0.6, 0.3]), 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_context_ddpm()


# ----------------------------------------------------------------- attention capture
def test_processor_computes_the_default_attention_and_records_token_softmax(model):
    from diffusers.models.attention_processor import AttnProcessor

    attn = model.unet.net.up_blocks[0].attentions[0].transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 64, attn.to_q.in_features, generator=g)
    ctx = torch.randn(2, 5, 16, generator=g)
    store = AttentionStore(("not-this-layer",))  # never complete: no early stop
    out = CaptureCrossAttention(store, "x")(attn, hidden, encoder_hidden_states=ctx)
    torch.testing.assert_close(out, AttnProcessor()(attn, hidden, encoder_hidden_states=ctx))
    maps = store.maps["x"]
    assert maps.shape == (2, 5, 8, 8)
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(2, 8, 8))  # softmax over the tokens
    store.keep = torch.tensor([3, 1])
    CaptureCrossAttention(store, "y")(attn, hidden, encoder_hidden_states=ctx)
    torch.testing.assert_close(store.maps["y"], maps[:, [3, 1]])  # a token chunk keeps those columns of the full softmax


def test_capture_reads_only_small_up_block_cross_attention_and_restores_processors(model):
    before = {k: type(v) for k, v in model.unet.net.attn_processors.items()}
    layers = cross_attention_layers(model.unet.net, SIZE, max_side=32)
    assert layers and all(n.startswith("up_blocks.") and ".attn2." in n for n in layers)
    with capture_cross_attention(model.unet.net, layers) as store:
        assert all(isinstance(model.unet.net.attn_processors[n], CaptureCrossAttention) for n in layers)
        x = torch.zeros(1, 3, SIZE, SIZE)
        maps = run_unet(model.unet.net, store, x, torch.tensor([10]), encoder_hidden_states=torch.randn(1, 7, 16))
        assert set(maps) == set(layers) and all(m.shape[:2] == (1, 7) and m.shape[-1] <= 32 for m in maps.values())
    assert {k: type(v) for k, v in model.unet.net.attn_processors.items()} == before
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="no up-block cross-attention"):
        cross_attention_layers(model.unet.net, SIZE, max_side=4)


# ----------------------------------------------------------------- losses and geometry
def test_localisation_loss_prefers_one_gaussian_bump():
    pts = torch.tensor([[[19 / 16 - 1, 11 / 16 - 1]]])  # a cell centre: the argmax is the bump's own centre
    one = gaussian_maps(pts, 16, 16, 2 * 2.0 / 16)
    two = one + gaussian_maps(torch.tensor([[[-0.6, 0.5]]]), 16, 16, 2 * 2.0 / 16)
    flat = torch.ones(1, 1, 16, 16)
    l1, l2, lf = (float(localisation_loss(m, sigma_cells=2.0)) for m in (one, two, flat))
    assert l1 < 1e-6 < l2 < lf
    assert localisation_loss(torch.cat([one, flat], 1), reduce=False).shape == (1, 2)


def test_equivariance_loss_is_small_only_for_maps_that_move_with_the_warp():
    g = torch.Generator().manual_seed(1)
    theta = random_affine(3, g, 15.0, 0.1, 0.1, shear=0.0)
    pts = torch.rand(3, 4, 2, generator=g) * 1.0 - 0.5
    maps = gaussian_maps(pts, 32, 32, 0.12)
    moved = gaussian_maps(warp_points(pts, theta), 32, 32, 0.12)
    still = maps
    assert float(equivariance_loss(maps, moved, theta)) < 0.2 * float(equivariance_loss(maps, still, theta))


def test_landmarks_of_a_warped_image_map_back_to_the_original_place():
    """What predict does per augmentation: a map of the warped image, warped back, peaks at the original point."""
    g = torch.Generator().manual_seed(2)
    theta = random_affine(4, g, 15.0, 0.1, 0.1, shear=0.0)
    pts = torch.rand(4, 2, 2, generator=g) - 0.5
    in_warped = gaussian_maps(warp_points(pts, theta), 32, 32, 0.1)
    back, valid = unwarp_maps(in_warped, theta)
    assert float((argmax_points(back) - pts).abs().max()) <= 2.0 / 32 + 1e-6  # within one cell
    assert valid.shape == (4, 1, 32, 32)


def test_augmentation_warps_depend_on_the_row_not_the_batch():
    from pipeline.methods.stablekeypoints.estimator import augmentation_warps

    cfg = StableKeypointsConfig(**TINY)
    assert torch.equal(augmentation_warps(cfg, np.array([3, 4]), 0), torch.eye(2, 3).repeat(2, 1, 1))
    whole = augmentation_warps(cfg, np.arange(6), 1)
    # the same rows in other batches get the same warps ...
    assert torch.equal(augmentation_warps(cfg, np.array([4, 1]), 1), whole[[4, 1]])
    # ... while rows, augmentations and seeds each change them
    assert not torch.allclose(whole[0], whole[1])
    assert not torch.allclose(augmentation_warps(cfg, np.arange(6), 2), whole)
    other = StableKeypointsConfig(**{**TINY, "seed": cfg.seed + 1})
    assert not torch.allclose(augmentation_warps(other, np.arange(6), 1), whole)


def test_selection_spreads_tokens_and_counts_over_images():
    pts = np.array([[0, 0], [0.1, 0], [1, 1], [1, 0.9], [0, 1]], float)
    assert set(furthest_point_sampling(pts, 3, first=0)) == {0, 2, 4}
    loss = np.tile(np.array([0.1, 0.2, 0.3, 0.4, 0.5]), (3, 1))
    per_image = tokens_per_image(loss, np.tile(pts, (3, 1, 1)), k=2, top=4)
    assert per_image.shape == (3, 2) and (per_image[:, 0] == 0).all() and (per_image[:, 1] == 2).all()
    # Token 4 is chosen twice, token 1 once: frequency wins over a lower mean loss.
    assert most_frequent_tokens(np.array([[0, 4], [0, 4], [0, 1]]), loss, 2).tolist() == [0, 4]


def test_selection_prefers_tokens_peaking_in_the_object_box_and_prediction_stays_in_it():
    """The RoI rule: a token compact on the crop border is not chosen while enough peak inside the box."""
    from pipeline.methods.landmarks import points_in_rois, roi_cell_mask

    pts = np.array([[1, 1], [30, 30], [14, 16], [18, 12], [16, 20]], float)  # crop pixels of a 32 px crop
    box = np.array([[8, 8, 24, 24]], float)
    inside = points_in_rois(pts[None], box)
    assert inside.tolist() == [[False, False, True, True, True]]
    loss = np.array([[0.01, 0.02, 0.3, 0.4, 0.5]])  # the border tokens are the best localised
    assert set(tokens_per_image(loss, pts[None], k=2, top=3).ravel()) <= {0, 1, 2}
    assert set(tokens_per_image(loss, pts[None], k=2, top=3, inside=inside).ravel()) <= {2, 3, 4}
    # Fewer inside than k: the outside ones fill up, best first.
    few = np.array([[False, False, True, False, False]])
    assert tokens_per_image(loss, pts[None], k=2, top=2, inside=few)[0].tolist() == [2, 0]
    mask = roi_cell_mask(np.array([[8, 8, 24, 24], [40, 40, 50, 50]], float), 2, 8, 32)
    assert mask[0].sum() == 16 and mask[0, 2:6, 2:6].all() and mask[1].all()  # no cell inside -> the whole map


# ----------------------------------------------------------------- the estimator
def test_fit_lowers_the_loss_resumes_exactly_and_predicts_crop_pixels(model):
    cu = from_context_ddpm(model)
    images = crops(8)
    cfg = StableKeypointsConfig(steps=18, token_chunk=12, **{k: v for k, v in TINY.items() if k != "token_chunk"})
    full = StableKeypoints(cu, cfg).fit(images)
    loss = [h["loss"] for h in full.history_]
    assert np.mean(loss[-5:]) < np.mean(loss[:5]) - 0.02, loss

    part = StableKeypoints(cu, cfg).fit(images, stop_after=7)
    state = part.state_dict()
    resumed = StableKeypoints(cu, cfg).load_state_dict(state).fit(images)
    torch.testing.assert_close(resumed.tokens_, full.tokens_, rtol=0, atol=0)

    selected = full.select(images)
    assert len(set(selected.tolist())) == cfg.k and selected.max() < cfg.n_tokens
    lm = full.predict(images[:3], rows=np.arange(3))
    assert lm.coords.shape == (3, cfg.k, 2) and lm.present.all()
    assert np.isfinite(lm.coords).all() and (lm.coords >= 0).all() and (lm.coords <= SIZE).all()
    again = full.predict(images[:3], rows=np.arange(3))
    np.testing.assert_array_equal(lm.coords, again.coords)  # fixed noise per row: deterministic


def test_context_ddpm_training_step_round_trip_and_loader(tmp_path):
    from pipeline.errors import BackboneError
    from pipeline.methods.stablekeypoints import load_conditioned_unet

    m = tiny_context_ddpm(seed=3)
    context0 = m.unet.context.detach().clone()
    losses = train_context_ddpm(m, crops(8), steps=16, batch_size=4, lr=2e-3, seed=0)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    assert not torch.equal(context0, m.unet.context)  # the context is trained with the UNet
    folder = m.save_pretrained(tmp_path / "ctx")
    loaded = load_conditioned_unet(str(folder))
    assert loaded.kind == "context-ddpm" and loaded.context_dim == 16
    x, t = torch.randn(1, 3, SIZE, SIZE), torch.tensor([5])
    again = ContextDDPM.from_pretrained(folder)
    torch.testing.assert_close(again(x, t), m(x, t))
    with pytest.raises(BackboneError, match="without cross-attention"):
        load_conditioned_unet("pixels")  # a plain DDPM is grown instead (see the tests below)
    from pipeline.backbones.loading import load_backbone

    with pytest.raises(BackboneError, match="not a feature backbone"):
        load_backbone(str(folder))


def test_context_ddpm_grown_from_a_ddpm_computes_the_ddpms_convolutions_and_heads_are_real():
    """ContextDDPM.from_ddpm: every shared tensor copied, new transformer blocks start as identity branches.

    The DDPM's own self-attention (coarsest level) has no counterpart, so with that branch
    switched off the two models must give the same noise prediction; with random (not
    zeroed) output projections they would not. Heads: ``heads`` per block, not channels // heads.
    """
    from pipeline.backbones.ddpm import CategoryDDPM, unet_arch

    torch.manual_seed(0)
    ddpm = CategoryDDPM.create(image_size=SIZE, **unet_arch((16, 32)))
    with torch.no_grad():  # switch the DDPM's self-attention branch off (its output projection -> 0)
        for name, mod in ddpm.unet.named_modules():
            if type(mod).__name__ == "Attention":
                mod.to_out[0].weight.zero_()
                mod.to_out[0].bias.zero_()
    ctx, record = ContextDDPM.from_ddpm(ddpm, n_context=3, context_dim=16, heads=2, seed=1)
    assert record["copied_tensors"] > 0 and record["new_tensors"] > 0 and record["channels"] == [16, 32]
    src = ddpm.unet.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in ctx.unet.net.state_dict().items() if k.endswith("conv1.weight") and k in src)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, SIZE, SIZE, generator=g), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.allclose(ctx(x, t), ddpm.unet(x, t).sample, atol=1e-5)
        blocks = [m for m in ctx.unet.net.modules() if type(m).__name__ == "Transformer2DModel"]
        assert blocks and all(b.proj_out.weight.abs().sum() == 0 for b in blocks)
        for b in blocks:
            b.proj_out.weight.normal_()
        assert not torch.allclose(ctx(x, t), ddpm.unet(x, t).sample, atol=1e-3)
    heads = {m.heads for n, m in ctx.unet.net.named_modules() if n.endswith("attn2")}
    assert heads == {2}


def test_a_plain_ddpm_folder_is_grown_into_a_conditioned_unet_the_same_way_every_time(tmp_path):
    """`--backbone DDPM`: StableKeypoints reads cross-attention grown on the DDPM (deterministic identity)."""
    from pipeline.backbones.ddpm import CategoryDDPM, unet_arch
    from pipeline.methods.stablekeypoints import load_conditioned_unet

    torch.manual_seed(0)
    CategoryDDPM.create(image_size=SIZE, **unet_arch((16, 32))).save_pretrained(tmp_path / "ddpm")
    a, b = load_conditioned_unet(str(tmp_path / "ddpm")), load_conditioned_unet(str(tmp_path / "ddpm"))
    assert a.kind == "context-ddpm" and a.identity == b.identity and a.identity["grown_from"]["kind"] == "ddpm"
    est = StableKeypoints(a, StableKeypointsConfig(steps=6, **TINY)).fit(crops(6))
    first, last = est.history_[0]["localisation"], est.history_[-1]["localisation"]
    assert last < first  # the tokens localise against the grown cross-attention
    assert est.select(crops(6)).shape == (TINY["k"],)


def test_backbone_train_grows_a_context_ddpm_from_a_ddpm_folder(prefect_harness, tiny_home, tmp_path):
    """`uld backbone train --kind context-ddpm --init-from DDPM`: the DDPM's widths, the transfer recorded, trained."""
    from flows.backbone import train_backbone
    from pipeline.backbones.ddpm import CategoryDDPM, unet_arch
    from pipeline.errors import ConfigError

    home, _ = tiny_home
    CategoryDDPM.create(image_size=SIZE, **unet_arch((16, 32))).save_pretrained(tmp_path / "face-ddpm")
    summary = train_backbone(dataset="synthetic", home=home, steps=3, batch_size=2, image_size=SIZE, checkpoint_every=2,
                             name="ctx-grown", kind="context-ddpm", context_tokens=3, init_from=str(tmp_path / "face-ddpm"))
    init = summary["init_from"]
    assert init["backbone"] == "face-ddpm" and init["kind"] == "ddpm -> context-ddpm" and init["transfer"]["copied_tensors"] > 0
    model = ContextDDPM.from_pretrained(summary["dir"])
    assert model.kind == "context-ddpm" and tuple(model.unet.net.config.block_out_channels) == (16, 32)
    assert summary["steps"] == 3
    # An exported context-DDPM continues as one (its checkpoints gone), and only as one.
    more = train_backbone(dataset="synthetic", home=home, steps=2, batch_size=2, image_size=SIZE, name="ctx-more",
                          kind="context-ddpm", init_from=summary["dir"])
    assert more["init_from"]["backbone"] == "ctx-grown" and "transfer" not in more["init_from"] and more["steps"] == 2
    with pytest.raises(ConfigError, match="continues only as one"):
        train_backbone(dataset="synthetic", home=home, steps=2, batch_size=2, image_size=SIZE, name="ctx-bad", init_from=summary["dir"])


def test_context_ddpm_through_the_ddpm_trainer_resumes_bit_identically(tmp_path):
    """The project's trainer (EMA, checkpoints) trains UNet + context as one module; a crash + resume changes nothing."""
    from pipeline.backbones.training import TrainConfig, train_ddpm

    cfg = TrainConfig(steps=4, batch_size=2, lr=1e-3, warmup_steps=1, checkpoint_every=2)
    ref = tiny_context_ddpm(seed=4)
    context0 = ref.unet.context.detach().clone()
    train_ddpm(ref, crops(6), cfg, checkpoint_dir=tmp_path / "ref", progress=False)
    assert not torch.equal(context0, ref.unet.context)

    def crash_at_3(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_ddpm(tiny_context_ddpm(seed=4), crops(6), cfg, checkpoint_dir=tmp_path / "run", on_step=crash_at_3, progress=False)
    resumed = tiny_context_ddpm(seed=9)
    assert train_ddpm(resumed, crops(6), cfg, checkpoint_dir=tmp_path / "run", progress=False).resumed_from == 2
    a, b = ref.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stable_diffusion_folder_goes_through_the_project_loader(tmp_path):
    from pipeline.backbones.tiny import build_tiny_sd
    from pipeline.methods.stablekeypoints import load_conditioned_unet

    cu = load_conditioned_unet(str(build_tiny_sd(tmp_path)))
    assert cu.kind == "stable-diffusion" and cu.latent_factor == 2 and cu.context_dim == 16
    est = StableKeypoints(cu, StableKeypointsConfig(steps=2, **TINY)).fit(crops(4))
    assert len(est.history_) == 2 and np.isfinite(est.history_[-1]["loss"])
    est.select(crops(4))
    lm = est.predict(crops(2))
    assert lm.coords.shape == (2, 3, 2) and (lm.coords >= 0).all() and (lm.coords <= SIZE).all()


# ----------------------------------------------------------------- flow and CLI
@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory, prefect_harness):
    """Synthetic manifests and a context-DDPM trained on their crops by `uld backbone train`'s flow (a few steps)."""
    from flows.backbone import train_backbone
    from pipeline.datasets.registry import get_loader
    from pipeline.datasets.synthetic import generate_synthetic
    from storage.layout import Workspace

    base = tmp_path_factory.mktemp("sk-flow")
    ws = Workspace(base / "workspace")
    root = generate_synthetic(ws.generated_dataset("synthetic"), 16, 8, SIZE, 0)
    for split in ("train", "test"):
        manifest, _ = get_loader("synthetic").load(root, split)
        manifest.save(ws.manifest("synthetic", split))
    summary = train_backbone(dataset="synthetic", home=ws.home, steps=4, batch_size=4, image_size=SIZE, checkpoint_every=2,
                             name="ctx", kind="context-ddpm", channels=(16, 32), context_tokens=3)
    assert summary["kind"] == "context-ddpm" and summary["steps"] == 4
    return ws.home, "ctx"  # a workspace backbone name


def test_flow_writes_keypoints_metrics_sheet_and_resumes_exactly(prefect_harness, tiny_home):
    from flows.results import read_keypoints
    from flows.stablekeypoints import stablekeypoints
    from pipeline.errors import ConfigError

    home, backbone = tiny_home
    cfg = StableKeypointsConfig(steps=4, backbone=backbone, **TINY)
    args = dict(home=home, size=SIZE, checkpoint_every=2, progress=False, threads=1)
    rows = stablekeypoints("synthetic", cfg, run_id="sk-full", **args)
    assert {"nme_forward", "nme_backward", "acc0.2_hungarian"} <= set(rows["metric"]) and set(rows["method"]) == {"stablekeypoints"}
    kp = read_keypoints(home, "sk-full")
    assert set(kp["split"]) == {"train", "test"} and len(kp) == 24 * 3 and kp["present"].all()
    run = home / "runs" / "sk-full"
    assert (run / "figures" / "stablekeypoints-test-landmarks.png").is_file()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000004"]
    assert json.loads((run / "resources.json").read_text())["peak_rss_mb"] > 0
    assert len(json.loads((run / "selection.json").read_text())["tokens"]) == 3

    stopped = stablekeypoints("synthetic", cfg, run_id="sk-resumed", stop_after=3, **args)
    assert stopped.empty and not (home / "runs" / "sk-resumed" / "keypoints.parquet").exists()
    stablekeypoints("synthetic", cfg, run_id="sk-resumed", resume=True, **args)
    cols = ["image_id", "landmark_id", "x", "y", "score"]
    a = kp[cols].sort_values(["image_id", "landmark_id"]).reset_index(drop=True)
    b = read_keypoints(home, "sk-resumed")[cols].sort_values(["image_id", "landmark_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert pd.read_parquet(home / "runs" / "sk-resumed" / "train-log.parquet")["step"].tolist() == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="different settings"):
        stablekeypoints("synthetic", StableKeypointsConfig(steps=4, backbone=backbone, **{**TINY, "k": 2}), run_id="sk-full", resume=True, **args)


def test_uld_train_method_stablekeypoints(prefect_harness, tiny_home):
    from flows import cli_train
    from tests.tiny_runs import invoke_cli

    home, backbone = tiny_home
    common = ["-d", "synthetic", "-k", "3", "--steps", "2", "--size", str(SIZE), "--batch-size", "2", "--no-progress",
              "--param", "n_tokens=8", "--param", "map_size=16", "--param", "augmentations=1", "--param", "select_images=4"]
    res = invoke_cli(home, cli_train.register, "train", "--method", "stablekeypoints", "--backbone", str(home / "backbones" / backbone),
                     *common, "--run-id", "cli-sk")
    assert res.exit_code == 0, res.output
    assert "nme_forward" in res.output and (home / "runs" / "cli-sk" / "metrics.parquet").is_file()
    cfg = json.loads((home / "runs" / "cli-sk" / "config.json").read_text())
    assert cfg["stablekeypoints"]["n_tokens"] == 8 and cfg["stablekeypoints"]["steps"] == 2
    # The pixel backbone has no UNet at all: a user error (which the CLI prints without a traceback), before any run folder.
    from pipeline.errors import BackboneError

    bad = invoke_cli(home, cli_train.register, "train", "--method", "stablekeypoints", "--backbone", "pixels", *common, "--run-id", "cli-sk2")
    assert isinstance(bad.exception, BackboneError) and "cross-attention" in str(bad.exception) and bad.exception.fix
    assert not (home / "runs" / "cli-sk2").exists()
