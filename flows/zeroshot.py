"""The ZeroShot stage and the reference baselines, as Prefect flows.

``zeroshot`` runs discrete tasks whose inputs and outputs are files in the
run folder, so any step can be inspected or re-run on its own::

    runs/<run>/config.json                       the run's configuration
    runs/<run>/zeroshot/train_descriptors.npy    (M, D) float32 descriptors of random RoI pixels
    runs/<run>/zeroshot/train_samples.npz        image row and crop (x, y) of every sampled pixel
    runs/<run>/zeroshot/model/                   centroids (.npy) + config (ZeroShot.save_pretrained)
    runs/<run>/zeroshot/train_labels.npy         cluster of every sampled descriptor
    runs/<run>/keypoints.parquet                 landmarks of train and test images (original px)
    runs/<run>/metrics.parquet                   cluster quality + NME metrics
    runs/<run>/errors.parquet, figures/          per-image errors, CED plot

A task whose output file exists is skipped (resume); ``force=True`` redoes all.
Algorithms live in ``pipeline.methods.zeroshot``; this module only wires files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.results import evaluate_keypoints, new_run_id, read_run_config, write_keypoints, write_metrics, write_run_config
from pipeline.backbones.base import FeatureSpec
from pipeline.errors import ConfigError, DatasetError, StoreError
from storage.atomic import atomic_path
from storage.features import FeatureStore
from storage.layout import Workspace
from storage.locks import claim, releases_claims

METHOD = "zeroshot"
STAGE = "zeroshot"
#: Default candidate clusters per landmark (M = 4 K): measured on the synthetic heads'
#: validation split, bench/results/zeroshot_selection.md.
CANDIDATES_PER_LANDMARK = 4
#: Default motion-coherence floor of the cluster choice (0 = spread and presence only); chosen on
#: the validation parts of the synthetic and MTFL train splits, bench/results/zeroshot_selection.md.
MIN_COHERENCE = 0.0


# ------------------------------------------------------------ helpers (no Prefect)
def resolve_store(
    home: str | Path, dataset: str, backbone: str, spec: FeatureSpec | None, store_path: str | Path | None = None, device: str = "cpu"
) -> FeatureStore:
    """The feature store to read: ``store_path`` when given, else the one ``uld features`` made for (dataset, backbone, spec)."""
    if store_path is not None:
        return FeatureStore.open(store_path)  # a folder or an fsspec URL (FeatureStore.open tells them apart)
    from flows.features import open_features

    return open_features(home, dataset, backbone, spec, device=device)


def store_rois(home: str | Path, dataset: str, store: FeatureStore, indices: np.ndarray) -> np.ndarray:
    """RoI boxes (n, 4) in crop pixels: each image's manifest object box mapped into its crop
    and intersected with the part of the crop that shows the image (never the padding).

    The one place RoIs are built: ZeroShot, D-ULD and the reference baselines all use it.
    """
    import pandas as pd

    from flows.datasets import load_manifest
    from pipeline.datasets.crop import clip_rois_to_image, to_crop

    idx = np.asarray(indices, dtype=np.int64)
    frames = []
    for split in sorted(set(store.splits[idx].tolist())):
        frames.append(load_manifest(home, dataset, split).frame)
    frame = pd.concat(frames, ignore_index=True).drop_duplicates("image_id").set_index("image_id")
    ids = store.image_ids[idx]
    missing = [i for i in ids if i not in frame.index]
    if missing:
        raise StoreError(
            f"{len(missing)} store images are not in the manifests of {dataset!r} (e.g. {missing[:3]})",
            where=str(store.path),
            fix="the store was built from other manifests: re-run `uld features` for this dataset",
        )
    rows = frame.loc[ids]
    b = rows[["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]].to_numpy(np.float64).reshape(-1, 2, 2)
    boxes = store.crop_boxes[idx]
    rois = to_crop(b, boxes, store.image_size).reshape(-1, 4)
    return clip_rois_to_image(rois, rows[["width", "height"]].to_numpy(np.float64), boxes, store.image_size)


def object_masks(store: FeatureStore, indices: np.ndarray, roi: str, batch_size: int = 32) -> np.ndarray | None:
    """Per-image foreground masks (n, r, r) when ``roi`` is ``"foreground"`` (else None: the box alone).

    See :mod:`pipeline.methods.foreground`; computed from the store's own
    features, so train and test images get the same rule.
    """
    if roi == "box":
        return None
    if roi != "foreground":
        raise ConfigError(f"unknown RoI rule {roi!r}", where="--roi", fix="use 'box' or 'foreground'")
    from pipeline.methods.foreground import foreground_masks

    return foreground_masks(iter_batches(store, indices, batch_size))


def iter_batches(store: FeatureStore, indices: np.ndarray, batch_size: int, keys: list[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Feature dicts of consecutive groups of ``indices``: memory is one batch."""
    for s in range(0, len(indices), batch_size):
        yield store.read_indices(indices[s : s + batch_size], keys)


