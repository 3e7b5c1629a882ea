"""``uld discover``: landmarks for a folder (or glob) of your own images, in one command.

Chains the existing stages: the ``folder`` loader's manifests (object box = the
whole image, or a box file's boxes; each row records which: ``box_source``; test =
its seeded 10% hold-out) -> optionally a category DDPM trained on the images
(``flows.backbone.train_backbone``) -> the backbone's features -> a method (ZeroShot
or D-ULD) -> the run's ``keypoints.parquet`` (original pixels) plus ``landmarks.csv``
with each image's path -> overlays -> the flip and warp checks -> ``report.html``.
No labels, so no NME: what is measured is what needs none (landmark presence,
cluster quality, consistency under a horizontal flip and under small affine warps).

A plain function over the stage flows; every stage resumes, and the default run
id is derived from the dataset name, method, K, the feature store and the method's settings, so
the same command again finishes at once and a changed image set starts a new run.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flows.report import OVERLAY_DIR
from pipeline.datasets.crop import DEFAULT_CROP_MARGIN
from pipeline.errors import ConfigError, DatasetError
from pipeline.evaluation.warp import WarpRange
from storage.layout import Workspace, check_name

METHODS = ("zeroshot", "duld")
FLIP_STAGE_METRIC = "flip_error"
WARP_STAGE_METRIC = "warp_error"


@dataclass
class DiscoverResult:
    dataset: str
    run_id: str
    run_dir: Path
    store: Path
    n_train: int
    n_test: int
    skipped: pd.DataFrame
    landmarks_csv: Path
    overlays: list[Path] = field(default_factory=list)
    report: Path | None = None
    consistency: pd.DataFrame | None = None  # per landmark: flip / warp errors and the re-noise floor
    backbone: str = "shipped"

    @property
    def flip(self) -> pd.DataFrame | None:
        """The consistency table (its flip columns: ``partner``, ``flip_error``, ``n_pairs``)."""
        return self.consistency

    def summary(self) -> str:
        parts = [f"{self.n_train + self.n_test} images ({self.n_test} held out as test), {len(self.skipped)} skipped",
                 f"backbone {self.backbone}", f"run {self.run_id}", f"landmarks: {self.landmarks_csv}"]
        if self.overlays:
            parts.append(f"overlays: {self.overlays[0].parent} ({len(self.overlays)})")
        if self.report is not None:
            parts.append(f"report: {self.report}")
        return "\n".join(parts)


# ------------------------------------------------------------ manifests
def _images_and_root(images: str) -> tuple[list[Path], Path]:
    from flows.predict import collect_images

    paths = [Path(p).absolute() for p in collect_images([images])]
    src = Path(images).expanduser()
    root = src.absolute() if src.is_dir() else Path(os.path.commonpath([str(p.parent) for p in paths]))
    return paths, root


def default_name(images: str) -> str:
    """The dataset name a folder (or glob) gets: ``folder-<its folder's name>``."""
    src = Path(images).expanduser().absolute()
    base = src if src.is_dir() else next((p for p in src.parents if not any(c in p.name for c in "*?[")), src.parent)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", base.name).strip("-._") or "images"
    return f"folder-{stem}"


BOX_COLUMNS = ("image", "x0", "y0", "x1", "y1")


