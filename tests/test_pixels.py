"""The `pixels` backbone (image-only reference) and crops that reach past the image.

Unit checks of the features (shapes, keys, determinism, identity, what each
layer responds to), then ZeroShot on a tiny on-disk dataset whose stores are
made with `pixels` through the same functions `uld features` runs: coloured
parts it must find, and object boxes hanging past the image border, whose
padding must never become a landmark.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.backbones.base import FeatureSpec  # noqa: E402
from pipeline.backbones.loading import backbone_name, load_backbone  # noqa: E402
from pipeline.backbones.pixels import PixelFeatures  # noqa: E402
from pipeline.datasets.base import DatasetMeta, Manifest, manifest_row  # noqa: E402
from pipeline.datasets.crop import crop_boxes, to_original  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from storage.features import FeatureStore  # noqa: E402
from storage.layout import Workspace  # noqa: E402

torch.set_num_threads(1)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------ the features
def test_shapes_keys_and_placeholder_timestep():
    bb = load_backbone("pixels")
    assert isinstance(bb, PixelFeatures) and backbone_name("pixels") == "pixels"
    assert bb.default_layers() == ["rgb", "grad", "patch2", "patch4"]
    for size in (64, 32):
        shapes = bb.feature_shapes(size, [])
        assert shapes == {"rgb": (13, size // 2, size // 2), "grad": (73, size // 4, size // 4),
                          "patch2": (76, size // 2, size // 2), "patch4": (76, size // 4, size // 4)}
        out = bb.extract(images(2, size), [50, 150], [])
        # Whatever timesteps are asked for, each layer comes once, at the placeholder t0.
        assert sorted(out) == ["grad@t0", "patch2@t0", "patch4@t0", "rgb@t0"]
        for key, v in out.items():
            assert v.dtype == torch.float32 and tuple(v.shape[1:]) == shapes[key.split("@")[0]]
            assert torch.isfinite(v).all()
    assert bb.feature_timesteps([50, 150]) == [0]
    assert sorted(bb.extract(images(1, 32), [7], ["patch4", "rgb"])) == ["patch4@t0", "rgb@t0"]


def test_bad_requests_are_config_errors():
    bb = PixelFeatures()
    with pytest.raises(ConfigError, match="multiple of 4"):
        bb.feature_shapes(30, [])
    with pytest.raises(ConfigError, match="no layer"):
        bb.extract(images(1, 32), [0], ["up1.res1"])
    with pytest.raises(ConfigError, match="images must be"):
        bb.extract(torch.zeros(1, 3, 32, 16), [0], [])


def test_deterministic_and_batch_independent():
    x = images(5, 32, seed=1)
    a = PixelFeatures().extract(x, [0], [])
    b = PixelFeatures().extract(x, [0], [])
    one = PixelFeatures().extract(x[3:4], [0], [])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        torch.testing.assert_close(a[k][3:4], one[k], rtol=0, atol=1e-5)  # conv kernels may sum in another order


def test_identity_is_stable_and_the_spec_ignores_timesteps_and_seed():
    a, b = PixelFeatures(), load_backbone("pixels")
    assert a.identity() == b.identity()
    assert json.loads(json.dumps(a.identity())) == a.identity()  # stored as JSON in the store attrs
    s1 = a.canonical_spec(FeatureSpec(timesteps=(50, 150), noise_seed=3))
    s2 = a.canonical_spec(FeatureSpec(timesteps=(10,), noise_seed=0))
    assert s1 == s2 and s1.timesteps == (0,)
    assert s1.config_hash(a.identity()) == s2.config_hash(b.identity())
    # A diffusion backbone keeps its spec as given.
    spec = FeatureSpec(timesteps=(50, 150), noise_seed=3)
    assert load_backbone("shipped").canonical_spec(spec) == spec


def test_layers_respond_to_what_they_describe():
    bb = PixelFeatures()
    flat = torch.full((1, 3, 32, 32), 0.2)
    out = bb.extract(flat, [0], [])
    # A flat image has no gradients: the grad descriptor is only its constant channel.
    assert out["grad@t0"][:, :-1].abs().max() < 1e-6
    # Dark on the left, bright on the right: gradients point along +x, orientation bin 0.
    step = torch.full((1, 3, 32, 32), -0.8)
    step[..., 16:] = 0.8
    g = bb.extract(step, [0], ["grad"])["grad@t0"][0, :-1].reshape(8, 9, 8, 8)  # (bins, 3x3 cells, h, w)
    centre_cell = g[:, 4, 4, 4]  # the cell x = 16..19 px holds the edge
    assert centre_cell.argmax() == 0 and centre_cell[0] > 0.1
    # Colour: red and blue images differ in rgb, the same colour does not.
    red, blue = torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)
    red[:, 0], blue[:, 2] = 0.9, 0.9
    r, b = bb.extract(red, [0], ["rgb"])["rgb@t0"], bb.extract(blue, [0], ["rgb"])["rgb@t0"]
    assert (r - b).norm(dim=1).min() > 0.2


# ------------------------------------------------------------ a tiny dataset on disk
META = DatasetMeta(name="pads", landmark_names=("red", "green", "blue"), normalisation="bbox", norm_points=None)
W = H = 80
SIDE = 60.0
PARTS = np.array([[0.3, 0.3], [0.7, 0.3], [0.5, 0.72]])  # part centres as fractions of the object box
RADIUS = 7.0  # px: 2.9 crop px at 32 px crops
COLOURS = np.array([[230, 30, 30], [30, 200, 40], [40, 60, 230]], np.uint8)


def write_dataset(home: Path, root: Path, n_train: int = 30, n_test: int = 12, seed: int = 0) -> Workspace:
    """Images with three coloured disks at fixed places in an object box that often hangs past the border."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    rows = []
    for i in range(n_train + n_test):
        # The object box hangs 15 px (a quarter of it) past the image on a random side in x and
        # in y; the parts stay inside the image, and ~40% of the box is padding.
        x0, y0 = rng.choice([-15.0, 35.0], 2) + rng.uniform(-2, 2, 2)
        img = (rng.normal(128, 40, (H, W, 1)) + np.array([[[10, 0, -10]]])).clip(0, 255).astype(np.uint8)
        centres = np.array([x0, y0]) + PARTS * SIDE
        for c, (cx, cy) in enumerate(centres):
            img[(xx - cx) ** 2 + (yy - cy) ** 2 <= RADIUS**2] = COLOURS[c]
        path = root / f"im{i:03d}.png"
        Image.fromarray(img).save(path)
        split = "train" if i < n_train else "test"
        rows.append(manifest_row(f"im{i:03d}", split, str(path), W, H, centres, bbox=(x0, y0, x0 + SIDE, y0 + SIDE)))
    ws = Workspace(home)
    frame = pd.DataFrame(rows)
    for split in ("train", "test"):
        Manifest(frame[frame["split"] == split].reset_index(drop=True), META).save(ws.manifest("pads", split))
    return ws


