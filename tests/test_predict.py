"""`uld predict` / LandmarkPredictor: new images through a trained ZeroShot or D-ULD model.

The acceptance check: predicting a run's own test images (with the manifest's
boxes) gives exactly the run's keypoints.parquet rows, for both methods.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("faiss")

from tiny_runs import invoke_cli, DULD_RUN, K, N_TEST, SIZE, ZEROSHOT_RUN, make_backbone, tiny_runs  # noqa: E402

COMPARED = ["x", "y", "score", "present", "fallback", "crop_x0", "crop_y0", "crop_x1", "crop_y1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_harness):
    return tiny_runs(tmp_path_factory)


def _cli(home: Path, *args: str):
    from flows import cli_predict

    return invoke_cli(home, cli_predict.register, *args)


def _run_test_keypoints(home: Path, run_id: str) -> pd.DataFrame:
    from flows.results import read_keypoints

    kp = read_keypoints(home, run_id)
    last = kp["round"].max()
    return kp[(kp["split"] == "test") & (kp["round"] == last)].sort_values(["image_id", "landmark_id"]).reset_index(drop=True)


def _test_images(home: Path, n: int | None = None) -> list[str]:
    from flows.datasets import load_manifest

    paths = load_manifest(home, "synthetic", "test").frame["path"].tolist()
    return paths[:n] if n else paths


@pytest.mark.parametrize("run_id", [ZEROSHOT_RUN, DULD_RUN])
def test_predict_on_a_runs_test_split_reproduces_its_keypoints(runs, tmp_path, run_id):
    out = tmp_path / "pred.parquet"
    res = _cli(runs.home, "predict", "--model", run_id, "--dataset", "synthetic", "--split", "test", "--out", str(out), "--no-progress")
    assert res.exit_code == 0, res.output
    assert f"predicted {N_TEST} image(s)" in res.output and "skipped 0" in res.output
    from storage.tables import read_metadata, read_table

    pred = read_table(out, "predictions").sort_values(["image_id", "landmark_id"]).reset_index(drop=True)
    kp = _run_test_keypoints(runs.home, run_id)
    assert len(pred) == len(kp) == N_TEST * K
    assert pred["image_id"].tolist() == kp["image_id"].tolist()
    # Exact: the on-the-fly features are the store's, bit for bit (same crops, noise, batches, float16).
    for col in COMPARED:
        np.testing.assert_array_equal(pred[col].to_numpy(), kp[col].to_numpy(), err_msg=col)
    assert read_metadata(out)["source"]["run_id"] == run_id
    # every method run draws its landmarks on test crops (same landmark, same colour)
    assert (runs.home / "runs" / run_id / "figures" / f"{run_id.split('-')[0]}-test-landmarks.png").is_file()


def test_on_the_fly_features_equal_the_store_and_batches_matter(runs):
    import dataclasses

    from flows.predict import dataset_items
    from pipeline.predictor import LandmarkPredictor
    from storage.features import FeatureStore

    p = LandmarkPredictor.from_pretrained(runs.home / "runs" / ZEROSHOT_RUN)
    items = dataset_items(runs.home, "synthetic", "test", p)
    # the 8 test images share their store batch with the last 8 training images: those come along, not kept
    assert sum(i.keep for i in items) == N_TEST and len(items) == 16 and len({i.group for i in items}) == 1
    store = FeatureStore.open(runs.store)
    rows = np.array([i.noise_index for i in items])
    ref = store.read_indices(rows)
    out = p._encode_group(items)
    for key in store.keys:
        np.testing.assert_array_equal(np.concatenate([o[0][key] for o in out]), ref[key], err_msg=key)
    # Without the batch mates (a batch of 8, not 16) the float16 features differ in a few last bits:
    # why dataset_items reproduces the store's batches.
    alone = p._encode_group([dataclasses.replace(i, group=None) for i in items if i.keep])
    kept = np.array([i.keep for i in items])
    key = store.keys[0]
    assert not np.array_equal(np.concatenate([o[0][key] for o in alone]), ref[key][kept])


def test_python_api_in_three_lines_and_whole_image_crops(runs):
    from pipeline import LandmarkPredictor

    p = LandmarkPredictor.from_pretrained(runs.home / "runs" / ZEROSHOT_RUN)
    df = p.predict(_test_images(runs.home, 2), progress=False)

    assert list(df.columns)[:4] == ["image", "image_id", "method", "landmark_id"]
    assert len(df) == 2 * K and df["present"].all() and (df["score"] <= 0).all()  # ZeroShot score = -squared distance
    # unlabelled images: the folder dataset's crop rule (object box = the whole image)
    from pipeline.datasets.crop import crop_boxes
    from pipeline.datasets.registry import get_loader

    root = Path(_test_images(runs.home, 1)[0]).parent
    folder = [get_loader("folder").load(root, split)[0] for split in ("train", "test")]
    by_path = {path: box for m in folder for path, box in zip(m.frame["path"], crop_boxes(m.boxes(), p.recipe.spec.crop_margin))}
    for image, rows in df.groupby("image"):
        box = rows[["crop_x0", "crop_y0", "crop_x1", "crop_y1"]].to_numpy()[0]
        np.testing.assert_allclose(box, by_path[str(Path(image).absolute())], rtol=0, atol=1e-4)
        # landmarks lie in the image (the RoI is the image part of the crop)
        assert rows["x"].between(0, SIZE).all() and rows["y"].between(0, SIZE).all()


def test_exported_model_is_a_copyable_folder_that_predicts_the_same(runs, tmp_path):
    res = _cli(runs.home, "export-model", "--model", DULD_RUN, "--out", str(tmp_path / "model"))
    assert res.exit_code == 0, res.output
    copy = tmp_path / "elsewhere" / "my-model"
    shutil.copytree(tmp_path / "model", copy)
    shutil.rmtree(tmp_path / "model")
    import json

    cfg = json.loads((copy / "predictor.json").read_text())
    assert cfg["method"] == "duld" and cfg["backbone"]["identity"]["weights"] and cfg["features"]["spec"]["image_size"] == SIZE
    assert (copy / "heads" / "model.safetensors").is_file() and (copy / "heads" / "centroids.npy").is_file()

    from pipeline.predictor import LandmarkPredictor

    images = _test_images(runs.home, 3)
    a = LandmarkPredictor.from_pretrained(runs.home / "runs" / DULD_RUN).predict(images, progress=False)
    b = LandmarkPredictor.from_pretrained(copy).predict(images, progress=False)
    pd.testing.assert_frame_equal(a, b)
    assert a["fallback"].dtype == bool and a["present"].all()  # D-ULD gives all K landmarks (some by fallback)


def test_unreadable_images_are_skipped_listed_and_the_rest_predicted(runs, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    good = _test_images(runs.home, 2)
    for src in good:
        shutil.copy(src, folder / Path(src).name)
    (folder / "truncated.png").write_bytes(Path(good[0]).read_bytes()[:60])
    (folder / "notes.jpg").write_text("not an image")
    out = tmp_path / "p.parquet"
    res = _cli(runs.home, "predict", "--model", ZEROSHOT_RUN, "--images", str(folder), "--out", str(out), "--overlays", str(tmp_path / "ov"), "--no-progress")
    assert res.exit_code == 0, res.output
    assert "skipped images:" in res.output and "truncated.png" in res.output and "notes.jpg" in res.output
    assert "predicted 2 image(s)" in res.output and "skipped 2 unreadable" in res.output

    from flows.predict import skipped_path
    from storage.tables import read_table

    assert len(read_table(out, "predictions")) == 2 * K
    skipped = pd.read_parquet(skipped_path(out))
    assert sorted(Path(p).name for p in skipped["image"]) == ["notes.jpg", "truncated.png"]
    assert skipped["reason"].str.contains("cannot decode").all()
    assert len(list((tmp_path / "ov").glob("*.png"))) == 2
    # a glob works too, and nothing readable at all is an exit code, not an empty success
    res = _cli(runs.home, "predict", "--model", ZEROSHOT_RUN, "--images", str(folder / "*.jpg"), "--out", str(tmp_path / "q.parquet"), "--no-progress")
    assert res.exit_code == 1 and "predicted 0 image(s)" in res.output


def test_a_model_refuses_another_backbone_and_bad_inputs_are_user_errors(runs, tmp_path):
    from pipeline.errors import BackboneError, ConfigError, ULDError
    from pipeline.predictor import LandmarkPredictor

    other = make_backbone(tmp_path / "otherddpm", seed=1)
    with pytest.raises(BackboneError, match="identity differs in weights") as err:
        LandmarkPredictor.from_pretrained(runs.home / "runs" / ZEROSHOT_RUN, backbone=other)
    assert err.value.fix and "weights hash" in err.value.fix
    res = _cli(runs.home, "predict", "--model", ZEROSHOT_RUN, "--backbone", other, "--images", _test_images(runs.home, 1)[0],
               "--out", str(tmp_path / "x.parquet"))
    assert res.exit_code != 0 and isinstance(res.exception, BackboneError)
    res = _cli(runs.home, "predict", "--model", "no-such-run", "--images", "a.jpg", "--out", str(tmp_path / "x.parquet"))
    assert isinstance(res.exception, ConfigError) and "no model" in str(res.exception)
    res = _cli(runs.home, "predict", "--model", ZEROSHOT_RUN, "--out", str(tmp_path / "x.parquet"))
    assert isinstance(res.exception, ConfigError) and res.exception.fix
    res = _cli(runs.home, "predict", "--model", ZEROSHOT_RUN, "--images", str(tmp_path / "nothing-*.png"), "--out", str(tmp_path / "x.parquet"))
    assert isinstance(res.exception, ULDError) and "no file matches" in str(res.exception)


def test_run_layout_names_agree_with_the_duld_flow():
    from flows import duld
    from storage import run_models

    assert run_models.STATE_NAME == duld.STATE_NAME and run_models.CENTROIDS_NAME == duld.CENTROIDS_NAME
