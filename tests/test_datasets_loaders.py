"""Real-format loaders on small fixtures written in each release's on-disk format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipeline.datasets import Manifest, get_loader
from pipeline.datasets.annotations import in_holdout
from pipeline.datasets.images import image_size, read_image
from pipeline.datasets.torch7 import write_t7
from pipeline.datasets.w300 import write_pts
from pipeline.errors import DatasetError


def write_jpg(path: Path, w: int = 120, h: int = 100, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def corrupt(path: Path) -> None:
    path.write_bytes(b"this is not a jpeg at all")


# --- MTFL / AFLW -----------------------------------------------------------------

def mtfl_line(rel: str, pts: np.ndarray, pose: int = 3) -> str:
    xs = " ".join(f"{v:.6f}" for v in pts[:, 0])
    ys = " ".join(f"{v:.6f}" for v in pts[:, 1])
    return f" {rel} {xs} {ys} 1 2 2 {pose}"


FACE5 = np.array([[40, 40], [80, 40], [60, 60], [45, 80], [75, 80]], dtype=float)


def make_mtfl(root: Path, n: int = 40, testing: int = 0) -> Path:
    lines = []
    for i in range(n):
        write_jpg(root / "lfw_5590" / f"p_{i:03d}.jpg", seed=i)
        lines.append(mtfl_line(f"lfw_5590\\p_{i:03d}.jpg", FACE5 + i % 5, pose=1 + i % 5))
    (root / "training.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    if testing:
        test_lines = []
        for i in range(testing):
            write_jpg(root / "AFLW" / f"t_{i}.jpg", seed=100 + i)
            test_lines.append(mtfl_line(f"AFLW\\t_{i}.jpg", FACE5))
        write_jpg(root / "net_7876" / "x.jpg")
        test_lines.append(mtfl_line("net_7876\\x.jpg", FACE5))
        (root / "testing.txt").write_text("\n".join(test_lines) + "\n")
    return root


def test_mtfl_parses_release_format_and_holds_out_deterministically(tmp_path):
    root = make_mtfl(tmp_path / "mtfl", n=60)
    loader = get_loader("mtfl")
    train, skipped_train = loader.load(root, "train")
    test, skipped_test = loader.load(root, "test")
    assert skipped_train == skipped_test == []
    keys = [f"lfw_5590/p_{i:03d}.jpg" for i in range(60)]
    expect_test = {k for k in keys if in_holdout(k)}
    assert set(test.image_ids) == expect_test and 0 < len(expect_test) < 60
    assert set(train.image_ids) == set(keys) - expect_test
    row = train.frame.set_index("image_id").loc["lfw_5590/p_001.jpg"]
    assert Path(row["path"]).is_file() and (row["width"], row["height"]) == (120, 100)
    i = list(train.image_ids).index("lfw_5590/p_001.jpg")
    np.testing.assert_allclose(train.landmarks()[i], FACE5 + 1)
    assert row["pose_class"] == 1 and row["gender"] == 1 and not row["smile"]
    # object box contains the landmarks with room for the face around them
    b, lm = train.boxes(), train.landmarks()
    assert np.all(b[:, :2] < lm.min(1) - 5) and np.all(b[:, 2:] > lm.max(1) + 5)
    np.testing.assert_allclose(train.normalisers(), 40.0)
    assert train.visible().all()


def test_mtfl_and_aflw_use_testing_txt(tmp_path):
    root = make_mtfl(tmp_path / "mtfl", n=10, testing=4)
    mtfl_test, _ = get_loader("mtfl").load(root, "test")
    assert len(mtfl_test) == 5  # every testing.txt line
    assert len(get_loader("mtfl").load(root, "train")[0]) == 10  # no hold-out when testing.txt exists
    aflw_test, _ = get_loader("aflw").load(root, "test")
    assert sorted(aflw_test.image_ids) == [f"AFLW/t_{i}.jpg" for i in range(4)]
    assert len(get_loader("aflw").load(root, "train")[0]) == 10


def test_aflw_without_testing_txt_says_what_is_missing(tmp_path):
    root = make_mtfl(tmp_path / "mtfl", n=5)
    with pytest.raises(DatasetError, match="testing.txt") as err:
        get_loader("aflw").load(root, "test")
    assert str(root / "testing.txt") in str(err.value)


def _all_train(root: Path) -> None:
    """Add testing.txt so every training.txt line lands in `train` (no hold-out)."""
    write_jpg(root / "AFLW" / "t.jpg")
    (root / "testing.txt").write_text(mtfl_line("AFLW\\t.jpg", FACE5) + "\n")


@pytest.mark.parametrize(
    "breakage, line, reason",
    [
        ("missing_image", 3, "not found"),
        ("corrupt_image", 3, "unreadable image"),
        ("short_line", 3, "expected 14 numbers"),
        ("not_a_number", 3, "non-number"),
        ("out_of_range", 3, "outside"),
        ("bad_pose", 3, "head pose"),
    ],
)
def test_mtfl_bad_items_raise_or_skip(tmp_path, breakage, line, reason):
    root = make_mtfl(tmp_path / "mtfl", n=6)
    _all_train(root)
    txt = root / "training.txt"
    lines = txt.read_text().splitlines()
    if breakage == "missing_image":
        (root / "lfw_5590" / "p_002.jpg").unlink()
    elif breakage == "corrupt_image":
        corrupt(root / "lfw_5590" / "p_002.jpg")
    elif breakage == "short_line":
        lines[2] = " ".join(lines[2].split()[:-3])
    elif breakage == "not_a_number":
        lines[2] = lines[2].replace("42.000000", "4x.0", 1)
    elif breakage == "out_of_range":
        lines[2] = mtfl_line("lfw_5590\\p_002.jpg", FACE5 + [500.0, 0.0])
    elif breakage == "bad_pose":
        lines[2] = lines[2][:-1] + "9"
    txt.write_text("\n".join(lines) + "\n")

    with pytest.raises(DatasetError) as err:
        get_loader("mtfl").load(root, "train")
    msg = str(err.value)
    assert reason in msg and "skip-bad" in msg
    if breakage in ("missing_image", "corrupt_image"):
        assert "p_002.jpg" in msg and f"training.txt, line {line}" in msg
    else:
        assert f"training.txt, line {line}" in msg

    manifest, skipped = get_loader("mtfl").load(root, "train", skip_bad=True)
    assert len(manifest) == 5 and "lfw_5590/p_002.jpg" not in set(manifest.image_ids)
    assert len(skipped) == 1 and reason in skipped[0].reason


def test_mtfl_duplicate_line_is_reported(tmp_path):
    root = make_mtfl(tmp_path / "mtfl", n=3)
    _all_train(root)
    txt = root / "training.txt"
    txt.write_text(txt.read_text() + txt.read_text().splitlines()[0] + "\n")
    with pytest.raises(DatasetError, match="listed twice"):
        get_loader("mtfl").load(root, "train")


def test_missing_annotation_file_names_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as err:
        get_loader("mtfl").load(tmp_path / "empty", "train")
    assert str(tmp_path / "empty" / "training.txt") in str(err.value)
    with pytest.raises(DatasetError, match="not found"):
        get_loader("mtfl").load(tmp_path / "nowhere", "train")


def test_manifest_round_trips_through_parquet(tmp_path):
    root = make_mtfl(tmp_path / "mtfl", n=12)
    m, _ = get_loader("mtfl").load(root, "train")
    back = Manifest.load(m.save(tmp_path / "m.parquet"))
    assert back.meta == m.meta
    np.testing.assert_array_equal(back.landmarks(), m.landmarks())
    assert back.frame["gender"].tolist() == m.frame["gender"].tolist()


# --- CatHeads ---------------------------------------------------------------------

CAT9 = np.array([[30, 40], [60, 40], [45, 60], [20, 30], [22, 10], [35, 25], [55, 25], [68, 10], [70, 30]], float)


def make_cats(root: Path, n: int = 30) -> Path:
    for i in range(n):
        image = write_jpg(root / f"CAT_0{i % 2}" / f"{i:08d}_000.jpg", w=90, h=80, seed=i)
        pts = CAT9 + i % 3
        Path(str(image) + ".cat").write_text("9 " + " ".join(f"{v:g}" for v in pts.reshape(-1)) + " \n")
    return root


def test_catheads_parses_and_splits(tmp_path):
    root = make_cats(tmp_path / "cats", 30)
    loader = get_loader("catheads")
    train, _ = loader.load(root, "train")
    test, _ = loader.load(root, "test")
    assert len(train) + len(test) == 30 and not set(train.image_ids) & set(test.image_ids)
    assert loader.meta.n_landmarks == 9
    i = list(train.image_ids).index(next(k for k in train.image_ids if k.endswith("00000001_000.jpg")))
    np.testing.assert_allclose(train.landmarks()[i], CAT9 + 1)
    np.testing.assert_allclose(train.normalisers(), 30.0)


def test_catheads_bad_cat_file_and_missing_image(tmp_path):
    root = make_cats(tmp_path / "cats", 40)
    train, _ = get_loader("catheads").load(root, "train")
    victim = root / train.image_ids[0]
    Path(str(victim) + ".cat").write_text("8 1 2 3 4\n")
    with pytest.raises(DatasetError) as err:
        get_loader("catheads").load(root, "train")
    assert "point count 9" in str(err.value) and f"{victim}.cat, line 1" in str(err.value)
    m, skipped = get_loader("catheads").load(root, "train", skip_bad=True)
    assert len(m) == len(train) - 1 and skipped[0].source.endswith(".cat")
    Path(str(victim) + ".cat").write_text("9 " + " ".join(f"{v:g}" for v in CAT9.reshape(-1)))
    victim.unlink()
    with pytest.raises(DatasetError, match="image file not found"):
        get_loader("catheads").load(root, "train")


def test_catheads_ear_tips_beyond_the_frame_are_kept_invisible(tmp_path):
    """The release extrapolates ear tips cut off by the photo edge; far-off points are still errors."""
    root = make_cats(tmp_path / "cats", 40)
    train, _ = get_loader("catheads").load(root, "train")
    victim = root / train.image_ids[0]
    pts = CAT9.copy()
    pts[4] = [22, -30]  # 30 px above a 80 px high image: within half the image size
    Path(str(victim) + ".cat").write_text("9 " + " ".join(f"{v:g}" for v in pts.reshape(-1)))
    m, skipped = get_loader("catheads").load(root, "train")
    i = list(m.image_ids).index(train.image_ids[0])
    assert not skipped and m.visible()[i].tolist() == [True] * 4 + [False] + [True] * 4
    np.testing.assert_allclose(m.landmarks()[i, 4], [22, -30])
    assert m.boxes()[i, 1] < -30  # the object box still covers the ear
    pts[4] = [22, -60]
    Path(str(victim) + ".cat").write_text("9 " + " ".join(f"{v:g}" for v in pts.reshape(-1)))
    with pytest.raises(DatasetError, match="landmark 4 at"):
        get_loader("catheads").load(root, "train")


# --- MAFL -------------------------------------------------------------------------

def make_mafl(root: Path, n: int = 8, n_test: int = 3) -> Path:
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    lines = [str(n), "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"]
    for i, name in enumerate(names):
        write_jpg(root / "Img" / "img_align_celeba" / name, w=178, h=218, seed=i)
        pts = FACE5 + [10, 30] + i
        lines.append(name + "  " + " ".join(f"{int(v)}" for v in pts.reshape(-1)))
    (root / "Anno").mkdir(parents=True)
    (root / "Anno" / "list_landmarks_align_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "MAFL").mkdir()
    (root / "MAFL" / "training.txt").write_text("\n".join(names[: n - n_test]) + "\n")
    (root / "MAFL" / "testing.txt").write_text("\n".join(names[n - n_test :]) + "\n")
    return root


def test_mafl_reads_celeba_tree(tmp_path):
    root = make_mafl(tmp_path / "celeba")
    train, _ = get_loader("mafl").load(root, "train")
    test, _ = get_loader("mafl").load(root, "test")
    assert list(test.image_ids) == ["000006.jpg", "000007.jpg", "000008.jpg"] and len(train) == 5
    # CelebA stores x, y interleaved: lefteye_x lefteye_y ...
    np.testing.assert_allclose(test.landmarks()[0], FACE5 + [10, 30] + 5)
    assert (test.frame["width"] == 178).all() and (test.frame["height"] == 218).all()


def test_mafl_name_without_landmarks_and_bad_line(tmp_path):
    root = make_mafl(tmp_path / "celeba")
    with (root / "MAFL" / "testing.txt").open("a") as f:
        f.write("999999.jpg\n")
    with pytest.raises(DatasetError) as err:
        get_loader("mafl").load(root, "test")
    assert "MAFL/testing.txt, line 4" in str(err.value) and "999999.jpg" in str(err.value)
    anno = root / "Anno" / "list_landmarks_align_celeba.txt"
    lines = anno.read_text().splitlines()
    lines[3] = lines[3] + " 7"  # image 000002.jpg: 11 numbers
    anno.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as err:
        get_loader("mafl").load(root, "train")
    assert "list_landmarks_align_celeba.txt, line 4" in str(err.value)
    m, skipped = get_loader("mafl").load(root, "train", skip_bad=True)
    assert len(m) == 4 and skipped[0].line == 4


def test_mafl_truncated_landmark_file(tmp_path):
    root = make_mafl(tmp_path / "celeba")
    anno = root / "Anno" / "list_landmarks_align_celeba.txt"
    anno.write_text("\n".join(anno.read_text().splitlines()[:-2]) + "\n")  # lose 000007, 000008
    with pytest.raises(DatasetError, match="declares '8' images but the file has 6"):
        get_loader("mafl").load(root, "test")
    m, skipped = get_loader("mafl").load(root, "test", skip_bad=True)
    assert list(m.image_ids) == ["000006.jpg"] and [s.line for s in skipped] == [2, 3]


# --- 300-W ------------------------------------------------------------------------

def face68(shift: float = 0.0) -> np.ndarray:
    """A frontal-looking 68-point layout: U-shaped jaw 0-16, inner points, eyes 36/45, nose tip 30."""
    rng = np.random.default_rng(0)
    t = np.linspace(np.pi, 0, 17)
    jaw = np.stack([60 + 30 * np.cos(t), 50 + 40 * np.sin(t)], 1)
    inner = np.stack([rng.uniform(38, 82, 51), rng.uniform(25, 80, 51)], 1)
    pts = np.concatenate([jaw, inner])
    pts[36], pts[45], pts[30] = [42, 45], [78, 45], [60, 60]
    return pts + shift


def make_300w(root: Path) -> Path:
    layout = {"afw/a1": True, "helen/trainset/h1": False, "helen/testset/h2": True, "ibug/i1": False, "lfpw/trainset/l1": True}
    for i, (stem, header) in enumerate(layout.items()):
        write_jpg(root / f"{stem}.jpg", seed=i)
        write_pts(root / f"{stem}.pts", face68(i), header=header)
    return root


def test_300w_with_and_without_header_and_split_rule(tmp_path):
    root = make_300w(tmp_path / "300w")
    loader = get_loader("300w")
    train, _ = loader.load(root, "train")
    test, _ = loader.load(root, "test")
    assert sorted(train.image_ids) == ["afw/a1.jpg", "helen/trainset/h1.jpg", "lfpw/trainset/l1.jpg"]
    assert sorted(test.image_ids) == ["helen/testset/h2.jpg", "ibug/i1.jpg"]
    j = list(train.image_ids).index("helen/trainset/h1.jpg")  # header-less file
    np.testing.assert_allclose(train.landmarks()[j], face68(1), atol=1e-3)
    d = np.linalg.norm(face68()[36] - face68()[45])
    np.testing.assert_allclose(train.normalisers(), d, rtol=1e-4)
    assert np.all(np.abs(train.frame["yaw"]) < 1.0)  # nose centred -> frontal


def test_300w_wrong_point_count(tmp_path):
    root = make_300w(tmp_path / "300w")
    write_pts(root / "afw" / "a1.pts", face68()[:60])
    with pytest.raises(DatasetError) as err:
        get_loader("300w").load(root, "train")
    assert "expected 68 points, found 60" in str(err.value) and "a1.pts" in str(err.value)
    text = (root / "afw" / "a1.pts").read_text().replace("n_points: 60", "n_points: 68")
    (root / "afw" / "a1.pts").write_text(text)
    with pytest.raises(DatasetError, match="n_points: 68 but the block has 60"):
        get_loader("300w").load(root, "train")
    assert len(get_loader("300w").load(root, "train", skip_bad=True)[0]) == 2


# --- LS3D-W / 300W-LP -------------------------------------------------------------

def make_ls3d(root: Path) -> Path:
    for i, subset in enumerate(["AFW", "HELEN"]):
        name = f"{subset}_{i}_0"
        write_jpg(root / "300W_LP" / subset / f"{name}.jpg", seed=i)
        (root / "300W_LP" / "landmarks" / subset).mkdir(parents=True)
        scipy.io.savemat(root / "300W_LP" / "landmarks" / subset / f"{name}_pts.mat",
                         {"pts_3d": face68(i), "pts_2d": face68(i) + 1})
    for i, folder in enumerate(["AFLW2000-3D-Reannotated", "300W-Testset-3D", "Menpo-3D"]):
        image = write_jpg(root / "LS3D-W" / folder / f"img{i}.jpg", seed=10 + i)
        pts = face68(i)
        pts[30, 0] += 20  # nose to the right: turned face
        write_t7(image.with_suffix(".t7"), pts.astype(np.float32))
    return root


def test_ls3d_reads_mat_and_t7(tmp_path):
    root = make_ls3d(tmp_path / "ls3d")
    loader = get_loader("ls3d")
    train, _ = loader.load(root, "train")
    test, _ = loader.load(root, "test")
    assert sorted(train.image_ids) == ["300W_LP/AFW/AFW_0_0.jpg", "300W_LP/HELEN/HELEN_1_0.jpg"]
    assert len(test) == 3 and all(k.startswith("LS3D-W/") for k in test.image_ids)
    np.testing.assert_allclose(train.landmarks()[0], face68(0), atol=1e-4)  # pts_3d, not pts_2d
    assert loader.meta.normalisation == "landmark_box"
    wh = np.ptp(test.landmarks()[0], axis=0)
    np.testing.assert_allclose(test.normalisers(), np.sqrt(wh[0] * wh[1]), rtol=1e-5)  # sqrt(w*h) of the landmark box
    assert 50 < test.normalisers()[0] < 70
    assert np.all(test.frame["yaw"] > 20) and np.all(np.abs(train.frame["yaw"]) < 1)


def test_ls3d_missing_parts_say_where(tmp_path):
    root = make_ls3d(tmp_path / "ls3d")
    import shutil

    shutil.rmtree(root / "LS3D-W")
    with pytest.raises(DatasetError) as err:
        get_loader("ls3d").load(root, "test")
    assert "LS3D-W folder" in str(err.value) and str(root / "LS3D-W") in str(err.value)
    with pytest.raises(DatasetError) as err:
        get_loader("ls3d").load(tmp_path / "absent", "train")
    assert "300W_LP/landmarks" in str(err.value)  # the layout is in the fix


def test_ls3d_corrupt_t7_and_mat(tmp_path):
    root = make_ls3d(tmp_path / "ls3d")
    t7 = root / "LS3D-W" / "Menpo-3D" / "img2.t7"
    t7.write_bytes(t7.read_bytes()[:40])
    with pytest.raises(DatasetError, match="Torch7"):
        get_loader("ls3d").load(root, "test")
    assert len(get_loader("ls3d").load(root, "test", skip_bad=True)[0]) == 2
    scipy.io.savemat(root / "300W_LP" / "landmarks" / "AFW" / "AFW_0_0_pts.mat", {"pts_2d": face68()})
    with pytest.raises(DatasetError, match="no 'pts_3d'"):
        get_loader("ls3d").load(root, "train")
    write_t7(t7, np.zeros((5, 2), np.float32))
    with pytest.raises(DatasetError, match="expected 68x2"):
        get_loader("ls3d").load(root, "test")


# --- folder and images ----------------------------------------------------------

def test_folder_loader_lists_images_without_labels(tmp_path):
    root = tmp_path / "imgs"
    for i in range(25):
        write_jpg(root / ("a" if i % 2 else "b/c") / f"{i}.JPG", w=50 + i, h=40, seed=i)
    write_jpg(root / ".hidden" / "x.jpg")
    (root / "notes.txt").write_text("not an image")
    train, _ = get_loader("folder").load(root, "train")
    test, _ = get_loader("folder").load(root, "test")
    assert len(train) + len(test) == 25
    assert train.landmarks().shape == (len(train), 0, 2)
    np.testing.assert_array_equal(train.boxes()[:, 2], train.frame["width"].to_numpy())
    corrupt(root / "a" / "1.JPG")
    split = "test" if in_holdout("a/1.JPG") else "train"
    with pytest.raises(DatasetError, match="unreadable image"):
        get_loader("folder").load(root, split)
    m, skipped = get_loader("folder").load(root, split, skip_bad=True)
    assert "a/1.JPG" not in set(m.image_ids) and len(skipped) == 1


def test_read_image_converts_modes_and_rejects_truncation(tmp_path):
    Image.fromarray(np.full((7, 9), 200, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.full((7, 9, 4), 100, np.uint8)).save(tmp_path / "a.png")
    for name in ("g.png", "a.png"):
        arr = read_image(tmp_path / name)
        assert arr.shape == (7, 9, 3) and arr.dtype == np.uint8
    assert image_size(tmp_path / "g.png") == (9, 7)
    good = write_jpg(tmp_path / "t.jpg", 200, 200)
    data = good.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="cannot decode"):
        read_image(tmp_path / "trunc.jpg")
    with pytest.raises(DatasetError, match="not found"):
        read_image(tmp_path / "missing.jpg")


def test_holdout_rule_is_stable_and_about_ten_percent():
    keys = [f"dir/img_{i}.jpg" for i in range(4000)]
    held = [in_holdout(k) for k in keys]
    assert 0.08 < np.mean(held) < 0.12
    assert held == [in_holdout(k) for k in keys]
    assert held != [in_holdout(k, seed=1) for k in keys]


# --- annotation paths must stay inside the dataset folder ------------------------

def test_mtfl_line_climbing_out_of_the_root_is_refused_with_file_and_line(tmp_path):
    root = make_mtfl(tmp_path / "data" / "mtfl", n=4)
    _all_train(root)
    write_jpg(tmp_path / "secret.jpg")  # a real image: without the check it would be read
    txt = root / "training.txt"
    lines = txt.read_text().splitlines()
    lines.insert(2, mtfl_line("..\\..\\secret.jpg", FACE5))
    txt.write_text("\n".join(lines) + "\n")

    with pytest.raises(DatasetError) as err:
        get_loader("mtfl").load(root, "train")
    assert "outside the dataset folder" in str(err.value) and f"{txt}, line 3" in err.value.where
    manifest, skipped = get_loader("mtfl").load(root, "train", skip_bad=True)
    assert len(manifest) == 4 and not any("secret" in p for p in manifest.frame["path"])
    assert [(s.source, s.line) for s in skipped] == [(str(txt), 3)] and "outside the dataset folder" in skipped[0].reason

    # Absolute paths are refused too (Windows drive letters included); a '..' that stays inside is fine.
    from pipeline.datasets.annotations import path_inside

    assert path_inside(root, "C:\\faces\\a.jpg") is None and path_inside(root, "/etc/a.jpg") is None
    assert path_inside(root, "lfw_5590\\..\\lfw_5590\\p_000.jpg") == root / "lfw_5590" / "p_000.jpg"


def test_mafl_list_entry_climbing_out_of_the_image_folder_is_refused(tmp_path):
    root = make_mafl(tmp_path / "celeba", n=4, n_test=1)
    write_jpg(tmp_path / "outside.jpg", w=178, h=218)
    anno = root / "Anno" / "list_landmarks_align_celeba.txt"
    lines = anno.read_text().splitlines()
    lines[0] = "5"
    lines.append("../../../outside.jpg  50 70 90 70 70 90 55 110 85 110")
    anno.write_text("\n".join(lines) + "\n")
    listing = root / "MAFL" / "training.txt"
    listing.write_text(listing.read_text() + "../../../outside.jpg\n")
    with pytest.raises(DatasetError, match="outside the dataset folder") as err:
        get_loader("mafl").load(root, "train")
    assert f"{listing}, line 4" in err.value.where
