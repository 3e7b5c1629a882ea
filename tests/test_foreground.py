"""The unsupervised foreground split and ZeroShot restricted to it."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.methods.foreground import foreground_masks, mask_lookup, split_foreground
from pipeline.methods.zeroshot import ZeroShot

torch.set_num_threads(1)
S = 32


def scene(rng: np.random.Generator, fg_code: np.ndarray, n_parts: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A (C, 16, 16) feature map: a random backdrop code everywhere, an object disc in the
    middle whose pixels carry ``fg_code`` plus one distinct code per part (small blobs).
    Returns (features, true foreground mask at 16 x 16, part centres in crop px)."""
    C, r = fg_code.shape[0], 16
    back = rng.standard_normal(C)
    f = np.repeat(back[:, None, None], r, 1).repeat(r, 2) + 0.05 * rng.standard_normal((C, r, r))
    yy, xx = np.mgrid[:r, :r] + 0.5
    cx, cy = rng.uniform(6.5, 9.5, 2)
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 < 4.5**2
    f[:, disc] = fg_code[:, None] + 0.05 * rng.standard_normal((C, int(disc.sum())))
    centres = []
    for p in range(n_parts):
        a = 2 * np.pi * p / n_parts
        px, py = cx + 2.5 * np.cos(a), cy + 2.5 * np.sin(a)
        blob = (xx - px) ** 2 + (yy - py) ** 2 < 1.1**2
        code = np.zeros(C)
        code[p] = 6.0
        f[:, blob] = code[:, None]
        centres.append((px * S / r, py * S / r))
    return f.astype(np.float32), disc, np.array(centres, np.float32)


def test_split_finds_the_object_and_refuses_a_uniform_crop():
    rng = np.random.default_rng(0)
    fg_code = rng.standard_normal(8)
    f, disc, _ = scene(rng, fg_code)
    mask = split_foreground(f)
    assert (mask == disc).mean() > 0.9  # the parts' blobs may go either way
    assert not mask[0].any() and not mask[:, 0].any()  # the border is background
    # a split whose object part is implausibly small (2 of 256 cells) is not trusted: keep every pixel
    speck = np.ones((8, 16, 16), np.float32)
    speck[:, 7:9, 8] = -5.0
    assert split_foreground(speck).all()


def test_mask_lookup_maps_crop_pixels_to_cells():
    mask = np.zeros((4, 4), bool)
    mask[1, 2] = True  # cell (row 1, col 2) covers x in [16, 24), y in [8, 16) of a 32 px crop
    pts = np.array([[20.0, 12.0], [12.0, 20.0], [23.9, 8.1]])
    assert mask_lookup(mask, pts, 32).tolist() == [True, False, True]


def test_zeroshot_with_foreground_masks_ignores_the_backdrop():
    """With K = 4 clusters and 3 parts, the box-only run spends clusters on the
    backdrop (its codes differ per image); restricted to the foreground, every
    landmark lands on the object."""
    rng = np.random.default_rng(1)
    fg_code = rng.standard_normal(8)
    scenes = [scene(rng, fg_code) for _ in range(40)]
    feats = np.stack([s[0] for s in scenes])
    truth = np.stack([s[1] for s in scenes])
    rois = np.tile([0.0, 0.0, S, S], (len(scenes), 1))
    batches = lambda: ({"f@t0": feats[i : i + 8]} for i in range(0, len(feats), 8))  # noqa: E731
    masks = foreground_masks(batches(), resolution=16)
    assert (masks == truth).mean() > 0.9

    def on_object(lms) -> float:
        pts = lms.coords
        ok = lms.present
        inside = [mask_lookup(truth[i], pts[i][ok[i]], S) for i in range(len(pts))]
        return float(np.concatenate(inside).mean())

    box = ZeroShot(n_clusters=4, crop_size=S, n_samples_per_image=60, seed=0)
    box.fit(batches(), rois, progress=False)
    fg = ZeroShot(n_clusters=4, crop_size=S, n_samples_per_image=60, seed=0)
    fg.fit(batches(), rois, progress=False, masks=masks)
    assert on_object(fg.predict(batches(), rois, progress=False, masks=masks)) == 1.0
    assert on_object(box.predict(batches(), rois, progress=False)) < 1.0
