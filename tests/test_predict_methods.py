"""`uld predict` / `uld export-model` for every trained method beyond ZeroShot and D-ULD.

Per method, on tiny runs (synthetic heads, 24 train / 8 test at 32 px, a few steps each):
the model's predictions of the run's test images -- from the run folder through the CLI,
and from its exported bundle copied elsewhere -- agree with the keypoints.parquet rows the
run itself wrote for them (to a tolerance: the crop methods batch images differently, which
moves float32 results in the last bits). Runs: Mallis (D), D-ULD++ (its last round, a TSC
round, and one of its D-ULD rounds), Jakab, C3, StableKeypoints.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("faiss")

from tiny_runs import K, N_TEST, SIZE, invoke_cli, tiny_runs  # noqa: E402

MALLIS, DULDPP, JAKAB, C3, SK = "mallis-tiny", "duldpp-tiny", "jakab-tiny", "c3-tiny", "sk-tiny"
SK_K = 3
# D-ULD++ schedule: bootstrap (0), one D-ULD round (1), the proxy stage (2), one TSC round (3).
DULDPP_PARAMS = {"q": 2, "duld_rounds": 1, "proxy_steps": 2}
# (run id, method, bundle part, K, last round)
CASES = [
    (MALLIS, "mallis-d", "heads", K, 1),
    (DULDPP, "duld++", "tsc", K, 3),
    (JAKAB, "jakab", "condgen", K, 0),
    (C3, "c3", "condgen", K, 0),
    (SK, "stablekeypoints", "stablekeypoints", SK_K, 0),
]
# Per column: exact for flags and crop boxes; coordinates within 1e-3 crop px (mapped to the
# original image: 32 px crops of ~40 px boxes), scores within 1e-4 relative.
COORD_ATOL, SCORE_RTOL = 2e-3, 1e-4


@dataclass(frozen=True)
class MethodRuns:
    home: Path
    backbone: str  # the feature DDPM (also the condgen runs' perceptual network)
    unet: str  # StableKeypoints' context-DDPM folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_harness) -> MethodRuns:
    import torch

    from flows.condgen import condgen
    from flows.duld import duld
    from flows.stablekeypoints import stablekeypoints
    from pipeline.backbones.base import FeatureSpec
    from pipeline.backbones.context_ddpm import ContextDDPM
    from pipeline.methods.condgen import CondGenConfig
    from pipeline.methods.stablekeypoints import StableKeypointsConfig

    torch.set_num_threads(1)
    base = tiny_runs(tmp_path_factory)
    home = base.home
    engine = dict(k=K, rounds=1, steps_per_round=2, bootstrap_steps=2, batch_size=6, home=home, progress=False, views=None,
                  store_path=base.store, threads=1)
    duld("synthetic", base.backbone, FeatureSpec(image_size=SIZE), run_id=MALLIS, method="mallis-d", method_params={"m": 8}, **engine)
    duld("synthetic", base.backbone, FeatureSpec(image_size=SIZE), run_id=DULDPP, method="duld++", method_params=DULDPP_PARAMS, **engine)
    tiny = dict(steps=2, backbone=base.backbone, k=K, width=4, appearance_channels=8, batch_size=4)
    for method, run_id in (("jakab", JAKAB), ("c3", C3)):
        condgen(method, "synthetic", CondGenConfig(**tiny), home=home, size=SIZE, run_id=run_id, progress=False, threads=1)
    unet = tmp_path_factory.mktemp("sk-unet") / "ctxddpm"
    ContextDDPM.create(image_size=SIZE, channels=(16, 32), n_context=4, context_dim=16, heads=2, seed=0).save_pretrained(unet)
    sk = StableKeypointsConfig(steps=2, backbone=str(unet), k=SK_K, n_tokens=12, batch_size=2, token_chunk=6, map_size=16,
                               select_images=6, augmentations=2)
    stablekeypoints("synthetic", sk, home=home, size=SIZE, run_id=SK, progress=False, threads=1, checkpoint_every=0)
    return MethodRuns(home, base.backbone, str(unet))


def _cli(home: Path, *args: str):
    from flows import cli_predict

    return invoke_cli(home, cli_predict.register, *args)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["image_id", "landmark_id"]).reset_index(drop=True)


def _run_keypoints(home: Path, run_id: str, round_: int) -> pd.DataFrame:
    from flows.results import read_keypoints

    kp = read_keypoints(home, run_id)
    return _sorted(kp[(kp["split"] == "test") & (kp["round"] == round_)])


def _assert_agree(pred: pd.DataFrame, ref: pd.DataFrame, what: str) -> None:
    assert pred["image_id"].tolist() == ref["image_id"].tolist(), what
    assert pred["landmark_id"].tolist() == ref["landmark_id"].tolist(), what
    for col in ("present", "fallback"):
        np.testing.assert_array_equal(pred[col].to_numpy(bool), ref[col].to_numpy(bool), err_msg=f"{what}: {col}")
    for col in ("crop_x0", "crop_y0", "crop_x1", "crop_y1"):
        np.testing.assert_allclose(pred[col].to_numpy(np.float64), ref[col].to_numpy(np.float64), rtol=0, atol=1e-4, err_msg=f"{what}: {col}")
    for col in ("x", "y"):
        np.testing.assert_allclose(pred[col].to_numpy(np.float64), ref[col].to_numpy(np.float64), rtol=0, atol=COORD_ATOL, err_msg=f"{what}: {col}")
    np.testing.assert_allclose(pred["score"].to_numpy(np.float64), ref["score"].to_numpy(np.float64), rtol=SCORE_RTOL, atol=1e-6,
                               err_msg=f"{what}: score")


@pytest.mark.parametrize("run_id,method,part,k,last", CASES, ids=[c[1] for c in CASES])
def test_run_and_bundle_predictions_reproduce_the_runs_test_keypoints(runs, tmp_path, run_id, method, part, k, last):
    from flows.predict import dataset_items
    from pipeline.predictor import LandmarkPredictor
    from storage.tables import read_metadata, read_table

    kp = _run_keypoints(runs.home, run_id, last)
    assert len(kp) == N_TEST * k and set(kp["method"]) == {method}

    # 1. from the run folder, through the CLI (the run's own split, with the manifest's boxes)
    out = tmp_path / "pred.parquet"
    res = _cli(runs.home, "predict", "--model", run_id, "--dataset", "synthetic", "--split", "test", "--out", str(out), "--no-progress")
    assert res.exit_code == 0, res.output
    assert f"predicted {N_TEST} image(s)" in res.output and "skipped 0" in res.output
    from_run = _sorted(read_table(out, "predictions"))
    assert set(from_run["method"]) == {method} and read_metadata(out)["source"]["run_id"] == run_id
    _assert_agree(from_run, kp, f"{method} run")

    # 2. exported, copied elsewhere (the original removed), loaded from the copy
    res = _cli(runs.home, "export-model", "--model", run_id, "--out", str(tmp_path / "model"))
    assert res.exit_code == 0, res.output
    copy = tmp_path / "elsewhere" / "my-model"
    shutil.copytree(tmp_path / "model", copy)
    shutil.rmtree(tmp_path / "model")
    cfg = json.loads((copy / "predictor.json").read_text())
    assert cfg["method"] == method and cfg["part"] == part and cfg["k"] == k and cfg["crop"]["size"] == SIZE
    assert cfg["source"]["run_id"] == run_id and cfg["backbone"]["spec"]
    bundle = LandmarkPredictor.from_pretrained(copy)
    assert type(bundle.part).__name__ == type(LandmarkPredictor.from_pretrained(runs.home / "runs" / run_id, load_backbone=False).part).__name__
    items = dataset_items(runs.home, "synthetic", "test", bundle)
    from_bundle = _sorted(bundle.predict(items, batch_size=bundle.eval_batch, progress=False))
    _assert_agree(from_bundle, kp, f"{method} bundle")
    # run and bundle are the same model: on the same batches they agree exactly
    pd.testing.assert_frame_equal(from_bundle, from_run, check_dtype=False)

    # 3. new images (paths, whole-image boxes): run and bundle agree; every landmark in its crop
    # (the crop methods read the whole crop, its padding included: not always inside the image)
    paths = sorted({str(p) for p in from_run["image"]})[:2]
    a = LandmarkPredictor.from_pretrained(runs.home / "runs" / run_id).predict(paths, progress=False)
    b = bundle.predict(paths, progress=False)
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 2 * k and a["present"].all()
    assert (a["x"] >= a["crop_x0"]).all() and (a["x"] <= a["crop_x1"]).all() and (a["y"] >= a["crop_y0"]).all() and (a["y"] <= a["crop_y1"]).all()


def test_bundles_hold_what_each_method_needs(runs, tmp_path):
    from pipeline.predictor import LandmarkPredictor

    expect = {
        MALLIS: ["heads/centroids.npy", "heads/config.json", "heads/model.safetensors"],
        DULDPP: ["heads/centroids.npy", "heads/labeller.npz", "heads/vae.json", "heads/vae.safetensors"],
        JAKAB: ["condgen/model.safetensors"],
        SK: ["stablekeypoints/tokens.safetensors"],
    }
    for run_id, files in expect.items():
        p = LandmarkPredictor.from_pretrained(runs.home / "runs" / run_id, load_backbone=False)
        folder = p.save_pretrained(tmp_path / run_id)
        have = {str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()}
        assert set(files) <= have, (run_id, have)
        assert ("projections.safetensors" in have) == bool(p.recipe is not None and p.recipe.projections)
        cfg = json.loads((folder / "predictor.json").read_text())
        if run_id == JAKAB:
            # Jakab / C3 predict from crops alone: the DDPM was the perceptual loss, recorded, never loaded
            assert cfg["backbone"]["use"] == "training-only" and "features" not in cfg and cfg["condgen"]["config"]["k"] == K
        elif run_id == SK:
            assert cfg["backbone"]["use"] == "conditioned-unet" and cfg["backbone"]["identity"]["weights"]
            assert cfg["stablekeypoints"]["k"] == SK_K and "features" not in cfg
        else:
            assert cfg["backbone"]["use"] == "features" and cfg["features"]["spec"]["image_size"] == SIZE


def test_duldpp_d_uld_round_reads_out_like_d_uld(runs, tmp_path):
    """A D-ULD++ run's D-ULD rounds (before its proxy stage) are D-ULD heads + centroids, the TSC rounds not."""
    from pipeline.predictor import HeadsPart, LandmarkPredictor, TSCPart
    from storage.tables import read_table

    p = LandmarkPredictor.from_pretrained(runs.home / "runs" / DULDPP, round_=1, load_backbone=False)
    assert type(p.part) is HeadsPart and p.source["stage"] == "round"
    assert type(LandmarkPredictor.from_pretrained(runs.home / "runs" / DULDPP, round_=2, load_backbone=False).part) is TSCPart
    out = tmp_path / "r1.parquet"
    res = _cli(runs.home, "predict", "--model", DULDPP, "--round", "1", "--dataset", "synthetic", "--split", "test", "--out", str(out), "--no-progress")
    assert res.exit_code == 0, res.output
    _assert_agree(_sorted(read_table(out, "predictions")), _run_keypoints(runs.home, DULDPP, 1), "duld++ round 1")