def make_pixel_store(home: Path, spec: FeatureSpec) -> FeatureStore:
    """The `uld features` steps without Prefect: plan, create, compute every shard."""
    from flows.features import compute_shard, load_manifests, open_or_create_store, plan_store

    manifest = load_manifests(home, "pads")
    bb = load_backbone("pixels")
    plan = plan_store("pads", bb, "pixels", spec, manifest)
    path = Workspace(home).feature_store("pads", "pixels", plan.config_hash)
    boxes = crop_boxes(manifest.boxes(), spec.crop_margin)
    store = open_or_create_store(path, plan, manifest, boxes, bb.canonical_spec(spec), shard_size=16, batch_size=8)
    paths = manifest.frame["path"].to_numpy(dtype=str)
    for shard in store.missing_shards():
        compute_shard(store, shard, bb, spec, plan.layers, paths, 8, False)
    return FeatureStore.open(path)


@pytest.fixture(scope="module")
def pads(tmp_path_factory):
    home = tmp_path_factory.mktemp("pads-ws")
    write_dataset(home, home / "images")
    spec = FeatureSpec(image_size=32, timesteps=(50, 150), crop_margin=0.15)
    return home, spec, make_pixel_store(home, spec)


def test_store_holds_each_layer_once_and_any_timesteps_find_it(pads):
    from flows.features import load_manifests, plan_store

    home, spec, store = pads
    assert store.keys == ["grad@t0", "patch2@t0", "patch4@t0", "rgb@t0"]
    assert store.config["timesteps"] == [0] and store.config["spec"]["crop_rule"] == 2
    other = plan_store("pads", PixelFeatures(), "pixels", FeatureSpec(image_size=32, timesteps=(7,), noise_seed=5), load_manifests(home, "pads"))
    assert other.config_hash == store.config_hash


