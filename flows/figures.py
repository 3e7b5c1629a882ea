"""Contact sheets of a run's landmarks on test crops: for looking rather than reading.

Plain functions (no Prefect), shared by ``uld demo`` and every D-ULD run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def landmark_sheet(
    home: str | Path,
    run_id: str,
    dataset: str,
    crop_size: int,
    crop_margin: float,
    path: str | Path,
    title: str,
    split: str = "test",
    stage: str | None = None,
    round_: int | None = None,
    n_images: int = 16,
) -> Path:
    """Write a PNG of the first ``n_images`` crops of ``split`` with the run's landmarks.

    ``stage`` / ``round_`` pick one evaluated stage of the run (default: its
    last round). Fallback landmarks (present but filled in, not detected; the
    keypoints' ``fallback`` column) are drawn as hollow circles, detections as
    filled dots, so a sheet shows at a glance which points the detector found.
    """
    from flows.datasets import load_manifest
    from flows.results import keypoint_arrays, keypoint_fallback, read_keypoints
    from pipeline.datasets.crop import load_crops, to_crop
    from pipeline.datasets.show import contact_sheet
    from pipeline.errors import StoreError

    home = Path(home)
    kp = read_keypoints(home, run_id)
    kp = kp[kp["split"] == split]
    if round_ is None:
        round_ = int(kp["round"].max())
    kp = kp[kp["round"] == int(round_)]
    if stage is not None:
        kp = kp[kp["stage"] == stage]
    manifest = load_manifest(home, dataset, split)
    ids, coords, present, boxes = keypoint_arrays(kp)  # the crop boxes the run itself used
    fallback = keypoint_fallback(kp)
    pos = {i: n for n, i in enumerate(ids)}
    take = [j for j, i in enumerate(manifest.image_ids) if i in pos][:n_images]
    if not take:
        raise StoreError(f"run {run_id!r} has no {split} keypoints for round {round_}", where=str(path), fix="evaluate the run first")
    crops, _ = load_crops(manifest, crop_size, crop_margin, indices=np.asarray(take), progress=False)
    sel = np.array([pos[manifest.image_ids[j]] for j in take])
    pts = to_crop(coords[sel], boxes[sel], crop_size)
    pts = np.where(present[sel][..., None], pts, np.nan)
    names = [f"landmark {i}" for i in range(pts.shape[1])]
    # contact_sheet draws "not visible" points hollow: used here for fallback points.
    return contact_sheet(crops, pts, ~fallback[sel], names, Path(path), title=f"{title} (hollow = fallback, not detected)")