def test_tsc_readout_uses_each_images_pose_cluster(runs):
    """The TSC part's per-image centroids are the labeller's identity centres of the image's pose code."""
    from flows.predict import dataset_items
    from pipeline.methods.duldpp import pose_codes
    from pipeline.predictor import LandmarkPredictor, _feature_tensors

    p = LandmarkPredictor.from_pretrained(runs.home / "runs" / DULDPP)
    items = dataset_items(runs.home, "synthetic", "test", p)
    feats = [o[0] for o in p._encode_group(items) if not isinstance(o, str)]
    kept = [i.keep for i in items]
    tb = _feature_tensors({k: np.concatenate([f[k] for f, keep in zip(feats, kept) if keep]) for k in p.recipe.keys})
    centers, per_image = p.part._readout(tb)
    _, codes = pose_codes(p.part.heads, p.part.vae, [tb])
    got = per_image(np.arange(N_TEST))
    assert got.shape == (N_TEST, K, centers.shape[1])
    np.testing.assert_array_equal(got, p.part.labeller.identity_centers(codes))
    pose = p.part.labeller.predict_pose(codes)
    for i in range(N_TEST):  # row g of an image's centroids is its pose cluster's local centroid with identity g
        local = p.part.labeller.centers_[pose[i]]
        for g in range(K):
            c = int(np.flatnonzero(p.part.labeller.identities_[pose[i]] == g)[0])
            np.testing.assert_array_equal(got[i, g], local[c])