def test_zeroshot_on_pixels_finds_the_parts_and_never_the_padding(pads):
    pytest.importorskip("faiss")
    from flows.datasets import load_manifest
    from flows.zeroshot import iter_batches, store_rois
    from pipeline.methods.zeroshot import ZeroShot

    home, spec, store = pads
    tr, te = store.indices("train"), store.indices("test")
    rois_tr, rois_te = store_rois(home, "pads", store, tr), store_rois(home, "pads", store, te)
    model = ZeroShot(n_clusters=6, crop_size=32, n_samples_per_image=120, seed=0, use_gpu=False, n_init=2)
    model.fit(iter_batches(store, tr, 8), rois_tr, progress=False)
    lms = model.predict(iter_batches(store, te, 8), rois_te, progress=False)
    pts = to_original(lms.coords, store.crop_boxes[te], 32)  # (n, K, 2) original px; NaN where absent
    ok = lms.present
    # Never a point in the padding: every landmark is an image pixel.
    assert ok.any()
    inside = (pts[..., 0] >= 0) & (pts[..., 0] <= W) & (pts[..., 1] >= 0) & (pts[..., 1] <= H)
    assert inside[ok].all()
    # Test crops do reach past the image, so the check above is not vacuous.
    assert (store.crop_boxes[te][:, :2] < 0).any(axis=1).sum() >= 4
    # Each coloured part is some cluster's landmark, on the part's disk, on most test images.
    gt = load_manifest(home, "pads", "test").landmarks()
    for p in range(3):
        err = np.linalg.norm(pts - gt[:, p : p + 1], axis=-1)  # (n, K)
        err[~ok] = np.inf
        assert (err < RADIUS).mean(axis=0).max() >= 0.9, f"part {p} not found"


def test_rois_exclude_the_padding(pads):
    from flows.datasets import load_manifest
    from flows.zeroshot import store_rois
    from pipeline.datasets.crop import to_crop
    from pipeline.methods.zeroshot import roi_pixels

    home, spec, store = pads
    idx = np.arange(len(store))
    rois = store_rois(home, "pads", store, idx)
    frame = pd.concat([load_manifest(home, "pads", s).frame for s in ("train", "test")], ignore_index=True)
    boxes = frame[["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]].to_numpy(np.float64).reshape(-1, 2, 2)
    unclipped = to_crop(boxes, store.crop_boxes, 32).reshape(-1, 4)
    clipped = 0
    for i in idx:
        pix = to_original(roi_pixels(rois[i], 32), store.crop_boxes[i], 32)
        assert (pix >= 0).all() and (pix[:, 0] <= W).all() and (pix[:, 1] <= H).all(), f"image {i}: RoI pixel in the padding"
        # Inside the object box still: clipping only removes padding.
        assert (rois[i, :2] >= unclipped[i, :2] - 1e-4).all() and (rois[i, 2:] <= unclipped[i, 2:] + 1e-4).all()
        clipped += len(pix) < len(roi_pixels(unclipped[i], 32))
    assert clipped >= len(idx) // 2  # most boxes hang past the image here