def split_indices(store: FeatureStore, split: str, limit: int | None, seed: int) -> np.ndarray:
    """Valid rows of ``split``; a seeded subset of ``limit`` rows when asked (kept in store order)."""
    idx = store.indices(split)
    if limit is not None and 0 < limit < len(idx):
        idx = np.sort(np.random.default_rng([seed, 17]).choice(idx, size=limit, replace=False))
    return idx


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)


def _check_run_config(home: Path, run_id: str, config: dict, force: bool) -> None:
    path = Workspace(home).run_file(run_id, "config.json")
    if path.is_file() and not force:
        old = read_run_config(home, run_id)
        old.pop("run_id", None)
        if isinstance(old.get("model"), dict):  # runs made before the coherence rule used none
            old["model"].setdefault("min_coherence", 0.0)
        # Compare as stored: JSON turns tuples (e.g. FeatureSpec.timesteps) into lists.
        new = json.loads(json.dumps(config, default=str))
        # Evaluation settings (protocol, box, regressor sizes) do not change the method's
        # outputs: a re-run under another protocol adds its metric rows to the same run.
        changed = sorted(k for k in set(old) | set(new) if k != "evaluation" and old.get(k) != new.get(k))
        if changed:
            raise ConfigError(
                f"run {run_id!r} exists with a different configuration (differs in {changed})",
                where=str(path),
                fix="use a new --run-id (or none, for a fresh one), or pass --force to redo the run",
            )
    write_run_config(home, run_id, config)


# ------------------------------------------------------------ tasks
@task(name="zeroshot-sample", cache_policy=NO_CACHE, persist_result=False)
def sample_task(home: Path, run_id: str, dataset: str, store_path: Path, cfg: dict, force: bool, progress: bool = True) -> Path:
    """Descriptors of random RoI pixels of the training images -> train_descriptors.npy."""
    from pipeline.methods.zeroshot import ZeroShot

    out = Workspace(home).run_file(run_id, "zeroshot/train_descriptors.npy")
    if out.is_file() and not force:
        return out
    store = FeatureStore.open(store_path)
    idx = split_indices(store, "train", cfg["max_train_images"], cfg["seed"])
    model = ZeroShot(**cfg["model"])
    masks = object_masks(store, idx, cfg["roi"], cfg["batch_size"])
    desc, owner, xy = model.sample_descriptors(iter_batches(store, idx, cfg["batch_size"]), store_rois(home, dataset, store, idx), progress, masks=masks)
    samples = Workspace(home).run_file(run_id, "zeroshot/train_samples.npz")
    with atomic_path(samples) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, store_row=idx[owner], xy=xy)
    _save_npy(out, desc)
    return out


@task(name="zeroshot-kmeans", cache_policy=NO_CACHE, persist_result=False)
def kmeans_task(home: Path, run_id: str, desc_path: Path, cfg: dict, force: bool) -> Path:
    """k-means of the sampled descriptors -> model/ (centroids + config) and train_labels.npy."""
    from pipeline.methods.zeroshot import ZeroShot

    model_dir = Workspace(home).run_file(run_id, "zeroshot/model")
    if (model_dir / ZeroShot.weights_name).is_file() and not force:
        return model_dir
    desc = np.load(desc_path)
    samples = np.load(Workspace(home).run_file(run_id, "zeroshot/train_samples.npz"))
    # sample -> training image (0..n-1) and its crop position: the cluster choice of `n_candidates` needs them
    owner = np.unique(samples["store_row"], return_inverse=True)[1]
    model = ZeroShot(**cfg["model"]).fit_descriptors(desc, owner, samples["xy"])
    _save_npy(Workspace(home).run_file(run_id, "zeroshot/train_labels.npy"), model.train_labels_.astype(np.int32))
    model.save_pretrained(model_dir)
    return model_dir