def test_backbone_rules_per_method(runs, tmp_path):
    from pipeline.errors import BackboneError, ConfigError
    from pipeline.predictor import LandmarkPredictor
    from tiny_runs import make_backbone

    # Jakab / C3 load no backbone and refuse one
    p = LandmarkPredictor.from_pretrained(runs.home / "runs" / C3)
    assert p.backbone is None and not p.needs_backbone
    with pytest.raises(ConfigError, match="needs no backbone"):
        LandmarkPredictor.from_pretrained(runs.home / "runs" / C3, backbone=runs.backbone)
    # StableKeypoints refuses another UNet (identity), also a feature DDPM (grown into another UNet)
    from pipeline.backbones.context_ddpm import ContextDDPM

    other = tmp_path / "other-ctx"
    ContextDDPM.create(image_size=SIZE, channels=(16, 32), n_context=4, context_dim=16, heads=2, seed=1).save_pretrained(other)
    with pytest.raises(BackboneError, match="identity differs in weights"):
        LandmarkPredictor.from_pretrained(runs.home / "runs" / SK, backbone=str(other))
    with pytest.raises(BackboneError, match="identity differs in grown_from, weights"):
        LandmarkPredictor.from_pretrained(runs.home / "runs" / SK, backbone=make_backbone(tmp_path / "ddpm"))
    # a D-ULD++ bundle missing its VAE is a user error naming the fix
    folder = LandmarkPredictor.from_pretrained(runs.home / "runs" / DULDPP, load_backbone=False).save_pretrained(tmp_path / "pp")
    (folder / "heads" / "vae.safetensors").unlink()
    from pipeline.errors import StoreError

    with pytest.raises(StoreError, match="pose VAE") as err:
        LandmarkPredictor.from_pretrained(folder, load_backbone=False)
    assert "copy the whole model folder" in err.value.fix


