"""`uld discover`: a folder of unlabelled images -> landmarks, overlays, flip check, report."""

from __future__ import annotations

import json

import os
import shutil
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("faiss")

from tiny_runs import SIZE, make_backbone  # noqa: E402

K = 4


# ---------------------------------------------------------------- the flip measure, by hand
def test_flip_consistency_finds_mirror_partners_and_their_error():
    from pipeline.evaluation.flip import flip_consistency, mirror_x

    # 2 images 10 x 10 (sqrt(w*h) = 10 px): a "left" point, a "right" point and a centre point.
    p = np.array([[[2.0, 5.0], [8.0, 5.0], [5.0, 3.0]], [[3.0, 4.0], [7.0, 4.0], [5.0, 7.0]]])
    sizes = np.array([[10, 10], [10, 10]])
    assert np.allclose(mirror_x(mirror_x(p, sizes[:, 0]), sizes[:, 0]), p)
    # On the mirror images a perfect detector finds landmark j where the original has perm[j], mirrored.
    perm = np.array([1, 0, 2])
    offset = np.array([0.3, 0.4])  # 0.5 px off = 5 % of sqrt(w*h)
    q = mirror_x(p[:, perm] + offset, sizes[:, 0])
    present = np.ones((2, 3), bool)
    res = flip_consistency(p, present, q, present, sizes)
    assert res.partner.tolist() == [1, 0, 2]  # left <-> right, the centre stays itself
    assert np.allclose(res.error, 5.0) and res.n_pairs.tolist() == [2, 2, 2]
    # a landmark never present in the flips has no partner
    fp = present.copy()
    fp[:, 2] = False
    res = flip_consistency(p, present, q, fp, sizes)
    assert res.partner[2] == -1 and np.isnan(res.error[2]) and res.n_pairs[2] == 0


def test_same_landmark_error_is_the_mean_distance_where_both_are_present():
    from pipeline.evaluation.flip import same_landmark_error

    a = np.zeros((2, 2, 2))
    b = a.copy()
    b[0, 0] = (3.0, 4.0)  # 5 px on a 10 x 10 image = 50 %
    b[1, 0] = (6.0, 8.0)  # 10 px, but not present in b
    pb = np.array([[True, True], [False, True]])
    err, n = same_landmark_error(a, np.ones((2, 2), bool), b, pb, np.array([[10, 10], [10, 10]]))
    assert np.allclose(err, [50.0, 0.0]) and n.tolist() == [1, 2]


# ---------------------------------------------------------------- end to end on generated images
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from pipeline.datasets.synthetic import generate_synthetic

    base = tmp_path_factory.mktemp("discover")
    root = generate_synthetic(base / "gen", 18, 6, SIZE, 3)
    photos = base / "my photos"  # a space in the name: the dataset name is sanitised
    (photos / "sub").mkdir(parents=True)
    for n, png in enumerate(sorted((root / "images").glob("*.png"))):
        shutil.copy(png, photos / ("sub" if n % 2 else "") / f"img{n:03d}.png")
    (photos / "broken.png").write_text("not an image")
    return base, photos, make_backbone(base / "ddpm")


def _cli(home: Path, *args: str):
    import typer
    from typer.testing import CliRunner

    from flows import cli, cli_discover

    app = typer.Typer()
    app.callback()(cli._main)
    cli_discover.register(app)
    return CliRunner().invoke(app, ["--home", str(home), *args])


