"""68-point evaluation end to end (300-W / LS3D layouts) under every protocol and box rule, on hand-made manifests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.datasets.base import DatasetMeta, Manifest, manifest_row
from pipeline.datasets.w300 import FACE68_NAMES

SIDE, K = 100, 10


def _layouts(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """68 GT points and K discovered points, both exact linear maps (no intercept) of z = (1, tx, ty):
    faces of one size translated inside a 100 px image, so the landmark box is the same in every image."""
    rng = np.random.default_rng(seed)
    z = np.column_stack([np.ones(n), rng.uniform(-10, 10, (n, 2))])
    template = np.random.default_rng(7).uniform(30, 70, (68, 2))
    template[36], template[45] = (35.0, 45.0), (65.0, 45.0)  # outer eye corners 30 px apart
    gt = template[None] + z[:, None, 1:3]
    disc = gt[:, :K] + np.random.default_rng(8).normal(0, 2, (K, 2))[None]  # a fixed offset per landmark
    return gt, disc


def _workspace(workspace, name: str, normalisation: str, norm_points) -> None:
    from flows.results import keypoints_frame
    from pipeline.methods.landmarks import LandmarkSet
    from storage.tables import append_table

    meta = DatasetMeta(name, FACE68_NAMES, normalisation=normalisation, norm_points=norm_points)
    for split, n, seed in (("train", 40, 0), ("test", 12, 1)):
        gt, disc = _layouts(n, seed)
        ids = np.array([f"{split}{i:03d}" for i in range(n)])
        rows = [manifest_row(i, split, f"{i}.png", SIDE, SIDE, g) for i, g in zip(ids, gt)]
        Manifest(pd.DataFrame(rows), meta).save(workspace.manifest(name, split))
        boxes = np.tile([0.0, 0.0, SIDE, SIDE], (n, 1))  # crop = the whole image, at 100 px: crop px = image px
        lms = LandmarkSet(disc.astype(np.float32), np.ones((n, K), bool), np.ones((n, K), np.float32))
        kp = keypoints_frame("r68", "m", "s", 0, ids, np.full(n, split), boxes, SIDE, lms)
        append_table(kp, workspace.run_file("r68", "keypoints.parquet"), "keypoints", replace_on=["image_id"])


def _nme(rows: pd.DataFrame) -> tuple[float, float, int]:
    m = rows[rows["repeat"] == -1].set_index("metric")
    return float(m.loc["nme_forward", "value"]), float(m.loc["nme_backward", "value"]), int(m.loc["nme_forward", "n_regressor_images"])


def test_300w_layout_under_each_protocol(workspace):
    from flows.results import evaluate_keypoints

    _workspace(workspace, "w68", "interocular", (36, 45))
    home = workspace.home
    fwd, bwd, n = _nme(evaluate_keypoints(home, "r68", "w68", "m", "s", 0, protocol="lstsq", plot=False))
    assert fwd < 1e-3 and bwd < 1e-3 and n == 40  # exact maps through the origin (float32 keypoints), every training image
    fwd, bwd, n = _nme(evaluate_keypoints(home, "r68", "w68", "m", "s", 0, protocol="mallis", plot=False))
    assert n == 40 and 0 < fwd < 5 and 0 < bwd < 5  # 68 points: no all-images rule, 300 capped at the 40 there are
    paper = evaluate_keypoints(home, "r68", "w68", "m", "s", 0, plot=False)
    hung = paper[(paper["repeat"] == -1) & (paper["metric"] == "acc0.2_hungarian")]["value"].iloc[0]
    # offsets of 2 px (sd) against 0.2 x 30 px = 6 px: matched landmarks are hits
    assert hung == pytest.approx(K / 68)  # 10 of the 68 GT points have a discovered partner
    # the inter-ocular normaliser does not use a box: both rules give the same numbers
    assert _nme(evaluate_keypoints(home, "r68", "w68", "m", "s", 0, box="image", plot=False))[:2] == pytest.approx(_nme(paper)[:2])


def test_ls3d_layout_box_rules_scale_the_error_by_the_box_ratio(workspace):
    from flows.results import evaluate_keypoints

    _workspace(workspace, "l68", "landmark_box", None)
    home = workspace.home
    gt, _ = _layouts(1, 0)
    wh = np.ptp(gt[0], axis=0)
    lm = _nme(evaluate_keypoints(home, "r68", "l68", "m", "s", 0, protocol="mallis", plot=False))
    im = _nme(evaluate_keypoints(home, "r68", "l68", "m", "s", 0, protocol="mallis", box="image", plot=False))
    # the same pixel errors over sqrt(w*h) of the landmark box vs of the 100 x 100 image
    ratio = np.sqrt(wh[0] * wh[1]) / SIDE
    assert im[0] == pytest.approx(lm[0] * ratio, rel=1e-6) and im[1] == pytest.approx(lm[1] * ratio, rel=1e-6)
