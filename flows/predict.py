"""`uld predict` / `uld export-model`: a trained method on new images, and as a folder to copy.

Every trained method of the project (ZeroShot, D-ULD, Mallis (D), D-ULD++, Jakab, C3,
StableKeypoints: ``pipeline.predictor.RUN_METHODS``).

Thin: the model bundle, the on-the-fly features and the methods are in
:mod:`pipeline.predictor`; this module turns command-line inputs (a run id or
folder, paths / globs / folders of images, or a dataset split) into its calls
and writes the results (``predictions.parquet``, a skipped-images table,
optional overlays).

Plain functions, not a Prefect flow: a prediction has no stages to resume, and
starting Prefect's temporary server costs ~10 s on a busy 2-core machine.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError, DatasetError
from pipeline.predictor import ImageItem, LandmarkPredictor, PredictionResult
from storage.layout import Workspace
from storage.tables import write_table

def resolve_model(home: str | Path, model: str | Path) -> Path:
    """``model`` as a folder: an existing path, else the run id ``<home>/runs/<model>``."""
    p = Path(model).expanduser()
    if p.exists():
        return p
    ws = Workspace(Path(home))
    try:
        run = ws.run_dir(str(model))
    except ConfigError:
        run = None
    if run is not None and run.is_dir():
        return run
    raise ConfigError(
        f"no model {str(model)!r}: neither a folder nor a run id in the workspace",
        where=str(p if run is None else run),
        fix="pass a run folder, a run id (see `ls <home>/runs`, with the same --home) or a folder written by `uld export-model`",
    )


def collect_images(patterns: list[str]) -> list[str]:
    """Image paths from files, folders (every image below, as the ``folder`` dataset lists them) and globs.

    Order is kept (sorted within a folder or glob); a path named twice is kept once.
    Files that are not images are still returned: reading them is what reports them.
    """
    from pipeline.datasets.folder import list_images

    out: list[str] = []
    for pattern in patterns:
        p = Path(pattern).expanduser()
        if p.is_dir():
            found = [str(x) for x in list_images(p)]
            if not found:
                raise DatasetError("no image files in this folder", where=str(p), fix="point --images at images, a folder of images or a glob")
        elif p.is_file():
            found = [str(p)]
        else:
            found = sorted(x for x in glob.glob(str(p), recursive=True) if Path(x).is_file())
            if not found:
                raise DatasetError("no file matches", where=pattern, fix="check the path or glob (quote globs so the shell leaves them alone)")
        out.extend(found)
    return list(dict.fromkeys(out))


def dataset_items(home: str | Path, dataset: str, split: str, predictor: LandmarkPredictor) -> list[ImageItem]:
    """The images of a dataset split with their manifest object boxes, as a feature store would see them.

    Each image's noise index is its store row (train manifest, then test) and
    images go through the backbone in the store's batches -- shards of
    ``shard_size`` rows cut into ``extraction_batch_size`` (as
    ``flows.features.compute_shard`` does) -- with their batch mates of the other
    split encoded alongside (``keep=False``): a CPU convolution's last bits
    depend on the batch size, and this makes the features equal to the store's.

    A method that reads crops (Jakab, C3, StableKeypoints) has no store batches: its items are
    the split's images alone, each with its row in the same (train, then test) order, the row
    its run seeded the image's noise with.
    """
    from flows.features import SPLITS, load_manifests

    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}", where="--split", fix=f"use one of {', '.join(SPLITS)}")
    frame = load_manifests(home, dataset).frame.reset_index(drop=True)
    boxes = frame[["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]].to_numpy(np.float64)
    if predictor.recipe is None:
        return [ImageItem(str(frame.at[r, "path"]), str(frame.at[r, "image_id"]), tuple(float(v) for v in boxes[r]), int(r))
                for r in np.flatnonzero((frame["split"] == split).to_numpy())]
    shard, bs = predictor.recipe.shard_size, predictor.recipe.extraction_batch_size
    rows = np.arange(len(frame))
    group = (rows // shard) * (shard // bs + 1) + (rows % shard) // bs
    wanted = (frame["split"] == split).to_numpy()
    touched = np.isin(group, group[wanted])
    return [
        ImageItem(str(frame.at[r, "path"]), str(frame.at[r, "image_id"]), tuple(float(v) for v in boxes[r]), int(r), int(group[r]), bool(wanted[r]))
        for r in rows[touched]
    ]


def write_overlays(result: PredictionResult, directory: str | Path, title: str) -> list[Path]:
    """One PNG per predicted image under ``directory``: the image with its landmarks (same landmark, same colour)."""
    from pipeline.datasets.images import read_image
    from pipeline.datasets.show import landmark_overlay

    directory = Path(directory)
    out = []
    frame = result.frame
    for n, (image_id, rows) in enumerate(frame.groupby("image_id", sort=False)):
        rows = rows.sort_values("landmark_id")
        pts = np.where(rows["present"].to_numpy()[:, None], rows[["x", "y"]].to_numpy(np.float64), np.nan)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(image_id)).stem).strip("._-") or "image"
        path = directory / f"{n:05d}-{name}.png"
        out.append(landmark_overlay(read_image(rows["image"].iloc[0]), pts, ~rows["fallback"].to_numpy(), path, f"{title}: {image_id}"))
    return out


def predict(
    model: str | Path,
    images: list[str] | None = None,
    *,
    out: str | Path = "predictions.parquet",
    home: str | Path = "workspace",
    dataset: str | None = None,
    split: str = "test",
    overlays: str | Path | None = None,
    batch_size: int | None = None,
    backbone: str | None = None,
    round_: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> PredictionResult:
    """Landmarks of ``images`` (paths, folders, globs) or of a dataset split, written to ``out``.

    Also writes ``<out stem>-skipped.parquet`` when images could not be read
    (their reasons), and with ``overlays`` one PNG per image. ``batch_size``
    default: 16, or for a dataset split the batch the run predicted its splits with
    (``LandmarkPredictor.eval_batch``: D-ULD's evaluation batch 32, ...), so the run's
    keypoints are reproduced exactly.
    """
    if (images is None) == (dataset is None):
        raise ConfigError("give either images or a dataset split, not both or neither", where="--images / --dataset",
                          fix="`--images 'photos/*.jpg'` for new images, or `--dataset NAME --split test` for a dataset's own crops")
    path = resolve_model(home, model)
    predictor = LandmarkPredictor.from_pretrained(path, backbone=backbone, device=device, round_=round_)
    if dataset is not None:
        items = dataset_items(home, dataset, split, predictor)
        default_batch = predictor.eval_batch
    else:
        items = collect_images(list(images))
        default_batch = 16
    result = predictor.run(items, batch_size=batch_size or default_batch, progress=progress)
    out = Path(out)
    meta = {"model": str(path), "source": predictor.source, "backbone": predictor.backbone_ref.to_json(), "n_skipped": len(result.skipped)}
    write_table(result.frame, out, "predictions", metadata=meta)
    if len(result.skipped):
        from storage.atomic import atomic_path

        with atomic_path(skipped_path(out)) as tmp:
            result.skipped.to_parquet(tmp, index=False)
    if overlays is not None and len(result.frame):
        write_overlays(result, overlays, f"{predictor.method} ({predictor.source.get('run_id', path.name)})")
    return result


def skipped_path(out: str | Path) -> Path:
    """Where :func:`predict` lists the images it skipped: ``<out stem>-skipped.parquet``."""
    out = Path(out)
    return out.with_name(f"{out.stem}-skipped.parquet")


def export_model(model: str | Path, out: str | Path, *, home: str | Path = "workspace", round_: int | None = None) -> Path:
    """Write a run's model as a self-contained folder (:meth:`LandmarkPredictor.save_pretrained`)."""
    predictor = LandmarkPredictor.from_pretrained(resolve_model(home, model), round_=round_, load_backbone=False)
    return predictor.save_pretrained(out)


def skipped_table(result: PredictionResult) -> pd.DataFrame:
    """The skipped images with their reasons, for printing."""
    return result.skipped[["image", "reason"]]
