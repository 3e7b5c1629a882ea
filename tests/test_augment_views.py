"""Augmented views: transforms, rendering from the original image, the view store and its batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.datasets.augment_views import (
    ViewAugmentConfig,
    apply_pixel_affine,
    invert_pixel_affine,
    pixel_to_normalised_affine,
    render_view,
    view_transform,
    view_transforms,
)
from pipeline.datasets.crop import crop_image
from pipeline.errors import ConfigError, StoreError

S = 32


def _scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 100 x 80 textured image and a crop box inside it."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (10, 13, 3)).astype(np.uint8)
    from PIL import Image

    img = np.asarray(Image.fromarray(small).resize((100, 80), Image.Resampling.BILINEAR))
    return np.ascontiguousarray(img), np.array([30.0, 20.0, 70.0, 60.0])


def test_transforms_are_seeded_per_row_and_view_and_flip_mirrors():
    cfg = ViewAugmentConfig(n_views=3, flip=True, colour_jitter=0.3, seed=5)
    a1, f1, j1 = view_transform(cfg, S, row=7, view=2)
    a2, f2, j2 = view_transform(cfg, S, row=7, view=2)
    assert np.array_equal(a1, a2) and f1 == f2 and np.array_equal(j1, j2)
    assert not np.array_equal(a1, view_transform(cfg, S, row=7, view=1)[0])
    tr = view_transforms(cfg, S, np.array([3, 7]))
    assert tr.affine.shape == (6, 2, 3) and np.array_equal(tr.affine[5], a1)
    dets = np.linalg.det(tr.affine[:, :, :2])
    assert np.array_equal(dets < 0, tr.flip)  # a flipped view is exactly a mirroring map
    flips = view_transforms(cfg, S, np.arange(200)).flip
    assert 0.35 < flips.mean() < 0.65
    assert not view_transforms(ViewAugmentConfig(flip=False), S, np.arange(50)).flip.any()
    assert np.all(np.abs(tr.jitter - 1) <= 0.3 + 1e-6)
    assert ViewAugmentConfig.from_json(cfg.to_json()) == cfg
    assert cfg.config_hash() != ViewAugmentConfig(n_views=3, flip=False, colour_jitter=0.3, seed=5).config_hash()
    with pytest.raises(ConfigError):
        ViewAugmentConfig(n_views=0)


def test_normalised_affine_is_the_same_map():
    cfg = ViewAugmentConfig(n_views=1, flip=True)
    aff = view_transforms(cfg, S, np.arange(4)).affine
    p = np.random.default_rng(0).uniform(0, S, (4, 5, 2))
    q = apply_pixel_affine(p, aff)
    n = pixel_to_normalised_affine(aff, S)
    qn = apply_pixel_affine(2 * p / S - 1, n)
    np.testing.assert_allclose((qn + 1) * S / 2, q, atol=1e-9)
    np.testing.assert_allclose(apply_pixel_affine(q, invert_pixel_affine(aff)), p, atol=1e-9)


def test_identity_view_is_the_crop_and_jitter_moves_no_pixel():
    img, box = _scene()
    ident = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    crop = crop_image(img, box, S).astype(int)
    view = render_view(img, box, S, ident).astype(int)
    assert np.abs(view - crop).max() <= 2
    bright = render_view(img, box, S, ident, np.array([1.2, 1.0, 1.0], np.float32)).astype(float)
    assert bright.mean() > view.mean() * 1.1
    assert np.corrcoef(bright[..., 0].ravel(), view[..., 0].ravel())[0, 1] > 0.95


@pytest.mark.parametrize("flip", [False, True])
def test_a_bright_dot_lands_where_the_affine_says(flip):
    img = np.full((100, 100, 3), 40, np.uint8)
    box = np.array([20.0, 20.0, 84.0, 84.0])  # 2 original px per crop px
    for row in range(6):
        a, f, _ = view_transform(ViewAugmentConfig(flip=flip), S, row=row, view=0)
        if flip and not f:
            a, f, _ = view_transform(ViewAugmentConfig(flip=flip), S, row=row, view=1)
        dot = np.array([44.0 + 2 * row, 52.0 - row])  # original px
        im = img.copy()
        im[int(dot[1]) - 2 : int(dot[1]) + 2, int(dot[0]) - 2 : int(dot[0]) + 2] = 255
        p = (dot - box[:2]) * S / (box[2:] - box[:2])  # crop px of the dot's centre
        q = apply_pixel_affine(p[None], a)[0]
        view = render_view(im, box, S, a).astype(float).mean(-1)
        w = np.clip(view - 40, 0, None)
        yy, xx = np.mgrid[0:S, 0:S] + 0.5
        found = np.array([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])
        assert np.abs(found - q).max() < 0.75, (row, found, q)


def _main_store(tmp_path, n_train: int = 5, n_test: int = 2):
    from storage.features import FeatureStore

    n = n_train + n_test
    st = FeatureStore.create(
        tmp_path / "main", config={"backbone": {"kind": "toy"}}, config_hash="abc123abc123",
        image_ids=[f"i{i}" for i in range(n)], splits=["train"] * n_train + ["test"] * n_test,
        crop_boxes=np.tile([0.0, 0.0, 10.0, 10.0], (n, 1)), shapes={"l@t1": (3, 4, 4)}, image_size=S, shard_size=4,
    )
    for i in range(st.n_shards()):
        a, b = st.shard_range(i)
        st.write_shard(i, {"l@t1": np.random.default_rng(i).normal(size=(b - a, 3, 4, 4))})
    return FeatureStore.open(st.path)


def test_view_store_round_trip_and_paired_batches(tmp_path):
    from storage.augmented_features import ViewStore, attach_views
    from storage.feature_loader import make_loader

    main = _main_store(tmp_path)
    cfg = ViewAugmentConfig(n_views=3, flip=True)
    train = main.indices("train")
    tr = view_transforms(cfg, S, train)
    vs = ViewStore.create(tmp_path / "views", main=main, source_rows=train, n_views=3, affine=tr.affine, flip=tr.flip,
                          jitter=tr.jitter, config={"views": cfg.to_json()}, config_hash="v1", shard_size=4)
    assert not vs.store.is_complete() and len(vs.store) == 15
    for i in range(vs.store.n_shards()):
        a, b = vs.store.shard_range(i)
        # feature value = view row + 1, so a batch shows which rows it read (never all zeros: an unwritten chunk)
        vs.store.write_shard(i, {"l@t1": np.broadcast_to(np.arange(a + 1, b + 1, dtype=np.float32)[:, None, None, None], (b - a, 3, 4, 4))})
    vs = ViewStore.open(tmp_path / "views", expected_hash="v1")
    assert vs.source_rows.tolist() == np.repeat(train, 3).tolist() and vs.views.tolist() == [0, 1, 2] * 5
    np.testing.assert_array_equal(vs.affine, tr.affine)
    assert vs.rows_for([2, 4], [1, 0]).tolist() == [7, 12]
    with pytest.raises(StoreError, match="no augmented views"):
        vs.rows_for([5], [0])  # a test row
    loader = make_loader(main, train, batch_size=2)
    got = list(attach_views(iter(loader), vs, seed=3))
    again = list(attach_views(iter(make_loader(main, train, batch_size=2)), vs, seed=3))
    for b, b2 in zip(got, again):
        rows = b["view_features"]["l@t1"][:, 0, 0, 0].long().numpy() - 1
        assert (vs.source_rows[rows] == b["index"].numpy()).all()  # each crop is paired with one of its own views
        assert torch.equal(b["view_affine"], b2["view_affine"])  # seeded: the same pairs again
        np.testing.assert_allclose(b["view_affine"].numpy(), pixel_to_normalised_affine(vs.affine[rows], S), atol=1e-6)
        assert b["view_flip"].tolist() == vs.flip[rows].tolist()
    with pytest.raises(StoreError, match="not a view store"):
        ViewStore(main)
