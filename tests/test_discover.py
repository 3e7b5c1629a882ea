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


# ---------------------------------------------------------------- the warp measure, on constructed cases
def _blob_image(width: int, height: int, centres: np.ndarray) -> np.ndarray:
    """One Gaussian blob per colour channel, centred (continuous pixel convention) on ``centres``."""
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    img = np.zeros((height, width, 3), np.uint8)
    for c, (x, y) in enumerate(centres):
        img[..., c] = np.clip(255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.0**2)), 0, 255).astype(np.uint8)
    return img


def _blob_detector(img: np.ndarray) -> np.ndarray:
    """An exactly equivariant landmark detector: the intensity centroid of each channel's blob."""
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]] + 0.5
    out = []
    for c in range(3):
        w = img[..., c].astype(np.float64)
        w = np.where(w > 20, w, 0.0)  # drop the mean-colour fill the warp brings in at the borders
        out.append([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])
    return np.array(out)


def test_warp_consistency_is_zero_for_an_equivariant_detector_and_exact_for_a_fixed_one():
    from pipeline.evaluation.warp import WarpRange, apply_affine, small_affine, warp_box, warp_consistency, warp_image

    W, H = 80, 60
    centres = np.array([[20.3, 15.2], [55.7, 30.1], [40.0, 45.5]])
    rng = np.random.default_rng(0)
    mats = np.stack([small_affine(rng, W, H) for _ in range(4)])
    # within the range: |rotation| <= 3 deg, |scale - 1| <= 5 %, the centre moves <= 3 % of the side
    for m in mats:
        scale = np.sqrt(abs(np.linalg.det(m[:2, :2])))
        assert abs(scale - 1) <= 0.05 and abs(np.degrees(np.arctan2(m[1, 0], m[0, 0]))) <= 3.0
        assert np.all(np.abs(apply_affine(np.array([W / 2, H / 2]), m) - [W / 2, H / 2]) <= 0.03 * np.array([W, H]) + 1e-9)
        assert not np.allclose(m, np.eye(3))
    img = _blob_image(W, H, centres)
    assert np.array_equal(warp_image(img, np.eye(3)), img)
    orig = np.stack([_blob_detector(img)] * 4)
    warped = np.stack([_blob_detector(warp_image(img, m)) for m in mats])
    present = np.ones((4, 3), bool)
    sizes = np.full((4, 2), [W, H])
    err, n = warp_consistency(orig, present, warped, present, mats, sizes)
    assert n.tolist() == [4, 4, 4] and err.max() < 0.1  # % of sqrt(w*h): well under a tenth of a pixel
    # a detector that ignores the image (always the same points): the error is how far the inverse moves them
    fixed = np.stack([centres] * 4)
    err, _ = warp_consistency(fixed, present, fixed, present, mats, sizes)
    expect = np.mean([np.linalg.norm(apply_affine(centres, np.linalg.inv(m)) - centres, axis=1) for m in mats], axis=0) / np.sqrt(W * H) * 100
    assert np.allclose(err, expect) and err.min() > 0.1
    # a landmark missing in the warped images has no error
    wp = present.copy()
    wp[:, 1] = False
    err, n = warp_consistency(orig, present, warped, wp, mats, sizes)
    assert n[1] == 0 and np.isnan(err[1])
    # the warped box holds the warped corners; bad ranges are refused
    box = warp_box(np.array([10.0, 5.0, 30.0, 25.0]), mats[0])
    corners = apply_affine(np.array([[10.0, 5.0], [30.0, 25.0], [10.0, 25.0], [30.0, 5.0]]), mats[0])
    assert np.all(corners >= box[:2] - 1e-9) and np.all(corners <= box[2:] + 1e-9)
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="rotation_deg"):
        small_affine(rng, W, H, WarpRange(rotation_deg=90))


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
    assert "broken.png" in res.output and "consistency" in res.output and "warp_error" in res.output
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
    assert {"flip_error", "warp_error", "renoise_error", "silhouette"} <= set(m["metric"])
    assert {f"warp_error_lm{k}" for k in range(K)} <= set(m["metric"])
    warp = m[m["metric"] == "warp_error"]["value"].iloc[-1]
    motion = m[m["metric"] == "warp_motion"]["value"].iloc[-1]
    assert np.isfinite(warp) and 0 <= warp < 100 and 0 < motion < 10  # a small warp: a few % of the image
    assert not m["metric"].str.startswith("nme_").any()  # no labels, no NME
    page = (run / "report.html").read_text()
    assert "Consistency under a horizontal flip and small affine warps" in page and "noise floor" in page and "mean warp error" in page
    assert "warp_motion" in page
    assert page.count("data:image/png;base64,") >= 3
    # the folder's boxes are recorded as the whole image
    from flows.datasets import load_manifest

    test_manifest = load_manifest(home, "folder-my-photos", "test")
    assert set(test_manifest.frame["box_source"]) == {"image"} and set(test_manifest.box_sources()) == {"image"}
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