def test_stablekeypoints_predictions_do_not_depend_on_the_batch_size(runs):
    """StableKeypoints seeds an image's noise and augmentation warps by its row alone, so any
    --batch-size gives the same landmarks (batch-position warps moved them by 20-28 px)."""
    from flows.datasets import load_manifest
    from pipeline.predictor import LandmarkPredictor

    p = LandmarkPredictor.from_pretrained(runs.home / "runs" / SK)
    paths = load_manifest(runs.home, "synthetic", "test").frame["path"].tolist()[:5]
    ref = p.predict(paths, batch_size=16, progress=False)
    for bs in (1, 3):
        pd.testing.assert_frame_equal(p.predict(paths, batch_size=bs, progress=False), ref)


def test_unfinished_image_run_is_a_user_error(runs, tmp_path):
    from pipeline.errors import StoreError
    from pipeline.predictor import LandmarkPredictor

    run = runs.home / "runs" / "sk-unselected"
    shutil.copytree(runs.home / "runs" / SK, run)
    (run / "selection.json").unlink()
    with pytest.raises(StoreError, match="not selected its K tokens") as err:
        LandmarkPredictor.from_pretrained(run, load_backbone=False)
    assert "--resume" in err.value.fix
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(StoreError, match="no finished checkpoint"):
        LandmarkPredictor.from_pretrained(run, load_backbone=False)
    with pytest.raises(StoreError, match="only round 0"):
        LandmarkPredictor.from_pretrained(runs.home / "runs" / JAKAB, round_=2)


def test_checkpoint_file_names_agree_with_the_flows():
    from flows import condgen, duld, duldpp_stages, stablekeypoints
    from pipeline import predictor

    assert (predictor.VAE_WEIGHTS, predictor.VAE_CONFIG) == (duldpp_stages.VAE_WEIGHTS, duldpp_stages.VAE_CONFIG)
    assert predictor.LABELLER_NAME == duld.LABELLER_NAME and predictor.TSC_STAGES == (duld.PROXY, duld.DULDPP)
    assert predictor.CONDGEN_WEIGHTS == condgen.WEIGHTS_NAME and predictor.SK_TOKENS == stablekeypoints.TOKENS_NAME
    assert set(predictor.RUN_METHODS) == set(predictor.METHODS)
    assert set(duld.ENGINE_METHODS) | {"zeroshot", "jakab", "c3", "stablekeypoints"} == set(predictor.RUN_METHODS)


def test_bundles_written_before_the_method_parts_still_load(runs, tmp_path):
    """A ZeroShot / D-ULD bundle of the first format (no ``part``, ``crop`` or backbone ``use``) loads as before."""
    from flows.datasets import load_manifest
    from pipeline.predictor import LandmarkPredictor
    from tiny_runs import DULD_RUN, ZEROSHOT_RUN

    paths = load_manifest(runs.home, "synthetic", "test").frame["path"].tolist()[:2]
    for run_id in (ZEROSHOT_RUN, DULD_RUN):
        p = LandmarkPredictor.from_pretrained(runs.home / "runs" / run_id)
        folder = p.save_pretrained(tmp_path / run_id)
        cfg = json.loads((folder / "predictor.json").read_text())
        for key in ("part", "crop"):
            del cfg[key]
        del cfg["backbone"]["use"]
        (folder / "predictor.json").write_text(json.dumps(cfg))
        old = LandmarkPredictor.from_pretrained(folder)
        assert type(old.part) is type(p.part) and old.crop == p.crop and old.backbone_ref.use == "features"
        pd.testing.assert_frame_equal(old.predict(paths, progress=False), p.predict(paths, progress=False))
