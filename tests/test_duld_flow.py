"""D-ULD: pseudo-labels, prediction fallback, training, and the Prefect flow end to end
(2 rounds on a tiny synthetic dataset, a crash in round 2 resumed through the CLI and
compared with an uninterrupted run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.heads import ULDHeadsConfig
from pipeline.methods.duld import (
    DULDConfig,
    KeypointSet,
    build_model,
    make_optimizer,
    predict_landmarks,
    pseudo_labels,
    seeded_generator,
    train_bootstrap,
)

torch.set_num_threads(1)

SHAPES = {"a@t50": (8, 4, 4), "b@t50": (6, 8, 8)}


def _batches(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = {k: torch.randn(n, *s, generator=g) for k, s in SHAPES.items()}
    return {"index": torch.arange(n), "features": feats}


def test_exemplar_pseudo_labels_keep_the_nearest_keypoint_per_cluster():
    centers = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    # image rows 10 and 11; image 11 has nothing near cluster 1 or 2
    kp = KeypointSet(
        rows=np.array([10, 10, 10, 11, 11]),
        xy=np.array([[1, 1], [2, 2], [3, 3], [4, 4], [5, 5]], np.float32),
        score=np.ones(5, np.float32),
        desc=np.array([[0.9, 0.1], [0.6, 0.0], [0.1, 0.9], [0.95, 0.0], [0.7, 0.1]], np.float32),
    )
    pl = pseudo_labels(kp, centers, np.array([10, 11, 12]))
    assert pl.present.tolist() == [[True, True, False], [True, False, False], [False, False, False]]
    assert pl.coords[0, 0].tolist() == [1, 1]  # (0.9, 0.1) is nearer (1, 0) than (0.6, 0)
    assert pl.coords[0, 1].tolist() == [3, 3]
    assert pl.coords[1, 0].tolist() == [4, 4]
    assert np.isnan(pl.coords[2]).all()
    assert pl.distance[0, 0] == pytest.approx(0.02, abs=1e-6)
    coords, present = pl.lookup(torch.tensor([11, 10]))
    assert present.tolist() == [[True, False, False], [True, True, False]]
    assert coords[0, 1].tolist() == [0.0, 0.0]  # absent -> 0, masked by present
    with pytest.raises(ConfigError, match="no pseudo-labels"):
        pl.lookup(torch.tensor([99]))


def test_prediction_uses_fallback_for_absent_clusters_and_flags_it():
    cfg = DULDConfig(k=3, top_k=2)
    model = build_model(ULDHeadsConfig.from_feature_shapes(SHAPES, crop_size=16, channels=8, hidden=8, descriptor_dim=4), 0)
    batch = _batches(4)
    out = model(batch["features"])
    # centroid 0 = a real descriptor (found by exemplar assignment or fallback), 1 and 2 far from all
    centers = np.stack([out.descriptors[0, :, 3, 3].detach().numpy(), np.full(4, 5.0), np.full(4, -5.0)]).astype(np.float32)
    pred = predict_landmarks(model, [batch], centers, cfg, progress=False)
    assert pred.landmarks.coords.shape == (4, 3, 2) and pred.landmarks.present.all()
    assert pred.fallback.shape == (4, 3)
    assert pred.rows.tolist() == [0, 1, 2, 3]
    assert np.isfinite(pred.landmarks.coords).all()
    assert (pred.landmarks.coords >= 0).all() and (pred.landmarks.coords <= 16).all()
    # with only top_k=2 keypoints per image, at least one cluster must come from the fallback
    assert pred.fallback.sum(1).min() >= 1


def test_keypoints_record_which_are_heatmap_maxima_when_the_fit_reads_only_those():
    from pipeline.heads.detector import local_maxima
    from pipeline.methods.duld import extract_keypoints

    model = build_model(ULDHeadsConfig.from_feature_shapes(SHAPES, crop_size=16, channels=8, hidden=8, descriptor_dim=4), 0)
    batch = _batches(3)
    dense = extract_keypoints(model, [batch], DULDConfig(k=3, top_k=10), progress=False)
    assert dense.peak is None and len(dense.peaks()) == 30
    kp = extract_keypoints(model, [batch], DULDConfig(k=3, top_k=10, cluster_nms_radius=1), progress=False)
    assert np.array_equal(kp.desc, dense.desc) and kp.peak is not None and 0 < kp.peak.sum() < 30
    # the flags are those of the heatmap itself: every image's strongest cell is a maximum
    heat = torch.sigmoid(model(batch["features"]).logits)
    best = heat.flatten(1).argmax(1)
    cells = torch.stack([best % 8, best // 8], -1).float()[:, None]
    assert local_maxima(heat, cells, 1).all()
    first = np.array([np.flatnonzero(kp.rows == r)[0] for r in range(3)])  # top-k is sorted: the strongest first
    assert kp.peak[first].all()
    with pytest.raises(ConfigError, match="cluster_nms_radius"):
        DULDConfig(cluster_nms_radius=-1)


def test_detector_gates_come_from_the_call_then_the_backbone_then_the_config(tmp_path):
    from flows.duld import detector_gates
    from pipeline.errors import BackboneError

    folder = tmp_path / "face-ddpm"
    folder.mkdir()
    meta = {"kind": "ddpm", "method_defaults": {"duld": {"top_k": 60, "cluster_nms_radius": 1}, "from": "a measurement"}}
    (folder / "uld_backbone.json").write_text(json.dumps(meta))
    gates = detector_gates(str(folder), "duld", tmp_path, top_k=None, cluster_nms_radius=None, threshold=None)
    # (no capsys here: the first import of the flows under capture binds Prefect's console to a
    # stream that closes with the test)
    assert gates == {"top_k": 60, "cluster_nms_radius": 1}
    cfg = DULDConfig(**gates)
    assert cfg.top_k == 60 and cfg.cluster_nms_radius == 1 and cfg.nms_radius == DULDConfig().nms_radius
    # what the caller sets wins; other methods and backbones without the entry get nothing
    assert detector_gates(str(folder), "duld", tmp_path, top_k=30)["top_k"] == 30
    assert detector_gates(str(folder), "duld++", tmp_path, top_k=None) == {"top_k": 60, "cluster_nms_radius": 1}  # its D-ULD stage
    assert detector_gates(str(folder), "mallis-d", tmp_path, top_k=None) == {}
    assert detector_gates("pixels", "duld", tmp_path, top_k=None) == {}
    # the shipped face backbone records its measured setting; the synthetic one records none
    assert detector_gates(str(Path(__file__).parents[1] / "pipeline" / "assets" / "ddpm-mtfl-64"), "duld", None) == {"top_k": 60, "cluster_nms_radius": 1}
    assert detector_gates("shipped", "duld", None) == {}
    meta["method_defaults"]["duld"]["topk"] = 5  # a typo is an error naming the entry, not ignored
    (folder / "uld_backbone.json").write_text(json.dumps(meta))
    with pytest.raises(BackboneError, match="topk"):
        detector_gates(str(folder), "duld", tmp_path)


def _with_view(batch: dict, seed: int = 1) -> dict:
    """The batch plus a second view: here a known warp of its maps, with the transform a view store would carry."""
    from pipeline.heads.augment import AugmentConfig, random_affine, warp_features

    aff = random_affine(len(batch["index"]), AugmentConfig(), torch.Generator().manual_seed(seed))
    n = len(batch["index"])
    return {**batch, "view_features": warp_features(batch["features"], aff), "view_affine": aff, "view_flip": torch.zeros(n, dtype=torch.bool)}


def test_bootstrap_reduces_its_loss_on_a_fixed_batch():
    batch = _with_view(_batches(6))
    for cfg, b in ((DULDConfig(), batch), (DULDConfig(views=None), _batches(6))):  # view pairs, then the feature-warp shortcut
        model = build_model(ULDHeadsConfig.from_feature_shapes(SHAPES, crop_size=16, channels=16, hidden=16, descriptor_dim=8), 0)
        opt = make_optimizer(model, 3e-3)
        log = train_bootstrap(model, opt, iter([b] * 60), 60, cfg, seeded_generator(0, "bootstrap", 0), progress=False)
        first, last = np.mean([r["descriptor"] for r in log[:10]]), np.mean([r["descriptor"] for r in log[-10:]])
        assert last < first - 0.1, (first, last)
    with pytest.raises(ConfigError, match="ran dry"):
        train_bootstrap(model, opt, iter([batch]), 2, DULDConfig(), seeded_generator(0, "bootstrap", 0), progress=False)
    # configured for views but given plain batches: an actionable error, not a silent fallback to warps
    with pytest.raises(ConfigError, match="augmented views"):
        train_bootstrap(model, opt, iter([_batches(6)]), 1, DULDConfig(), seeded_generator(0, "bootstrap", 0), progress=False)


def test_self_training_keeps_flipped_views_out_of_the_descriptor_terms():
    from pipeline.methods.duld import self_training_step

    model = build_model(ULDHeadsConfig.from_feature_shapes(SHAPES, crop_size=16, channels=8, hidden=8, descriptor_dim=4), 0)
    batch = _with_view(_batches(4))
    coords = torch.tensor([[[4.0, 4.0], [8.0, 8.0], [12.0, 6.0]]]).expand(4, 3, 2).clone()
    present = torch.ones(4, 3, dtype=torch.bool)
    g = seeded_generator(0, "round", 1)
    plain = self_training_step(model, batch, coords, present, DULDConfig(k=3), g)
    flipped = self_training_step(model, {**batch, "view_flip": torch.ones(4, dtype=torch.bool)}, coords, present, DULDConfig(k=3), g)
    # the detector term is the same (positions are positions), the descriptor terms lose view B
    assert flipped["detector"].item() == pytest.approx(plain["detector"].item())
    assert flipped["contrastive"].item() != pytest.approx(plain["contrastive"].item())
    assert flipped["matching"].item() == 0.0  # no cell of a flipped view is matched


def test_config_validation():
    with pytest.raises(ConfigError, match="lr"):
        DULDConfig(lr=0)
    with pytest.raises(ConfigError, match="k"):
        DULDConfig(k=0)
    cfg = DULDConfig(k=4)
    assert DULDConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


# ------------------------------------------------------------------ the flow, end to end

N_TRAIN, N_TEST, SIZE = 24, 8, 32
FLOW_ARGS = dict(k=4, rounds=2, steps_per_round=3, bootstrap_steps=4, lr=1e-3, batch_size=6, seed=0, progress=False)


@pytest.fixture(scope="module")
def tiny_workspace(tmp_path_factory, prefect_harness):
    """Synthetic heads -> manifests -> features of a small random-init DDPM saved as a backbone folder."""
    from flows.features import extract_features
    from pipeline.backbones.base import FeatureSpec
    from pipeline.backbones.ddpm import CategoryDDPM
    from pipeline.datasets.registry import get_loader
    from pipeline.datasets.synthetic import generate_synthetic
    from storage.layout import Workspace

    home = tmp_path_factory.mktemp("duld") / "ws"
    ws = Workspace(home)
    root = generate_synthetic(ws.generated_dataset("synthetic"), N_TRAIN, N_TEST, SIZE, 0)
    for split in ("train", "test"):
        manifest, _ = get_loader("synthetic").load(root, split)
        manifest.save(ws.manifest("synthetic", split))
    torch.manual_seed(0)
    backbone = CategoryDDPM.create(image_size=SIZE, name="tinyddpm", block_out_channels=(8, 8, 16, 16), attention_head_dim=8, norm_num_groups=4)
    bdir = home.parent / "tinyddpm"
    backbone.save_pretrained(bdir)
    spec = FeatureSpec(image_size=SIZE)
    extract_features("synthetic", str(bdir), spec, home=home, batch_size=16)
    return home, str(bdir), spec


def _cli(home: Path, *args: str):
    import typer
    from typer.testing import CliRunner

    from flows import cli, cli_duld

    app = typer.Typer()
    app.callback()(cli._main)
    cli_duld.register(app)
    return CliRunner().invoke(app, ["--home", str(home), "--seed", "0", *args])


def test_duld_flow_two_rounds_then_crash_and_resume(tiny_workspace, monkeypatch):
    from flows import duld as duld_flow
    from storage.layout import Workspace
    from storage.tables import read_table

    home, backbone, spec = tiny_workspace
    ws = Workspace(home)

    # 1) uninterrupted run
    table = duld_flow.duld("synthetic", backbone, spec, home=home, run_id="full", **FLOW_ARGS)
    assert table["round"].tolist() == [0, 1, 2]
    assert np.isfinite(table[["nme_forward", "nme_backward"]].to_numpy()).all()
    run = ws.run_dir("full")
    for stage in ("bootstrap-000", "round-001", "round-002"):
        assert (run / "checkpoints" / stage / "state.json").is_file()
        assert (run / "checkpoints" / stage / "model.safetensors").is_file()
    pl = read_table(run / "pseudolabels.parquet", "pseudolabels")
    assert sorted(pl["round"].unique()) == [1, 2]
    assert pl["landmark_id"].between(0, 3).all()
    metrics = read_table(run / "metrics.parquet", "metrics")
    assert sorted(metrics["round"].unique()) == [0, 1, 2]
    kp = read_table(run / "keypoints.parquet", "keypoints")
    assert set(kp["split"]) == {"train", "test"} and len(kp) == 3 * (N_TRAIN + N_TEST) * 4
    log = pd.read_parquet(run / "train-log.parquet")
    assert len(log) == 4 + 2 * 3
    assert len(pd.read_parquet(run / "round-002-keypoints.parquet")) > 0

    # 2) a run killed in the middle of round 2's training ...
    real = duld_flow.train_self_round

    def crash_in_round_2(*args, **kwargs):
        if kwargs.get("desc") == "round 2":
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(duld_flow, "train_self_round", crash_in_round_2)
    with pytest.raises(Exception, match="simulated crash"):
        duld_flow.duld("synthetic", backbone, spec, home=home, run_id="crash", **FLOW_ARGS)
    monkeypatch.setattr(duld_flow, "train_self_round", real)
    crash = ws.run_dir("crash")
    assert (crash / "checkpoints" / "round-001" / "state.json").is_file()
    assert not (crash / "checkpoints" / "round-002" / "state.json").exists()
    finished_before = {s: (crash / "checkpoints" / s / "state.json").stat().st_mtime_ns for s in ("bootstrap-000", "round-001")}

    # ... is refused without --resume, then resumed through the CLI from round 2
    res = _cli(home, "duld", "--dataset", "synthetic", "--backbone", backbone, "--run-id", "crash", "-k", "4", "--size", str(SIZE),
               "--rounds", "2", "--steps-per-round", "3", "--bootstrap-steps", "4", "--batch-size", "6", "--no-progress")
    assert res.exit_code != 0 and "already exists" in str(res.exception)
    res = _cli(home, "duld", "--dataset", "synthetic", "--backbone", backbone, "--run-id", "crash", "--resume", "-k", "4",
               "--size", str(SIZE), "--rounds", "2", "--steps-per-round", "3", "--bootstrap-steps", "4", "--batch-size", "6", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "nme_forward" in res.output and "round" in res.output
    assert "run: crash" in res.output
    # finished stages were not redone
    assert finished_before == {s: (crash / "checkpoints" / s / "state.json").stat().st_mtime_ns for s in finished_before}

    # the resumed run equals the uninterrupted one (seeded, deterministic on CPU)
    from safetensors.torch import load_file

    a = load_file(str(run / "checkpoints" / "round-002" / "model.safetensors"))
    b = load_file(str(crash / "checkpoints" / "round-002" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta = duld_flow.nme_table(home, "full")
    tb = duld_flow.nme_table(home, "crash")
    assert np.allclose(ta[["nme_forward", "nme_backward"]].to_numpy(), tb[["nme_forward", "nme_backward"]].to_numpy())
    # the round re-run replaced its rows instead of duplicating them
    assert len(read_table(crash / "pseudolabels.parquet", "pseudolabels")) == len(pl)

    # a resume with other settings is refused with an actionable error
    with pytest.raises(ConfigError, match="different settings"):
        duld_flow.duld("synthetic", backbone, spec, home=home, run_id="crash", resume=True, **{**FLOW_ARGS, "k": 5})


def test_cli_help_and_missing_features_error(tmp_path, prefect_harness):
    res = _cli(tmp_path, "duld", "--help")
    assert res.exit_code == 0
    for opt in ("--rounds", "--steps-per-round", "--bootstrap-steps", "--resume", "--run-id", "--lr", "-k"):
        assert opt in res.output
    # no manifests / features in an empty workspace: a ULDError naming the fix, not a traceback
    from pipeline.errors import ULDError

    res = _cli(tmp_path, "duld", "--dataset", "synthetic", "--no-progress")
    assert res.exit_code != 0 and isinstance(res.exception, ULDError)
    assert res.exception.fix