def read_box_file(path: str | Path, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (manifest rows) with the object boxes a CSV file gives (``box_source`` ``file``).

    The CSV has a header ``image,x0,y0,x1,y1`` (original pixels); ``image`` is the image's manifest id
    (its path relative to the folder ``--images`` names), a path relative to the CSV's folder, or an absolute path. Images the file does not list keep the
    whole image as their box; listed files that are not among the images are ignored; a name that is no
    file, or a box that is empty or outside its image, is an error naming the file's line.
    """
    src = Path(path)
    try:
        given = pd.read_csv(src, dtype={"image": str})
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read the box file: {exc}", where=str(src), fix=f"a CSV with the header {','.join(BOX_COLUMNS)}") from None
    missing = [c for c in BOX_COLUMNS if c not in given.columns]
    if missing:
        raise DatasetError(f"the box file lacks the columns {missing}", where=str(src), fix=f"a CSV with the header {','.join(BOX_COLUMNS)}")
    by_key = {str(k): i for i, k in enumerate(frame["image_id"])}
    by_path = {str(Path(p).absolute()): i for i, p in enumerate(frame["path"])}
    out = frame.copy()
    for line, r in enumerate(given.itertuples(index=False), start=2):
        where = f"{src}, line {line}"
        key = str(r.image)
        file = Path(key) if Path(key).is_absolute() else src.parent / key
        i = by_key.get(key, by_path.get(str(file.absolute())))
        if i is None and file.is_file():
            continue  # an image the glob (or a skip) left out: one box file can serve several selections
        if i is None:
            raise DatasetError(f"{key!r} is not one of the images", where=where, fix="name images by their path relative to the images' folder or to the box file's folder, or absolutely")
        box = np.array([r.x0, r.y0, r.x1, r.y1], np.float64)
        w, h = float(out.at[i, "width"]), float(out.at[i, "height"])
        if not (np.isfinite(box).all() and box[2] > box[0] and box[3] > box[1] and box[0] < w and box[1] < h and box[2] > 0 and box[3] > 0):
            raise DatasetError(f"box {box.tolist()} of {key!r} is empty or outside its {w:.0f} x {h:.0f} image", where=where,
                               fix="give x0 < x1, y0 < y1 in the image's pixels")
        out.loc[i, ["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]] = box
        out.at[i, "box_source"] = "file"
    return out


def build_folder_manifests(images: str, home: str | Path, name: str, boxes: str | Path | None = None) -> tuple[int, int, pd.DataFrame]:
    """Write ``manifests/<name>/{train,test}.parquet`` for the images ``images`` names.

    Unreadable files are skipped (and listed in ``skipped.parquet``). When the
    seeded hold-out leaves a split empty (a small folder), the last image by
    path is the test split and the others train, so every stage has both splits.
    Each row records how its object box was made (``box_source``): ``image`` (the whole
    image, the folder rule), or ``file`` for the images the CSV ``boxes`` lists (:func:`read_box_file`).
    """
    from pipeline.datasets.base import Manifest
    from pipeline.datasets.registry import get_loader
    from flows.datasets import skipped_frame
    from storage.tables import write_table

    ws = Workspace(Path(home))
    check_name("dataset", name)
    paths, root = _images_and_root(images)
    wanted = {str(p) for p in paths}
    loader = get_loader("folder")
    frames, skipped, meta = {}, [], None
    for split in ("train", "test"):
        manifest, bad = loader.load(root, split, skip_bad=True)
        meta = manifest.meta
        frames[split] = manifest.frame[manifest.frame["path"].isin(wanted)].reset_index(drop=True)
        skipped += [s for s in bad if str(Path(s.source).absolute()) in wanted]
    if len(frames["train"]) + len(frames["test"]) < 2:
        raise DatasetError(f"{len(frames['train']) + len(frames['test'])} readable image(s): at least 2 are needed (one to learn from, one to hold out)",
                           where=images, fix="point --images at a folder or glob with more images")
    # Small folders: the hash hold-out can leave a split empty; keep one image (the last by path) as test.
    if frames["test"].empty or frames["train"].empty:
        every = pd.concat([frames["train"], frames["test"]]).sort_values("path").reset_index(drop=True)
        frames = {"train": every.iloc[:-1].assign(split="train").reset_index(drop=True),
                  "test": every.iloc[-1:].assign(split="test").reset_index(drop=True)}
    if boxes is not None:
        every = read_box_file(boxes, pd.concat([frames["train"], frames["test"]], ignore_index=True))
        frames = {s: every[every["split"] == s].reset_index(drop=True) for s in ("train", "test")}
    for split, frame in frames.items():
        Manifest(frame, meta).save(ws.manifest(name, split))
    skipped_df = skipped_frame(name, skipped)
    if len(skipped_df):
        write_table(skipped_df, ws.skipped(name), "skipped")
    elif ws.skipped(name).is_file():
        ws.skipped(name).unlink()  # left by an earlier call on other images
    return len(frames["train"]), len(frames["test"]), skipped_df


# ------------------------------------------------------------ outputs
def landmarks_table(home: str | Path, run_id: str, dataset: str) -> pd.DataFrame:
    """The run's last-round landmarks (original pixels) of every image, with the image's path."""
    from flows.datasets import load_manifest
    from flows.results import read_keypoints

    kp = read_keypoints(home, run_id)
    last = int(kp["round"].max())
    kp = kp[kp["round"] == last]
    paths = pd.concat([load_manifest(home, dataset, s).frame[["image_id", "path", "width", "height"]] for s in ("train", "test")])
    out = kp.merge(paths, on="image_id", how="left")
    cols = ["split", "image_id", "path", "width", "height", "landmark_id", "x", "y", "score", "present", "fallback", "stage", "round"]
    return out[cols].sort_values(["split", "image_id", "landmark_id"], kind="stable").reset_index(drop=True)


def write_overlays(table: pd.DataFrame, directory: Path, title: str, limit: int) -> list[Path]:
    """One PNG per image (test images first, at most ``limit``): same landmark, same colour; hollow = fallback."""
    from pipeline.datasets.images import read_image
    from pipeline.datasets.show import landmark_overlay

    ordered = pd.concat([table[table["split"] == "test"], table[table["split"] != "test"]])
    out = []
    for n, (image_id, rows) in enumerate(ordered.groupby("image_id", sort=False)):
        if n >= limit:
            break
        rows = rows.sort_values("landmark_id")
        pts = np.where(rows["present"].to_numpy()[:, None], rows[["x", "y"]].to_numpy(np.float64), np.nan)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(image_id)).with_suffix("").as_posix()).strip("._-") or "image"
        out.append(landmark_overlay(read_image(rows["path"].iloc[0]), pts, ~rows["fallback"].to_numpy(bool),
                                    directory / f"{rows['split'].iloc[0]}-{stem}.png", f"{title}: {image_id}"))
    return out


# ------------------------------------------------------------ label-free consistency: flip and small warps
def _image_seed(seed: int, image_id: str) -> int:
    """A per-image seed from the image's id, so an image gets the same warp whatever else is checked with it."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{int(seed)}:{image_id}".encode(), digest_size=8).digest(), "little")


def consistency_check(
    run_dir: Path,
    table: pd.DataFrame,
    boxes: pd.DataFrame,
    device: str = "cpu",
    max_images: int = 64,
    flip: bool = True,
    warp: bool = True,
    seed: int = 0,
    warp_range: WarpRange | None = None,
) -> pd.DataFrame:
    """Predict up to ``max_images`` images (test first) with the run's model, and their mirror images
    (``flip``) and seeded small affine warps (``warp``); per landmark, how far its landmarks move when
    mapped back (% of sqrt(w*h) of the object box), next to the re-noise floor.

    ``boxes``: per ``image_id``, the manifest's object box (``bbox_x0..bbox_y1``) and ``box_source``
    (:meth:`pipeline.datasets.base.Manifest.box_sources`). The transformed image's box follows the
    rule the box was made by: ``image`` is the whole (transformed) image again, a ``landmarks`` or
    ``file`` box moves with the object (mirrored, or the box around its warped corners).

    Flip: the partner of landmark k is found by Hungarian matching (a left-eye landmark should come
    back as the right-eye one; ``pipeline.evaluation.flip.flip_consistency``). Warp: a warp this
    small keeps each landmark itself (``pipeline.evaluation.warp.warp_consistency``).
    """
    from pipeline.datasets.images import read_image
    from pipeline.evaluation.flip import flip_consistency, same_landmark_error
    from pipeline.evaluation.warp import small_affine, warp_box, warp_consistency, warp_image
    from pipeline.predictor import ImageItem, LandmarkPredictor
    from PIL import Image

    # Test images first, then training ones: the check needs no labels, so any image counts.
    ordered = pd.concat([table[table["split"] == "test"], table[table["split"] != "test"]])
    chosen = ordered.drop_duplicates("image_id").head(max_images)[["image_id", "path", "width", "height"]]
    chosen = chosen.merge(boxes, on="image_id", how="left").reset_index(drop=True)
    if chosen.empty or not (flip or warp):
        return pd.DataFrame()
    box = chosen[["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]].to_numpy(np.float64)
    source = chosen["box_source"].astype(str).to_numpy()
    # Errors in % of sqrt(w*h) of the object box (the whole image for a folder of photos).
    sizes = np.stack([box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]], axis=1)
    n = len(chosen)
    limits = warp_range or WarpRange()
    matrices = np.stack([small_affine(np.random.default_rng(_image_seed(seed, str(i))), float(w), float(h), limits)
                         for i, w, h in chosen[["image_id", "width", "height"]].itertuples(index=False)])
    predictor = LandmarkPredictor.from_pretrained(run_dir, device=device)
    with tempfile.TemporaryDirectory(prefix="uld-check-") as tmp:
        items = []
        for i, row in enumerate(chosen.itertuples(index=False)):
            W = float(row.width)
            x0, y0, x1, y1 = box[i]
            items.append(ImageItem(str(row.path), f"o{i:05d}", box=(x0, y0, x1, y1)))
            image = read_image(row.path)
            if flip:
                path = Path(tmp) / f"f{i:05d}.png"
                Image.fromarray(np.ascontiguousarray(image[:, ::-1])).save(path)
                items.append(ImageItem(str(path), f"f{i:05d}", box=(W - x1, y0, W - x0, y1)))
            if warp:
                path = Path(tmp) / f"w{i:05d}.png"
                Image.fromarray(warp_image(image, matrices[i])).save(path)
                wbox = (x0, y0, x1, y1) if source[i] == "image" else tuple(float(v) for v in warp_box(box[i], matrices[i]))
                items.append(ImageItem(str(path), f"w{i:05d}", box=wbox))
        frame = predictor.run(items, progress=False).frame
    K = predictor.k

    def arrays(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        pts = np.full((n, K, 2), np.nan)
        present = np.zeros((n, K), bool)
        for r in frame[frame["image_id"].str.startswith(prefix)].itertuples(index=False):
            i = int(r.image_id[1:])
            pts[i, r.landmark_id] = (r.x, r.y)
            present[i, r.landmark_id] = bool(r.present) and not bool(r.fallback)
        return pts, present

    orig, p_orig = arrays("o")
    out = pd.DataFrame({"landmark_id": np.arange(K)})
    if flip:
        mirrored, p_mirrored = arrays("f")
        # flip_consistency mirrors about sizes[:, 0] and normalises by sqrt(w*h) of sizes: given the box's
        # size, shift the mirror images' x by the box's width deficit so the mirror is about the image width W.
        mirrored[..., 0] -= (chosen["width"].to_numpy(np.float64) - sizes[:, 0])[:, None]
        res = flip_consistency(orig, p_orig, mirrored, p_mirrored, sizes)
        out = out.assign(partner=res.partner, flip_error=res.error, n_pairs=res.n_pairs)
    if warp:
        warped, p_warped = arrays("w")
        err, count = warp_consistency(orig, p_orig, warped, p_warped, matrices, sizes)
        # The reference: the error of landmarks that stay put (how far the inverse warp moves them).
        # A warp error above it means the landmarks jump further than the image moved.
        motion, _ = warp_consistency(orig, p_orig & p_warped, orig, p_orig & p_warped, matrices, sizes)
        out = out.assign(warp_error=err, warp_motion=motion, n_warp=count)
    # The noise floor: the run's own landmarks of the same images (the feature store's noise) against
    # the predictor's (a new image's noise). An error near it is as good as the features allow.
    run_pts = np.full((n, K, 2), np.nan)
    run_present = np.zeros((n, K), bool)
    pos = {image_id: i for i, image_id in enumerate(chosen["image_id"])}
    for r in table[table["image_id"].isin(pos)].itertuples(index=False):
        run_pts[pos[r.image_id], r.landmark_id] = (r.x, r.y)
        run_present[pos[r.image_id], r.landmark_id] = bool(r.present) and not bool(r.fallback)
    renoise, _ = same_landmark_error(orig, p_orig, run_pts, run_present, sizes)
    return out.assign(renoise_error=renoise)


def _write_consistency_metrics(home: Path, run_id: str, dataset: str, method: str, check: pd.DataFrame) -> None:
    """The check's rows in the run's metrics table: overall ``flip_error`` / ``warp_error`` / ``warp_motion``
    (weighted by the images that count) and ``renoise_error``, and per landmark ``*_lm<k>``."""
    from flows.results import read_keypoints, write_metrics

    kp = read_keypoints(home, run_id)
    last = kp[kp["round"] == kp["round"].max()]
    stage, round_ = str(last["stage"].iloc[-1]), int(last["round"].iloc[-1])
    base = {"run_id": run_id, "method": method, "stage": stage, "round": round_, "dataset": dataset, "split": "all",  # test images first, then train
            "k": len(check), "n_regressor_images": -1, "repeat": -1}

    def overall(errors: pd.Series, weights: pd.Series) -> float:
        e, w = errors.to_numpy(np.float64), weights.to_numpy(np.float64)
        ok = np.isfinite(e) & (w > 0)
        return float(np.average(e[ok], weights=w[ok])) if ok.any() else float("nan")

    rows = []
    if "flip_error" in check:
        rows.append({**base, "metric": FLIP_STAGE_METRIC, "value": overall(check["flip_error"], check["n_pairs"])})
    if "warp_error" in check:
        rows.append({**base, "metric": WARP_STAGE_METRIC, "value": overall(check["warp_error"], check["n_warp"])})
        rows.append({**base, "metric": "warp_motion", "value": overall(check["warp_motion"], check["n_warp"])})
    floor = check["renoise_error"].to_numpy(np.float64)
    rows.append({**base, "metric": "renoise_error", "value": float(np.nanmean(floor)) if np.isfinite(floor).any() else float("nan")})
    for r in check.to_dict("records"):
        k = int(r["landmark_id"])
        for column, metric in (("flip_error", "flip_error"), ("partner", "flip_partner"), ("warp_error", "warp_error"),
                               ("warp_motion", "warp_motion"), ("renoise_error", "renoise_error")):
            if column in r:
                rows.append({**base, "metric": f"{metric}_lm{k}", "value": float(r[column])})
    write_metrics(home, run_id, rows)


# ------------------------------------------------------------ the command
def default_run_id(name: str, method: str, k: int, store: Path, seed: int, settings: dict[str, Any], options: dict[str, Any]) -> str:
    """``<name>-<method>-k<K>-<8 hex>``: the hex digest covers the feature store (so the image set and
    feature spec) and the method's settings, so the same command resumes its run and a changed one
    (more images, other options) starts its own."""
    import hashlib
    import json

    key = json.dumps({"store": Path(store).name, "seed": int(seed), **settings, **options}, sort_keys=True, default=str)
    return f"{name}-{method}-k{int(k)}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def clear_run(run_dir: Path) -> None:
    """Delete a run folder so its method starts over (``--force``); refused while another process writes it."""
    import shutil

    from storage.locks import WriterLock

    if not run_dir.exists():
        return
    with WriterLock(run_dir, "run"):  # BusyError (exit 2) when a method is writing it now
        shutil.rmtree(run_dir)


# ------------------------------------------------------------ your own backbone
def own_backbone_name(home: str | Path, dataset: str, size: int, crop_margin: float, seed: int) -> str:
    """``ddpm-<dataset>-<size>-<8 hex>``: the hex covers the training images (ids, boxes), the crop margin and the
    seed, i.e. what the trainer refuses to resume across; the step count is left out so that more
    ``--backbone-steps`` continue the same training."""
    import hashlib
    import json

    from flows.datasets import load_manifest

    train = load_manifest(home, dataset, "train").frame.sort_values("image_id")
    boxes = train[["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]].to_numpy(np.float64).round(3).tolist()
    key = json.dumps({"images": train["image_id"].tolist(), "boxes": boxes, "crop_margin": float(crop_margin), "seed": int(seed)}, sort_keys=True)
    return check_name("backbone", f"ddpm-{dataset}-{int(size)}-{hashlib.sha256(key.encode()).hexdigest()[:8]}")


def trained_steps(backbone_dir: Path) -> int | None:
    """Steps of the exported training in ``backbone_dir`` (its ``uld_backbone.json``, written last), None if none."""
    import json

    from pipeline.backbones.ddpm import META_FILE

    try:
        meta = json.loads((Path(backbone_dir) / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    steps = (meta.get("training") or {}).get("steps")
    return None if steps is None else int(steps)


def train_own_backbone(
    home: str | Path, dataset: str, *, size: int, crop_margin: float, seed: int, steps: int, device: str,
    batch_size: int = 32, channels: tuple[int, ...] | None = None,
) -> str:
    """Train (or continue, or skip) a category DDPM on ``dataset``'s training crops with the backbone flow
    (``flows.backbone.train_backbone``: its checkpoints, export and thread default); returns its workspace name.

    Skipped when the exported model already has ``steps`` steps; continued from its newest checkpoint when
    it has fewer (an interrupted run, or a larger ``steps``); refused when it has more.
    """
    import torch

    from flows.backbone import train_backbone
    from flows.cli_options import TRAIN_THREADS

    if steps < 1:
        raise ConfigError(f"--backbone-steps must be >= 1, got {steps}", where="--backbone-steps", fix="use e.g. 3000")
    ws = Workspace(Path(home))
    name = own_backbone_name(home, dataset, size, crop_margin, seed)
    done = trained_steps(ws.backbone_dir(name))
    if done == steps:
        return name
    if done is not None and done > steps:
        raise ConfigError(f"backbone {name} is already trained for {done} steps, more than --backbone-steps {steps}",
                          where="--backbone-steps", fix=f"pass --backbone-steps {done} (or more, to continue it)")
    threads = torch.get_num_threads()
    try:
        train_backbone(dataset=dataset, home=Path(home), steps=steps, batch_size=batch_size, image_size=size, margin=crop_margin,
                       seed=seed, name=name, device=device, threads=TRAIN_THREADS, channels=channels)
    finally:
        torch.set_num_threads(threads)  # the trainer's thread count is for training; later stages keep theirs
    return name


def manifest_boxes(home: str | Path, dataset: str) -> pd.DataFrame:
    """Per image of both splits: the object box and how it was made (``box_source``)."""
    from flows.datasets import load_manifest

    parts = []
    for split in ("train", "test"):
        m = load_manifest(home, dataset, split)
        parts.append(m.frame[["image_id", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]].assign(box_source=m.box_sources()))
    return pd.concat(parts, ignore_index=True)


def discover(
    images: str,
    *,
    method: str = "zeroshot",
    k: int = 10,
    backbone: str | None = None,
    home: str | Path = "workspace",
    name: str | None = None,
    run_id: str | None = None,
    size: int = 64,
    timesteps: str | None = None,
    layers: str | None = None,
    crop_margin: float = DEFAULT_CROP_MARGIN,
    seed: int = 0,
    device: str = "cpu",
    rounds: int = 3,
    steps_per_round: int = 150,
    bootstrap_steps: int = 300,
    n_samples_per_image: int = 200,
    max_overlays: int = 48,
    flip: bool = True,
    warp: bool = True,
    method_options: dict[str, Any] | None = None,
    force: bool = False,
    train_backbone: bool = False,
    backbone_steps: int = 3000,
    backbone_options: dict[str, Any] | None = None,
    boxes: str | Path | None = None,
) -> DiscoverResult:
    """Landmarks for the images ``images`` (folder, file or glob) with ``method``; see the module doc.

    ``backbone``: the features' backbone (default ``shipped``). ``train_backbone`` first trains a
    category DDPM on the images' training crops for ``backbone_steps`` steps (resumable, see
    :func:`train_own_backbone`; ``backbone_options``: ``batch_size``, ``channels``) and uses it.
    ``flip`` / ``warp``: the label-free consistency checks (:func:`consistency_check`). ``boxes``: a CSV
    of object boxes for some images (:func:`read_box_file`; the others: the whole image).
    ``force`` redoes the method run from scratch (the run folder's method outputs are
    replaced; the manifests, backbone and features are still reused): what the config-mismatch
    error of an existing ``--run-id`` suggests.
    """
    from flows.cli_options import feature_spec
    from flows.features import extract_features
    from flows.report import write_report

    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}", where="--method", fix=f"use one of {', '.join(METHODS)}")
    if k < 1:
        raise ConfigError(f"-k must be >= 1, got {k}", where="-k")
    if train_backbone and backbone is not None:
        raise ConfigError(f"--train-backbone trains the backbone the features use, so --backbone {backbone!r} has no effect",
                          where="--backbone", fix="drop --backbone, or drop --train-backbone to use that backbone")
    home = Path(home)
    ws = Workspace(home)
    name = check_name("dataset", name or default_name(images))
    n_train, n_test, skipped = build_folder_manifests(images, home, name, boxes)
    if train_backbone:
        backbone = train_own_backbone(home, name, size=size, crop_margin=crop_margin, seed=seed, steps=backbone_steps, device=device,
                                      **(backbone_options or {}))
    backbone = backbone or "shipped"
    spec = feature_spec(size, timesteps, layers, crop_margin, None, seed, backbone=backbone, home=home)
    store = Path(extract_features(name, backbone, spec, home=home, device=device))
    opts = dict(method_options or {})
    run_id = check_name("run id", run_id or default_run_id(name, method, k, store, seed, {
        "rounds": rounds, "steps_per_round": steps_per_round, "bootstrap_steps": bootstrap_steps} if method == "duld" else {
        "n_samples_per_image": n_samples_per_image}, opts))
    if method == "zeroshot":
        from flows.zeroshot import zeroshot

        zeroshot(name, backbone, spec, k=k, home=home, seed=seed, run_id=run_id, store_path=store, evaluate=False, device=device,
                 n_samples_per_image=n_samples_per_image, force=force, **opts)
    else:
        from flows.duld import duld

        if force:
            clear_run(ws.run_dir(run_id))
        resume = ws.run_file(run_id, "config.json").is_file()
        duld(name, backbone, spec, k=k, rounds=rounds, steps_per_round=steps_per_round, bootstrap_steps=bootstrap_steps, home=home,
             seed=seed, run_id=run_id, resume=resume, store_path=store, device=device, **opts)
    run_dir = ws.run_dir(run_id)
    table = landmarks_table(home, run_id, name)
    from storage.atomic import atomic_path

    csv = ws.run_file(run_id, "landmarks.csv")
    with atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False)
    overlays = write_overlays(table, ws.figures_dir(run_id) / OVERLAY_DIR, f"{method} K={k}", max_overlays) if max_overlays > 0 else []
    check = None
    if flip or warp:
        check = consistency_check(run_dir, table, manifest_boxes(home, name), device=device, flip=flip, warp=warp, seed=seed)
        if len(check):
            _write_consistency_metrics(home, run_id, name, method, check)
    report = write_report(run_dir)
    return DiscoverResult(name, run_id, run_dir, store, n_train, n_test, skipped, csv, overlays, report, check, backbone)