def test_discover_trains_its_backbone_resumes_it_and_skips_it_when_done(folder, prefect_harness):
    """--train-backbone: the backbone flow trains a DDPM on the images, the features use it; more steps
    continue the same training from its checkpoint, the same steps again skip it."""
    from flows.discover import discover, own_backbone_name
    from pipeline.datasets.crop import DEFAULT_CROP_MARGIN
    from storage.layout import Workspace

    base, photos, _ = folder
    home = base / "ws-train"
    kw = dict(k=K, home=home, size=SIZE, n_samples_per_image=30, max_overlays=0, flip=False, warp=False, train_backbone=True,
              backbone_options={"batch_size": 4, "channels": (16, 32)}, method_options={"n_init": 1, "max_iter": 5})
    first = discover(str(photos / "sub" / "*.png"), backbone_steps=2, **kw)
    name = own_backbone_name(home, first.dataset, SIZE, DEFAULT_CROP_MARGIN, 0)
    assert first.backbone == name and name.startswith(f"ddpm-{first.dataset}-{SIZE}-")
    bdir = Workspace(home).backbone_dir(name)
    record = json.loads((bdir / "training_record.json").read_text())
    assert record["steps"] == 2 and record["n_images"] == first.n_train and record["segments"][-1]["threads"] == 1
    meta = json.loads((bdir / "uld_backbone.json").read_text())
    # more steps: continues from the step-2 checkpoint (a second segment), new weights -> a new store and run
    more = discover(str(photos / "sub" / "*.png"), backbone_steps=3, **kw)
    record = json.loads((bdir / "training_record.json").read_text())
    assert record["steps"] == 3 and [(s["from_step"], s["to_step"]) for s in record["segments"]] == [(0, 2), (2, 3)]
    assert more.store != first.store and more.run_id != first.run_id
    assert json.loads((bdir / "uld_backbone.json").read_text()) != meta
    # the same command again: training skipped (nothing rewritten), the same run
    stamp = (bdir / "uld_backbone.json").stat().st_mtime_ns
    again = discover(str(photos / "sub" / "*.png"), backbone_steps=3, **kw)
    assert (bdir / "uld_backbone.json").stat().st_mtime_ns == stamp and again.run_id == more.run_id
    # fewer steps than done: refused with the step count that works
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="--backbone-steps 3"):
        discover(str(photos / "sub" / "*.png"), backbone_steps=2, **kw)
    with pytest.raises(ConfigError, match="--train-backbone"):
        discover(str(photos / "sub" / "*.png"), backbone="shipped", **kw)