def test_discover_zeroshot_on_a_folder_writes_landmarks_overlays_and_a_report(folder, prefect_harness):
    from storage.tables import read_table

    base, photos, backbone = folder
    home = base / "ws"
    args = ("discover", "--images", str(photos), "-k", str(K), "--backbone", backbone, "--size", str(SIZE), "--samples-per-image", "40", "--overlays", "5")
    res = _cli(home, *args)
    assert res.exit_code == 0, res.output
    assert "broken.png" in res.output and "flip consistency" in res.output
    runs = sorted((home / "runs").glob(f"folder-my-photos-zeroshot-k{K}-*[0-9a-f]"))
    assert len(runs) == 1
    run = runs[0]
    table = pd.read_csv(run / "landmarks.csv")
    assert table["image_id"].nunique() == 24 and set(table["landmark_id"]) == set(range(K))
    assert all(Path(p).is_file() and Path(p).parent in (photos, photos / "sub") for p in table["path"])
    present = table[table["present"]]
    assert ((present["x"] >= 0) & (present["x"] <= present["width"]) & (present["y"] >= 0) & (present["y"] <= present["height"])).all()
    assert {"train", "test"} == set(table["split"])
    assert len(list((run / "figures" / "overlays").glob("*.png"))) == 5
    m = read_table(run / "metrics.parquet", "metrics")
    assert {"flip_error", "renoise_error", "silhouette"} <= set(m["metric"])
    assert not m["metric"].str.startswith("nme_").any()  # no labels, no NME
    page = (run / "report.html").read_text()
    assert "Consistency under a horizontal flip" in page and "noise floor" in page and page.count("data:image/png;base64,") >= 3
    # the same command again resumes every stage and gives the same landmarks
    again = _cli(home, *args)
    assert again.exit_code == 0, again.output
    pd.testing.assert_frame_equal(pd.read_csv(run / "landmarks.csv"), table)
    assert len(list((home / "runs").glob("folder-my-photos-*[0-9a-f]"))) == 1
    # one more image: a new feature store, so a new run (not a clash with the old one's config)
    shutil.copy(photos / "img000.png", photos / "img999.png")
    try:
        more = _cli(home, *args)
    finally:
        (photos / "img999.png").unlink()
    assert more.exit_code == 0, more.output
    assert len(list((home / "runs").glob("folder-my-photos-*[0-9a-f]"))) == 2
    # the same --run-id with other settings: the error names --force, and --force redoes the run
    fixed = (*args, "--run-id", run.name, "--no-flip-check", "--overlays", "0")
    clash = _cli(home, *[a if a != "40" else "30" for a in fixed])
    assert "different configuration" in str(clash.exception) and "--force" in str(clash.exception)
    forced = _cli(home, *[a if a != "40" else "30" for a in fixed], "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((run / "config.json").read_text())["model"]["n_samples_per_image"] == 30


def test_discover_duld_on_a_glob_without_labels(folder, prefect_harness):
    from flows.discover import discover

    base, photos, backbone = folder
    res = discover(str(photos / "sub" / "*.png"), method="duld", k=K, backbone=backbone, home=base / "ws2", size=SIZE, rounds=1,
                   steps_per_round=2, bootstrap_steps=2, max_overlays=2,
                   method_options={"views": None, "batch_size": 6, "threads": 1, "progress": False})
    assert res.dataset == "folder-sub" and res.n_train + res.n_test == 12 and len(res.skipped) == 0
    kp = pd.read_parquet(res.run_dir / "keypoints.parquet")
    assert set(kp["stage"]) == {"bootstrap", "round"} and kp["image_id"].nunique() == 12
    assert res.flip is not None and len(res.flip) == K
    assert "fallback_fraction" in res.report.read_text()


def test_discover_refuses_an_unknown_method_and_an_empty_glob(tmp_path):
    from flows.discover import discover
    from pipeline.errors import ConfigError, DatasetError

    with pytest.raises(ConfigError, match="unknown method"):
        discover(str(tmp_path), method="nope", home=tmp_path / "ws")
    with pytest.raises(DatasetError, match="no file matches"):
        discover(str(tmp_path / "*.png"), home=tmp_path / "ws")


def test_small_folders_keep_one_test_image_and_unreadable_files_are_listed(tmp_path):
    from flows.discover import build_folder_manifests, default_name
    from PIL import Image

    from storage.layout import Workspace

    photos = tmp_path / "Two Cats!"
    photos.mkdir()
    for n in range(3):
        Image.new("RGB", (20 + n, 16), (n * 40, 10, 10)).save(photos / f"c{n}.png")
    (photos / "bad.jpg").write_bytes(b"nope")
    assert default_name(str(photos)) == "folder-Two-Cats" and default_name(str(photos / "*.png")) == "folder-Two-Cats"
    home = tmp_path / "ws"
    n_train, n_test, skipped = build_folder_manifests(str(photos), home, "cats")
    assert (n_train, n_test) == (2, 1) and len(skipped) == 1 and "bad.jpg" in skipped["source"].iloc[0]
    ws = Workspace(home)
    assert ws.manifest("cats", "test").is_file() and ws.skipped("cats").is_file()
    # a glob of the readable ones: nothing skipped, and the old skipped list is gone
    n_train, n_test, skipped = build_folder_manifests(str(photos / "*.png"), home, "cats")
    assert (n_train, n_test, len(skipped)) == (2, 1, 0) and not ws.skipped("cats").exists()
