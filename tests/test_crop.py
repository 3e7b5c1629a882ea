"""Crop geometry: boxes, exact coordinate maps, and pixels landing where the maps say."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import get_loader
from pipeline.datasets.crop import (
    CROP_RULE,
    clip_rois_to_image,
    crop_boxes,
    crop_image,
    image_rect_in_crop,
    load_crops,
    to_crop,
    to_original,
)
from pipeline.errors import ConfigError, DatasetError


def test_crop_boxes_are_square_centred_with_margin():
    b = np.array([[10, 20, 50, 100], [0, 0, 30, 10]], np.float32)
    c = crop_boxes(b, 0.25)
    side = c[:, 2] - c[:, 0]
    np.testing.assert_allclose(side, c[:, 3] - c[:, 1])
    np.testing.assert_allclose(side, [80 * 1.5, 30 * 1.5])
    np.testing.assert_allclose((c[:, :2] + c[:, 2:]) / 2, (b[:, :2] + b[:, 2:]) / 2)
    with pytest.raises(ConfigError):
        crop_boxes(b, float("nan"))


def test_maps_round_trip_and_pass_nan():
    rng = np.random.default_rng(0)
    boxes = crop_boxes(np.concatenate([rng.uniform(0, 200, (5, 2)), rng.uniform(250, 400, (5, 2))], 1), 0.1)
    pts = rng.uniform(-50, 450, (5, 7, 2)).astype(np.float32)
    pts[1, 3] = np.nan
    c = to_crop(pts, boxes, 64)
    assert np.isnan(c[1, 3]).all() and np.isnan(to_original(c, boxes, 64)[1, 3]).all()
    np.testing.assert_allclose(to_original(c, boxes, 64), pts, atol=1e-3)
    np.testing.assert_allclose(to_crop(to_original(c, boxes, 64), boxes, 64), c, atol=1e-4)
    # the box corners map to the crop corners
    corners = np.stack([boxes[:, :2], boxes[:, 2:]], 1)
    np.testing.assert_allclose(to_crop(corners, boxes, 64), np.broadcast_to([[0, 0], [64, 64]], (5, 2, 2)), atol=1e-4)
    # single image form
    np.testing.assert_allclose(to_crop(pts[0], boxes[0], 64), c[0])


@pytest.mark.parametrize(
    "box, size",
    [((20, 10, 84, 74), 64), ((20, 10, 84, 74), 32), ((20, 10, 84, 74), 160), ((-30, -40, 90, 80), 48), ((35.3, 25.1, 47.3, 37.1), 96)],
)
def test_drawn_point_lands_at_to_crop(box, size):
    """A bright pixel's intensity centroid in the crop is exactly to_crop of its centre."""
    img = np.zeros((100, 120, 3), np.uint8)
    img[30, 40] = 255  # pixel (row 30, col 40): centre at (40.5, 30.5)
    crop = crop_image(img, box, size).astype(np.float64)[..., 0]
    ys, xs = np.mgrid[:size, :size] + 0.5
    centroid = np.array([(crop * xs).sum(), (crop * ys).sum()]) / crop.sum()
    expected = to_crop(np.array([[40.5, 30.5]]), np.array(box, float), size)[0]
    np.testing.assert_allclose(centroid, expected, atol=0.05)


def test_identity_crop_and_constant_fill_past_the_border():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    np.testing.assert_array_equal(crop_image(img, (10, 5, 42, 37), 32), img[5:37, 10:42])
    out = crop_image(img, (-20, -20, 60, 60), 80)  # box bigger than the image
    np.testing.assert_array_equal(out[20:60, 20:70], img)
    fill = np.round(img.reshape(-1, 3).mean(0)).astype(np.uint8)  # the box reads the whole image
    pad = np.ones((80, 80), bool)
    pad[20:60, 20:70] = False
    # Every padding pixel has the one constant colour: no streaks of replicated edges.
    np.testing.assert_array_equal(out[pad], np.broadcast_to(fill, (pad.sum(), 3)))
    assert not (out[:20, 25] == img[0, 5]).all(axis=-1).all()  # top border not replicated
    assert not (out[30, :20] == img[10, 0]).all(axis=-1).all()  # left border not replicated


def test_fill_is_the_mean_of_the_image_pixels_the_crop_reads():
    img = np.zeros((60, 60, 3), np.uint8)
    img[:, :30] = (200, 100, 0)  # the left half is orange, the right half black
    # The box (x -20..40) reads image columns 0..42 (3 px of kernel pad): 30 orange, 13 black.
    out = crop_image(img, (-20, 0, 40, 60), 60)
    expected = np.round(np.array([200, 100, 0]) * 30 / 43).astype(np.uint8)
    np.testing.assert_array_equal(out[:, :18], np.broadcast_to(expected, (60, 18, 3)))  # crop x < 18: orig x < -2
    np.testing.assert_array_equal(out[:, 22:48], np.broadcast_to([200, 100, 0], (60, 26, 3)))  # the image itself


def test_image_rect_and_clipped_rois_exclude_the_padding():
    box = np.array([[-20.0, -10.0, 80.0, 90.0]])  # crop box of a 60 x 70 (w x h) image, S = 50 -> 2 px per crop px
    rect = image_rect_in_crop(np.array([[60, 70]]), box, 50)
    np.testing.assert_allclose(rect, [[10.0, 5.0, 40.0, 40.0]])
    rois = np.array([[0.0, 0.0, 30.0, 30.0], [20.0, 20.0, 48.0, 45.0], [42.0, 42.0, 49.0, 49.0]])
    clipped = clip_rois_to_image(rois, np.repeat([[60, 70]], 3, 0), np.repeat(box, 3, 0), 50)
    np.testing.assert_allclose(clipped[0], [10.0, 5.0, 30.0, 30.0])
    np.testing.assert_allclose(clipped[1], [20.0, 20.0, 40.0, 40.0])
    np.testing.assert_allclose(clipped[2], rect[0])  # wholly in the padding -> the in-image part
    # The crop's padding lies outside the rectangle: its pixels are the constant fill.
    img = np.random.default_rng(0).integers(0, 255, (70, 60, 3), dtype=np.uint8)
    crop = crop_image(img, box[0], 50)
    assert (crop[:, :9] == crop[0, 0]).all() and (crop[41:] == crop[0, 0]).all()
    with pytest.raises(ConfigError):
        clip_rois_to_image(rois, np.array([[60, 70]]), box, 50)


def test_the_crop_rule_is_part_of_the_feature_spec():
    import hashlib
    import json

    from pipeline.backbones.base import FeatureSpec

    spec = FeatureSpec()
    assert spec.to_json()["crop_rule"] == CROP_RULE == 2
    # A store named before the rule was recorded (same spec, no crop_rule) is never found again.
    old = {k: v for k, v in spec.to_json().items() if k != "crop_rule"}
    old_hash = hashlib.sha256(json.dumps({"spec": old, "backbone": {}}, sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert spec.config_hash({}) != old_hash
    with pytest.raises(ConfigError, match="crop rule 1"):
        FeatureSpec(crop_rule=1)


def test_load_crops_from_manifest(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(2)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    m, _ = get_loader("folder").load(root, "train")
    images, boxes = load_crops(m, 24, 0.0, indices=[0, 2], workers=2)
    assert images.shape == (2, 24, 24, 3) and images.dtype == np.uint8 and boxes.dtype == np.float32
    np.testing.assert_allclose(boxes, crop_boxes(m.boxes()[[0, 2]], 0.0))
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(m.frame["path"][0])
    with pytest.raises(DatasetError, match="manifest says"):
        load_crops(m, 24, 0.0, indices=[0])
