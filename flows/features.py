"""The features stage: cache diffusion hyperfeatures of a dataset in a sharded Zarr store.

``extract_features`` is a Prefect flow with one task per *missing* shard:

1. load the train and test manifests and concatenate them (train first): row
   ``i`` of the manifest is row ``i`` of the store;
2. compute the square crop boxes and the store's config hash (the feature
   spec + backbone identity + a fingerprint of the manifest);
3. create the store, or open the one already there and check it was written
   for exactly this configuration;
4. for each shard whose completion marker is not set: read and crop its
   images, run the backbone in batches, write the shard, set the marker.

A crash loses at most the shard being written; re-running the same command
resumes from the first unfinished shard and produces the same bytes as an
uninterrupted run because every image's noise is seeded from its row index.
Memory is bounded by one shard of features, whatever the dataset size.

No algorithms here: cropping, the backbone and the store live in
``pipeline`` and ``storage``.
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

# The plain helpers live in flows.feature_plan (no Prefect, no torch); re-exported here.
from flows.feature_plan import (  # noqa: F401
    SPLITS,
    StorePlan,
    check_manifests,
    check_same,
    check_usable,
    load_manifests,
    manifest_fingerprint,
    manifest_hint,
    plan_store,
    recorded_store_path,
    remember_backbone,
    remember_complete,
    remember_manifest,
    store_config,
)
from flows.retry import RETRIES, RETRY_DELAY_S, retry_transient
from pipeline.backbones.base import FeatureSpec
from pipeline.errors import DatasetError, StoreError
from storage.features import FeatureStore, StoreProblem, key_layer
from storage.layout import feature_store_location
from storage.locks import writer_lock

if TYPE_CHECKING:
    from pipeline.backbones.base import DiffusionBackbone
    from pipeline.datasets.base import Manifest

log = logging.getLogger(__name__)


def open_or_create_store(path: "Path | str", plan: StorePlan, manifest: "Manifest", crop_boxes: np.ndarray, spec: FeatureSpec, shard_size: int, batch_size: int) -> FeatureStore:
    """Open the store at ``path`` (checking it matches ``plan``) or create it empty."""
    ids = manifest.image_ids
    if not FeatureStore.exists(path):
        try:
            return FeatureStore.create(
                path,
                config=plan.config,
                config_hash=plan.config_hash,
                image_ids=ids,
                splits=manifest.frame["split"].to_numpy(dtype=str),
                crop_boxes=crop_boxes,
                shapes=plan.shapes,
                image_size=spec.image_size,
                shard_size=shard_size,
                projections=plan.projections,
                # How shards are computed, so a resumed run computes them the same way.
                extra_attrs={"extraction": {"batch_size": int(batch_size)}, "skipped": {}},
            )
        except StoreError:
            if not FeatureStore.exists(path):
                raise  # a real error, not a race with another process creating it
    store = FeatureStore.open(path, require_complete=False, expected_hash=plan.config_hash, writable=True)
    check_same(store, plan, ids)
    return store


def _supports_noise_seeds(backbone: "DiffusionBackbone") -> bool:
    try:
        return "noise_seeds" in inspect.signature(backbone.extract).parameters
    except (TypeError, ValueError):
        return False


def _to_model_input(crops: list[np.ndarray]) -> "Any":
    """uint8 (S, S, 3) crops -> float tensor (B, 3, S, S) in [-1, 1], as the backbone contract wants."""
    import torch

    arr = np.stack([np.asarray(c) for c in crops])
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / 127.5 - 1.0
    else:  # float crops are taken to be in [0, 1]
        x = arr.astype(np.float32) * 2.0 - 1.0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def compute_shard(
    store: FeatureStore,
    shard: int,
    backbone: "DiffusionBackbone",
    spec: FeatureSpec,
    layers: list[str],
    paths: np.ndarray,
    batch_size: int,
    skip_bad: bool,
    finish: bool = True,
) -> dict:
    """Read, crop and encode the images of one shard, then write it. Returns a summary.

    An unreadable image raises :class:`DatasetError` naming the file; with
    ``skip_bad`` its features stay zero, ``valid`` is False and the reason is
    recorded in the store's ``skipped`` attribute (nothing dropped silently).
    ``finish=False`` (a Dask worker, :mod:`flows.features_dask`) writes the data only:
    the coordinating process records the summary's ``skipped`` and sets the marker.
    """
    import torch

    from pipeline.datasets.crop import crop_image
    from pipeline.datasets.images import read_image

    start, stop = store.shard_range(shard)
    n = stop - start
    out = {k: np.zeros((n, *store.shapes[k]), np.float16) for k in store.keys}
    valid = np.ones(n, bool)
    skipped: dict[str, str] = {}
    per_image_noise = _supports_noise_seeds(backbone)
    if per_image_noise:
        from pipeline.backbones.common import noise_seed_for
    t0 = time.perf_counter()
    for b0 in range(start, stop, batch_size):
        rows = list(range(b0, min(b0 + batch_size, stop)))
        crops, ok_rows = [], []
        for r in rows:
            try:
                image = read_image(paths[r])
                crops.append(crop_image(image, store.crop_boxes[r], spec.image_size))
                ok_rows.append(r)
            except DatasetError as err:
                if not skip_bad:
                    raise
                valid[r - start] = False
                skipped[str(store.image_ids[r])] = f"{paths[r]}: {err.what}"
        if not ok_rows:
            continue
        images = _to_model_input(crops).to(backbone.device)
        with torch.no_grad():
            if per_image_noise:
                seeds = [noise_seed_for(spec.noise_seed, r) for r in ok_rows]
                feats = backbone.extract(images, list(spec.timesteps), layers, noise_seeds=seeds)
            else:
                # One generator per batch, seeded by the batch's first row: resumable as
                # long as batches are the same, which the stored batch size guarantees.
                gen = torch.Generator().manual_seed(int(spec.noise_seed) * 1_000_003 + ok_rows[0])
                feats = backbone.extract(images, list(spec.timesteps), layers, generator=gen)
        sel = np.asarray(ok_rows) - start
        for key in store.keys:
            x = feats[key].detach().float().cpu().numpy()
            proj = store.projection(key_layer(key))
            if proj is not None:
                x = np.einsum("oc,nchw->nohw", proj, x, optimize=True)
            with np.errstate(over="ignore", invalid="ignore"):  # write_shard refuses non-finite values
                out[key][sel] = x.astype(np.float16)
    store.write_shard(shard, out, valid=valid, mark_complete=False)
    summary = {"shard": shard, "images": n, "skipped": skipped, "seconds": time.perf_counter() - t0}
    if finish:
        finish_shard(store, summary)
    return summary


def finish_shard(store: FeatureStore, summary: dict) -> None:
    """Finish a shard whose data is written: record its skipped images, then set its completion marker.

    The one place that marks shards done, in process (:func:`compute_shard`) and for
    Dask workers' results (:func:`flows.features_dask.fan_out_shards`). Reasons first,
    marker last: a crash in between leaves the shard unfinished (re-extracted by the
    next run), never a "complete" shard whose skipped images lost their reasons.
    Not safe for concurrent callers (the skipped list is a read-modify-write of the
    group attrs): only the process holding the writer lock calls it, one shard at a time.
    """
    store.record_skipped(summary["skipped"])
    store.mark_complete(int(summary["shard"]))


# Prefect --------------------------------------------------------------------
# Retried on transient I/O errors only (flows.retry): a shard is written whole and its
# marker set last, and its noise is seeded per image, so a second attempt gives the same bytes.
@task(
    name="extract-shard", task_run_name="shard-{shard}", cache_policy=NO_CACHE, persist_result=False,
    retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=retry_transient,
)
def extract_shard_task(
    store: FeatureStore,
    shard: int,
    backbone: "DiffusionBackbone",
    spec: FeatureSpec,
    layers: list[str],
    paths: np.ndarray,
    batch_size: int,
    skip_bad: bool,
) -> dict:
    """One shard: images -> crops -> backbone -> store (marker set last)."""
    # Tasks run one at a time: no race on the store's attrs.
    return compute_shard(store, shard, backbone, spec, layers, paths, batch_size, skip_bad)


@flow(name="extract-features", flow_run_name="features-{dataset}", validate_parameters=False, log_prints=True)
def extract_features(
    dataset: str,
    backbone: "str | DiffusionBackbone",
    spec: FeatureSpec | None = None,
    home: str | Path = "workspace",
    device: str = "auto",
    batch_size: int = 16,
    skip_bad: bool = False,
    shard_size: int = 64,
    data_root: str | Path | None = None,
    deep_check: bool = False,
    fan_out: bool = False,
    store_url: str | None = None,
) -> "Path | str":
    """Extract (or finish extracting) the hyperfeatures of ``dataset``; returns the store path.

    ``backbone`` is a backbone spec for :func:`pipeline.backbones.loading.load_backbone`
    (``shipped``, a directory, a backbone trained in this workspace, a hub id)
    or an already built ``DiffusionBackbone``.
    A store that already exists for this configuration is resumed (missing
    shards only) with its recorded batch size; a complete one is left alone.
    Finished shards whose files are missing or damaged (:meth:`FeatureStore.verify`;
    ``deep_check`` also decodes every chunk) are re-extracted like unfinished ones.
    Holds the store's writer lock throughout (:func:`storage.locks.writer_lock`: a flock, or a lock object on an object store).
    ``fan_out`` submits the shards to the flow's task runner (a Dask one:
    :func:`flows.features_dask.extract_features_dask`) instead of running them here.
    ``store_url`` (a folder or an fsspec URL such as ``s3://bucket/prefix``) stands in for
    ``<home>/features``; the store's path is then a URL string (see :mod:`storage.locations`).
    """
    from pipeline.datasets.crop import crop_boxes
    from pipeline.settings import resolve_device

    spec = spec or FeatureSpec()
    home = Path(home)
    if batch_size < 1:
        raise StoreError(f"batch size must be >= 1, got {batch_size}", where="--batch-size", fix="use e.g. 16")
    manifest = load_manifests(home, dataset, data_root)
    if isinstance(backbone, str):
        from pipeline.backbones.loading import backbone_name, load_backbone

        name = backbone_name(backbone)
        model = load_backbone(backbone, resolve_device(device), home=home)
    else:
        model, name = backbone, backbone.name
    plan = plan_store(dataset, model, name, spec, manifest)
    if isinstance(backbone, str):  # the next no-op run finds the store without loading the model
        remember_backbone(home, backbone, plan.config["backbone"], model.default_layers())
    path = feature_store_location(home, dataset, name, plan.config_hash, store_url)
    boxes = np.asarray(crop_boxes(manifest.boxes(), spec.crop_margin), dtype=np.float32)
    # One writer per store: a second `uld features` on the same configuration would
    # otherwise rewrite the same shards and race on the skipped-images attrs.
    with writer_lock(path, "feature store"):
        store = open_or_create_store(path, plan, manifest, boxes, spec, shard_size, batch_size)
        fatal = [p for p in store.verify(deep=deep_check) if not p.repairable]
        if fatal:
            raise StoreError(
                f"feature store is damaged beyond re-extraction: {'; '.join(str(p) for p in fatal[:3])}",
                where=str(path),
                fix="delete the folder and re-run `uld features` to rebuild it",
            )
        todo = store.missing_shards()  # unfinished, plus finished shards whose files are missing or damaged
        if not todo:
            print(f"features already complete: {path}")
            check_usable(store)
            _remember(home, dataset, manifest, store)
            return path
        recorded = int(store.attrs.get("extraction", {}).get("batch_size", batch_size))
        if recorded != batch_size:
            print(f"resuming with the store's batch size {recorded} (asked {batch_size}) so finished and new shards match")
        damaged = store.damaged_shards()
        if damaged:
            print(f"repairing {len(damaged)} finished shard(s) whose files are missing or damaged: {damaged[:10]}")
        paths = manifest.frame["path"].to_numpy(dtype=str)
        print(f"extracting {len(todo)} of {store.n_shards()} shards ({len(store)} images) into {path}")
        if fan_out:
            from flows.features_dask import BackboneRef, fan_out_shards

            # A spec travels as a reference (each worker loads the model once); an object is pickled.
            ref = BackboneRef(backbone, device, str(home)) if isinstance(backbone, str) else model
            fan_out_shards(store, todo, ref, spec, plan.layers, paths, recorded, skip_bad)
        else:
            for shard in tqdm(todo, desc=f"features {dataset}", unit="shard"):
                extract_shard_task(store, shard, model, spec, plan.layers, paths, recorded, skip_bad)
        store.refresh()
        if not store.is_complete():  # only if a file vanished again meanwhile
            raise StoreError("feature store is still incomplete after extraction", where=str(path), fix="re-run the same `uld features` command")
        check_usable(store)
        _remember(home, dataset, manifest, store)
    return path


def _remember(home: Path, dataset: str, manifest: "Manifest", store: FeatureStore) -> None:
    """Record the manifests and the finished store so the next no-op `uld features` needs neither pandas nor Zarr."""
    remember_manifest(home, dataset, manifest)
    remember_complete(home, store)


def complete_store_path(
    dataset: str,
    backbone: "str | DiffusionBackbone",
    spec: FeatureSpec | None = None,
    home: str | Path = "workspace",
    device: str = "cpu",
    data_root: str | Path | None = None,
    deep: bool = False,
    store_url: str | None = None,
) -> "Path | str | None":
    """The path of the finished store for this configuration, or None if there is work left.

    Plain function (no Prefect): the CLI calls it first so a no-op re-run costs
    loading manifests and opening the store, not starting a Prefect server; when
    the backbone's identity is recorded for its unchanged files
    (:func:`flows.feature_plan.recorded_store_path`) the model is not even built.
    "Finished" includes every shard file being present (and, with ``deep``,
    every chunk decoding): a store with missing files needs a repair run.
    Raises like :func:`extract_features` when an existing store does not match.
    """
    spec = spec or FeatureSpec()
    if isinstance(backbone, str):
        # A recorded identity (unchanged backbone files) finds a finished store without the model.
        found = recorded_store_path(dataset, backbone, spec, home=home, data_root=data_root, deep=deep, store_url=store_url)
        if found is not None:
            return found
    manifest = load_manifests(home, dataset, data_root)
    if isinstance(backbone, str):
        from pipeline.backbones.loading import backbone_name, load_backbone

        name, model = backbone_name(backbone), load_backbone(backbone, device, home=home)
    else:
        name, model = backbone.name, backbone
    plan = plan_store(dataset, model, name, spec, manifest)
    if isinstance(backbone, str):
        remember_backbone(home, backbone, plan.config["backbone"], model.default_layers())
    path = feature_store_location(home, dataset, name, plan.config_hash, store_url)
    if not FeatureStore.exists(path):
        return None
    store = FeatureStore.open(path, require_complete=False, expected_hash=plan.config_hash)
    check_same(store, plan, manifest.image_ids)
    if deep and store.verify(deep=True):
        return None
    if not store.is_complete():
        return None
    _remember(Path(home), dataset, manifest, store)
    return path


def open_features(
    home: str | Path,
    dataset: str,
    backbone: "str | DiffusionBackbone",
    spec: FeatureSpec | None = None,
    device: str = "cpu",
    store_url: str | None = None,
) -> FeatureStore:
    """The complete feature store of (dataset, backbone, spec), read-only.

    Raises :class:`StoreError` telling the user to run ``uld features`` when it
    does not exist or is unfinished.
    """
    spec = spec or FeatureSpec()
    manifest = load_manifests(home, dataset)
    if isinstance(backbone, str):
        from pipeline.backbones.loading import backbone_name, load_backbone

        name, model = backbone_name(backbone), load_backbone(backbone, device, home=home)
    else:
        name, model = backbone.name, backbone
    plan = plan_store(dataset, model, name, spec, manifest)
    path = feature_store_location(home, dataset, name, plan.config_hash, store_url)
    cmd = f"uld --home {home} features --dataset {dataset} --backbone {name}" + (f" --store-url {store_url}" if store_url else "")
    if not FeatureStore.exists(path):
        raise StoreError(
            f"no features cached for dataset {dataset!r} with backbone {name!r} and this feature configuration",
            where=str(path),
            fix=f"run `{cmd}` (with the same --timesteps/--layers/--size options) first",
        )
    store = FeatureStore.open(path, require_complete=False, expected_hash=plan.config_hash)
    check_same(store, plan, manifest.image_ids)
    unfinished = store.unfinished_shards()
    if unfinished:
        raise StoreError(
            f"feature store is unfinished ({len(unfinished)} of {store.n_shards()} shards missing)",
            where=str(path),
            fix=f"resume it with `{cmd}` (same options)",
        )
    # Finished but with files gone or damaged: name them; the same command repairs them.
    store.require_complete(fix=f"re-run `{cmd}` (same options): it re-extracts the damaged shards; add --verify to list them")
    return store


def verify_features(
    dataset: str,
    backbone: "str | DiffusionBackbone",
    spec: FeatureSpec | None = None,
    home: str | Path = "workspace",
    device: str = "cpu",
    data_root: str | Path | None = None,
    deep: bool = False,
    store_url: str | None = None,
) -> "tuple[Path | str, list[StoreProblem]]":
    """The store of this configuration and its problems (:meth:`FeatureStore.verify`); writes nothing.

    Raises :class:`StoreError` when no store exists for the configuration.
    """
    spec = spec or FeatureSpec()
    manifest = load_manifests(home, dataset, data_root)
    if isinstance(backbone, str):
        from pipeline.backbones.loading import backbone_name, load_backbone

        name, model = backbone_name(backbone), load_backbone(backbone, device, home=home)
    else:
        name, model = backbone.name, backbone
    plan = plan_store(dataset, model, name, spec, manifest)
    path = feature_store_location(home, dataset, name, plan.config_hash, store_url)
    if not FeatureStore.exists(path):
        raise StoreError(
            f"no features cached for dataset {dataset!r} with backbone {name!r} and this feature configuration",
            where=str(path),
            fix=f"run `uld --home {home} features --dataset {dataset} --backbone {name}{f' --store-url {store_url}' if store_url else ''}` (same options) first",
        )
    store = FeatureStore.open(path, require_complete=False, expected_hash=plan.config_hash)
    check_same(store, plan, manifest.image_ids)
    return path, store.verify(deep=deep)
