"""``uld discover``: landmarks for a folder (or glob) of your own images, in one command.

Chains the existing stages: the ``folder`` loader's manifests (object box = the
whole image, test = its seeded 10% hold-out) -> the backbone's features -> a
method (ZeroShot or D-ULD) -> the run's ``keypoints.parquet`` (original pixels)
plus ``landmarks.csv`` with each image's path -> overlays -> the flip check ->
``report.html``. No labels, so no NME: what is measured is what needs none
(landmark presence, cluster quality, consistency under a horizontal flip).

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
from storage.layout import Workspace, check_name

METHODS = ("zeroshot", "duld")
FLIP_STAGE_METRIC = "flip_error"


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
    flip: pd.DataFrame | None = None

    def summary(self) -> str:
        parts = [f"{self.n_train + self.n_test} images ({self.n_test} held out as test), {len(self.skipped)} skipped",
                 f"run {self.run_id}", f"landmarks: {self.landmarks_csv}"]
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


def build_folder_manifests(images: str, home: str | Path, name: str) -> tuple[int, int, pd.DataFrame]:
    """Write ``manifests/<name>/{train,test}.parquet`` for the images ``images`` names.

    Unreadable files are skipped (and listed in ``skipped.parquet``). When the
    seeded hold-out leaves a split empty (a small folder), the last image by
    path is the test split and the others train, so every stage has both splits.
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


# ------------------------------------------------------------ flip consistency
def flip_check(run_dir: Path, table: pd.DataFrame, device: str = "cpu", max_images: int = 64) -> pd.DataFrame:
    """Predict up to ``max_images`` images (test first) and their mirror images with the run's model; per landmark, the
    error between a landmark and its flip partner mapped back (% of sqrt(w*h) of the image).

    The partner of landmark k is found by Hungarian matching (a left-eye landmark should come
    back as the right-eye one); ``pipeline.evaluation.flip.flip_consistency`` does the maths.
    """
    from pipeline.datasets.images import read_image
    from pipeline.evaluation.flip import flip_consistency, same_landmark_error
    from pipeline.predictor import ImageItem, LandmarkPredictor
    from PIL import Image

    # Test images first, then training ones: the check needs no labels, so any image counts.
    ordered = pd.concat([table[table["split"] == "test"], table[table["split"] != "test"]])
    test = ordered.drop_duplicates("image_id").head(max_images)
    if test.empty:
        return pd.DataFrame()
    predictor = LandmarkPredictor.from_pretrained(run_dir, device=device)
    with tempfile.TemporaryDirectory(prefix="uld-flip-") as tmp:
        items, flipped = [], []
        for n, row in enumerate(test.itertuples(index=False)):
            path = Path(tmp) / f"{n:05d}.png"
            Image.fromarray(np.ascontiguousarray(read_image(row.path)[:, ::-1])).save(path)
            items.append(ImageItem(str(row.path), f"o{n:05d}"))
            flipped.append(ImageItem(str(path), f"f{n:05d}"))
        res = predictor.run(items + flipped, progress=False)
    frame = res.frame
    n = len(test)
    K = predictor.k

    def arrays(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        pts = np.full((n, K, 2), np.nan)
        present = np.zeros((n, K), bool)
        for r in frame[frame["image_id"].str.startswith(prefix)].itertuples(index=False):
            i = int(r.image_id[1:])
            pts[i, r.landmark_id] = (r.x, r.y)
            present[i, r.landmark_id] = bool(r.present) and not bool(r.fallback)
        return pts, present

    (orig, p_orig), (flip, p_flip) = arrays("o"), arrays("f")
    sizes = test[["width", "height"]].to_numpy(np.float64)
    result = flip_consistency(orig, p_orig, flip, p_flip, sizes)
    # The noise floor: the run's own landmarks of the same images (the feature store's noise) against
    # the predictor's (a new image's noise). A flip error near it is as good as the features allow.
    run_pts = np.full((n, K, 2), np.nan)
    run_present = np.zeros((n, K), bool)
    pos = {image_id: i for i, image_id in enumerate(test["image_id"])}
    for r in table[table["image_id"].isin(pos)].itertuples(index=False):
        run_pts[pos[r.image_id], r.landmark_id] = (r.x, r.y)
        run_present[pos[r.image_id], r.landmark_id] = bool(r.present) and not bool(r.fallback)
    renoise, _ = same_landmark_error(orig, p_orig, run_pts, run_present, sizes)
    return pd.DataFrame({"landmark_id": np.arange(K), "partner": result.partner, "flip_error": result.error,
                         "renoise_error": renoise, "n_pairs": result.n_pairs})


def _write_flip_metrics(home: Path, run_id: str, dataset: str, method: str, flip: pd.DataFrame) -> None:
    from flows.results import read_keypoints, write_metrics

    kp = read_keypoints(home, run_id)
    last = kp[kp["round"] == kp["round"].max()]
    stage, round_ = str(last["stage"].iloc[-1]), int(last["round"].iloc[-1])
    base = {"run_id": run_id, "method": method, "stage": stage, "round": round_, "dataset": dataset, "split": "all",  # test images first, then train
            "k": len(flip), "n_regressor_images": -1, "repeat": -1}
    weights = flip["n_pairs"].to_numpy(np.float64)
    errors = flip["flip_error"].to_numpy(np.float64)
    ok = np.isfinite(errors) & (weights > 0)
    rows = [{**base, "metric": FLIP_STAGE_METRIC, "value": float(np.average(errors[ok], weights=weights[ok])) if ok.any() else float("nan")}]
    floor = flip["renoise_error"].to_numpy(np.float64)
    rows.append({**base, "metric": "renoise_error", "value": float(np.nanmean(floor)) if np.isfinite(floor).any() else float("nan")})
    for r in flip.itertuples(index=False):
        rows.append({**base, "metric": f"flip_error_lm{r.landmark_id}", "value": float(r.flip_error)})
        rows.append({**base, "metric": f"flip_partner_lm{r.landmark_id}", "value": float(r.partner)})
        rows.append({**base, "metric": f"renoise_error_lm{r.landmark_id}", "value": float(r.renoise_error)})
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


def discover(
    images: str,
    *,
    method: str = "zeroshot",
    k: int = 10,
    backbone: str = "shipped",
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
    method_options: dict[str, Any] | None = None,
    force: bool = False,
) -> DiscoverResult:
    """Landmarks for the images ``images`` (folder, file or glob) with ``method``; see the module doc.

    ``force`` redoes the method run from scratch (the run folder's method outputs are
    replaced; the manifests and features are still reused): what the config-mismatch
    error of an existing ``--run-id`` suggests.
    """
    from flows.cli_options import feature_spec
    from flows.features import extract_features
    from flows.report import write_report

    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}", where="--method", fix=f"use one of {', '.join(METHODS)}")
    if k < 1:
        raise ConfigError(f"-k must be >= 1, got {k}", where="-k")
    home = Path(home)
    ws = Workspace(home)
    name = check_name("dataset", name or default_name(images))
    n_train, n_test, skipped = build_folder_manifests(images, home, name)
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
    flip_table = None
    if flip:
        flip_table = flip_check(run_dir, table, device=device)
        if len(flip_table):
            _write_flip_metrics(home, run_id, name, method, flip_table)
    report = write_report(run_dir)
    return DiscoverResult(name, run_id, run_dir, store, n_train, n_test, skipped, csv, overlays, report, flip_table)