def test_discover_duld_force_end_to_end_with_a_box_file(folder, prefect_harness):
    """`uld discover --method duld --force` on tiny data, with object boxes from a file: the run is redone,
    the manifest records which boxes came from the file, and both checks run on the boxes."""
    from flows.datasets import load_manifest

    base, photos, backbone = folder
    home = base / "ws-duld"
    box_file = base / "boxes.csv"
    listed = sorted(p.name for p in (photos / "sub").glob("*.png"))[:3]
    # names relative to the CSV's folder; an image outside the glob is ignored
    box_file.write_text("image,x0,y0,x1,y1\n" + "".join(f"my photos/sub/{n},2,3,{SIZE - 2},{SIZE - 1}\n" for n in listed)
                        + f"my photos/img000.png,0,0,{SIZE},{SIZE}\n")
    args = ("discover", "--images", str(photos / "sub" / "*.png"), "--method", "duld", "-k", str(K), "--backbone", backbone,
            "--size", str(SIZE), "--rounds", "1", "--steps-per-round", "2", "--bootstrap-steps", "2", "--overlays", "1",
            "--boxes", str(box_file))
    res = _cli(home, *args)
    assert res.exit_code == 0, res.output
    runs = sorted((home / "runs").glob(f"folder-sub-duld-k{K}-*[0-9a-f]"))
    assert len(runs) == 1
    frame = pd.concat([load_manifest(home, "folder-sub", s).frame for s in ("train", "test")])
    by_source = frame.groupby("box_source")["image_id"].apply(set).to_dict()
    assert by_source["file"] == set(listed) and len(by_source["image"]) == 12 - 3
    boxed = frame[frame["box_source"] == "file"]
    assert (boxed[["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]].to_numpy() == [2, 3, SIZE - 2, SIZE - 1]).all()
    first_config = (runs[0] / "config.json").stat().st_mtime_ns
    forced = _cli(home, *args, "--force")
    assert forced.exit_code == 0, forced.output
    assert (runs[0] / "config.json").stat().st_mtime_ns != first_config  # redone, not resumed
    kp = pd.read_parquet(runs[0] / "keypoints.parquet")
    assert set(kp["stage"]) == {"bootstrap", "round"} and kp["image_id"].nunique() == 12
    from storage.tables import read_table

    m = read_table(runs[0] / "metrics.parquet", "metrics")
    assert {"flip_error", "warp_error", "renoise_error"} <= set(m["metric"])
    assert len(list((runs[0] / "figures" / "overlays").glob("*.png"))) == 1


def test_box_file_errors_and_old_manifests_without_box_sources(tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    from flows.discover import build_folder_manifests
    from pipeline.datasets.base import Manifest
    from pipeline.errors import DatasetError
    from storage.layout import Workspace

    photos = tmp_path / "p"
    photos.mkdir()
    for n in range(3):
        Image.new("RGB", (20, 16), (n * 40, 10, 10)).save(photos / f"c{n}.png")
    home = tmp_path / "ws"
    bad = tmp_path / "bad.csv"
    bad.write_text("image,x0,y0,x1,y1\nc0.png,1,1,10,10\nnope.png,1,1,5,5\n")
    with pytest.raises(DatasetError, match="nope.png") as err:
        build_folder_manifests(str(photos), home, "p", bad)
    assert "line 3" in str(err.value.where)
    bad.write_text("image,x0,y0,x1,y1\nc1.png,10,1,5,10\n")  # x1 < x0
    with pytest.raises(DatasetError, match="empty or outside"):
        build_folder_manifests(str(photos), home, "p", bad)
    bad.write_text("image,left,top\n")
    with pytest.raises(DatasetError, match="lacks the columns"):
        build_folder_manifests(str(photos), home, "p", bad)
    good = tmp_path / "good.csv"
    good.write_text(f"image,x0,y0,x1,y1\n{photos / 'c2.png'},2,2,12,14\n")  # an absolute path works too
    build_folder_manifests(str(photos), home, "p", good)
    ws = Workspace(home)
    every = Manifest.concat([Manifest.load(ws.manifest("p", s)) for s in ("train", "test")])
    src = dict(zip(every.frame["image_id"], every.box_sources()))
    assert src == {"c0.png": "image", "c1.png": "image", "c2.png": "file"}
    # a manifest written before the column: it still loads, and its boxes read as today's rule
    path = ws.manifest("p", "train")
    table = pq.read_table(path)
    pq.write_table(table.drop(["box_source"]), path)
    old = Manifest.load(path)
    assert old.frame["box_source"].isna().all()
    assert list(old.box_sources()) == ["image" if i != "c2.png" else "landmarks" for i in old.frame["image_id"]]


def test_manifest_rows_record_their_box_source_and_the_landmark_box_rule_reads_it():
    from pipeline.datasets.base import DatasetMeta, Manifest, manifest_row
    from pipeline.errors import DatasetError

    lm = np.array([[10.0, 10.0], [40.0, 10.0], [25.0, 30.0]])
    rows = [
        manifest_row("a", "test", "a.png", 100, 80, lm),  # box from the points
        manifest_row("b", "test", "b.png", 100, 80, np.full((3, 2), np.nan)),  # no points: the whole image
        manifest_row("c", "test", "c.png", 100, 80, lm, bbox=(0.0, 0.0, 60.0, 60.0)),  # given
        manifest_row("d", "test", "d.png", 100, 80, lm, bbox=(5.0, 5.0, 45.0, 35.0), box_source="landmarks"),  # grown from the points
    ]
    assert [r["box_source"] for r in rows] == ["landmarks", "image", "file", "landmarks"]
    with pytest.raises(DatasetError, match="unknown box source"):
        manifest_row("e", "test", "e.png", 100, 80, lm, box_source="guess")
    frame = pd.DataFrame(rows)
    meta = DatasetMeta("t", ("p0", "p1", "p2"), normalisation="landmark_box", norm_points=None)
    norm = Manifest(frame, meta).normalisers("landmarks")
    # landmark box 30 x 20 from the points for a and d; c keeps its given 60 x 60 box
    assert np.allclose(norm[[0, 3]], np.sqrt(30 * 20)) and np.isclose(norm[2], 60.0)
    # without the column (an old manifest): every row rebuilt from its points, as before
    legacy = Manifest(frame.drop(columns=["box_source"]), meta)
    assert np.allclose(legacy.normalisers("landmarks")[[0, 2, 3]], np.sqrt(30 * 20))
    assert list(legacy.box_sources()) == ["landmarks", "image", "landmarks", "landmarks"]