@task(name="zeroshot-quality", cache_policy=NO_CACHE, persist_result=False)
def quality_task(home: Path, run_id: str, dataset: str, desc_path: Path, model_dir: Path, cfg: dict, force: bool) -> dict[str, float]:
    """Silhouette (seeded sample) and Calinski-Harabasz of the training clusters -> metrics.parquet
    (and zeroshot/quality.json, written last, so a resumed run skips this step)."""
    import json

    from pipeline.clustering import cluster_quality
    from storage.atomic import write_json

    done = Workspace(home).run_file(run_id, "zeroshot/quality.json")
    if done.is_file() and not force:
        return json.loads(done.read_text())
    desc = np.load(desc_path)
    labels = np.load(Workspace(home).run_file(run_id, "zeroshot/train_labels.npy"))
    q = cluster_quality(desc, labels, sample_size=cfg["silhouette_sample"], seed=cfg["seed"])
    from pipeline.methods.zeroshot import ZeroShot

    inertia = ZeroShot.from_pretrained(model_dir).inertia_
    base = {"run_id": run_id, "method": METHOD, "stage": STAGE, "round": 0, "dataset": dataset, "split": "train",
            "k": cfg["model"]["n_clusters"], "n_regressor_images": -1, "repeat": -1}
    rows = [{**base, "metric": m, "value": float(v)} for m, v in {**q, "kmeans_inertia": inertia}.items()]
    write_metrics(home, run_id, rows)
    write_json(done, q)
    return q


@task(name="zeroshot-predict", task_run_name="predict-{split}", cache_policy=NO_CACHE, persist_result=False)
def predict_task(home: Path, run_id: str, dataset: str, store_path: Path, model_dir: Path, split: str, cfg: dict, force: bool,
                 progress: bool = True) -> Path:
    """Landmarks of one split's images -> keypoints.parquet (original pixels)."""
    from flows.results import read_keypoints
    from pipeline.methods.zeroshot import ZeroShot

    kp_path = Workspace(home).run_file(run_id, "keypoints.parquet")
    if kp_path.is_file() and not force:
        kp = read_keypoints(home, run_id)
        if ((kp["split"] == split) & (kp["stage"] == STAGE)).any():
            return kp_path
    store = FeatureStore.open(store_path)
    limit = cfg["max_train_images"] if split == "train" else None
    idx = split_indices(store, split, limit, cfg["seed"])
    model = ZeroShot.from_pretrained(model_dir)
    masks = object_masks(store, idx, cfg["roi"], cfg["batch_size"])
    lms = model.predict(iter_batches(store, idx, cfg["batch_size"]), store_rois(home, dataset, store, idx), progress, masks=masks)
    return write_keypoints(home, run_id, METHOD, STAGE, 0, store, idx, lms)


@task(name="evaluate-keypoints", cache_policy=NO_CACHE, persist_result=False)
def evaluate_task(home: Path, run_id: str, dataset: str, method: str, stage: str, round_: int, eval_cfg: dict) -> Path:
    evaluate_keypoints(home, run_id, dataset, method, stage, round_, **eval_cfg)
    return Workspace(home).run_file(run_id, "metrics.parquet")


# ------------------------------------------------------------ flows
@flow(name="zeroshot", flow_run_name="zeroshot-{dataset}-k{k}", validate_parameters=False, log_prints=True)
@releases_claims
def zeroshot(
    dataset: str,
    backbone: str = "shipped",
    spec: FeatureSpec | None = None,
    k: int = 10,
    n_samples_per_image: int = 200,
    home: str | Path = "workspace",
    seed: int = 0,
    run_id: str | None = None,
    *,
    store_path: str | Path | None = None,
    n_test_samples: int | None = None,
    proj_dim: int | None = None,
    max_train_images: int | None = None,
    batch_size: int = 16,
    n_init: int = 3,
    max_iter: int = 50,
    silhouette_sample: int = 10_000,
    evaluate: bool = True,
    eval_cfg: dict[str, Any] | None = None,
    device: str = "cpu",
    force: bool = False,
    roi: str = "box",
    n_candidates: int | None = None,
    min_presence: float = 0.8,
    min_coherence: float | None = None,
    progress: bool = True,
) -> str:
    """ZeroShot (001, Sec 3.1) on a cached feature store; returns the run id.

    ``n_candidates``: k-means clusters M from which the K most compact ones that are
    present in at least ``min_presence`` of the training images are kept
    (:mod:`pipeline.clustering.selection`); ``None`` = ``CANDIDATES_PER_LANDMARK`` x k,
    ``k`` = the paper's plain K-means. ``min_coherence``: prefer clusters whose position
    follows the other clusters' shared motion at least this much
    (:func:`pipeline.clustering.selection.motion_coherence`); ``None`` = ``MIN_COHERENCE``.

    ``roi``: ``"box"`` samples pixels inside the object box (the paper's RoI);
    ``"foreground"`` also drops the pixels an unsupervised foreground split of
    the features calls background (:mod:`pipeline.methods.foreground`).

    Steps (tasks): sample RoI descriptors of the training images -> k-means ->
    cluster quality -> landmarks of train and test images -> NME evaluation.
    """
    home = Path(home)
    store = resolve_store(home, dataset, backbone, spec, store_path, device)
    run_id = run_id or new_run_id(METHOD)
    claim(Workspace(home).run_dir(run_id), "run")  # one writer per run folder, until this flow returns
    cfg = {
        "method": METHOD,
        "dataset": dataset,
        "backbone": backbone,
        "spec": (spec or FeatureSpec()).to_json() if store_path is None else None,
        "store_path": str(store.path),
        "store_config_hash": store.config_hash,
        "seed": int(seed),
        "max_train_images": max_train_images,
        "batch_size": int(batch_size),
        "silhouette_sample": int(silhouette_sample),
        "roi": str(roi),
        "model": {
            "n_clusters": int(k),
            "crop_size": int(store.image_size),
            "n_samples_per_image": int(n_samples_per_image),
            "n_test_samples": n_test_samples,
            "proj_dim": proj_dim,
            "seed": int(seed),
            "n_init": int(n_init),
            "max_iter": int(max_iter),
            "n_candidates": int(n_candidates if n_candidates is not None else CANDIDATES_PER_LANDMARK * k),
            "min_presence": float(min_presence),
            "min_coherence": float(MIN_COHERENCE if min_coherence is None else min_coherence),
        },
        "evaluation": dict(eval_cfg or {}),
    }
    _check_run_config(home, run_id, cfg, force)
    # progress only shows bars: it is not part of the run's configuration (nor of its resume check)
    desc_path = sample_task(home, run_id, dataset, store.path, cfg, force, progress)
    model_dir = kmeans_task(home, run_id, desc_path, cfg, force)
    quality_task(home, run_id, dataset, desc_path, model_dir, cfg, force)
    for split in ("train", "test"):
        predict_task(home, run_id, dataset, store.path, model_dir, split, cfg, force, progress)
    if evaluate:
        evaluate_task(home, run_id, dataset, METHOD, STAGE, 0, {"seed": int(seed), **(eval_cfg or {})})
    write_sheet(home, run_id, dataset, store, METHOD, STAGE, "ZeroShot")
    return run_id


def write_sheet(home: Path, run_id: str, dataset: str, store: FeatureStore, method: str, stage: str, label: str) -> Path | None:
    """The run's landmark contact sheet of test crops, ``figures/<method>-test-landmarks.png`` (every method run writes one).

    None (with a printed reason) for a store that records no crop margin (hand-made test
    stores) or when the images moved since the features were cached: the results stand
    without the figure.
    """
    if "spec" not in store.config:
        return None
    from flows.figures import landmark_sheet

    try:
        path = landmark_sheet(home, run_id, dataset, store.image_size, float(store.config["spec"]["crop_margin"]),
                              Workspace(home).figures_dir(run_id) / f"{method}-test-landmarks.png",
                              title=f"{label}: landmarks on test crops", stage=stage, round_=0)
    except DatasetError as err:
        print(f"no landmark sheet: {err.what} ({err.where})")
        return None
    print(f"landmarks on test crops: {path}")
    return path


@flow(name="reference-baseline", flow_run_name="baseline-{name}-{dataset}", validate_parameters=False, log_prints=True)
@releases_claims
def reference_baseline(
    dataset: str,
    name: str,
    backbone: str = "shipped",
    spec: FeatureSpec | None = None,
    k: int = 10,
    home: str | Path = "workspace",
    seed: int = 0,
    run_id: str | None = None,
    *,
    store_path: str | Path | None = None,
    eval_cfg: dict[str, Any] | None = None,
    device: str = "cpu",
) -> str:
    """Box-only reference landmarks (``random`` | ``mean-shape``) on the same crops as the methods, evaluated."""
    from pipeline.methods.baselines import baseline_landmarks

    home = Path(home)
    store = resolve_store(home, dataset, backbone, spec, store_path, device)
    method = f"baseline-{name}"
    run_id = run_id or new_run_id(method)
    claim(Workspace(home).run_dir(run_id), "run")
    cfg = {"method": method, "dataset": dataset, "backbone": backbone, "store_path": str(store.path),
           "store_config_hash": store.config_hash, "k": int(k), "seed": int(seed), "evaluation": dict(eval_cfg or {})}
    _check_run_config(home, run_id, cfg, force=False)
    for split in ("train", "test"):
        idx = store.indices(split)
        rois = store_rois(home, dataset, store, idx)
        # A different seed stream per split so train and test boxes do not share draws.
        lms = baseline_landmarks(name, rois, k, seed=int(seed) * 2 + (split == "test"))
        write_keypoints(home, run_id, method, "baseline", 0, store, idx, lms)
    evaluate_task(home, run_id, dataset, method, "baseline", 0, {"seed": int(seed), **(eval_cfg or {})})
    write_sheet(home, run_id, dataset, store, method, "baseline", f"baseline {name}")
    return run_id
