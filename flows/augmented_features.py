"""Hyperfeatures of augmented training views (D-ULD bootstrapping), as a Prefect flow.

``extract_view_features`` fills a view store (``storage.augmented_features``)
next to a finished main feature store: for every training image, ``n_views``
views are drawn (``pipeline.datasets.augment_views``), rendered from the
original image and passed through the same backbone with the same feature
spec. One task per missing shard, completion markers last: a crash loses at
most one shard and a re-run resumes (a complete store is left alone).

Why a second store rather than warping cached maps: see
``pipeline.datasets.augment_views``. Cost: M extra UNet passes (per timestep)
per training image, once; every later D-ULD run with the same augmentation
config reuses the store.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline.datasets.augment_views import ViewAugmentConfig, view_transforms
from pipeline.errors import StoreError
from storage.augmented_features import ViewStore
from storage.features import FeatureStore, key_layer
from storage.layout import Workspace

if TYPE_CHECKING:
    from pipeline.backbones.base import DiffusionBackbone

FORMAT = 1  # bump when the way views are rendered changes (it is in the view store's hash)


def views_config(main: FeatureStore, views: ViewAugmentConfig) -> tuple[dict, str]:
    """The view store's config and its hash: the main store's hash + the augmentation config."""
    config = {"main_config_hash": main.config_hash, "views": views.to_json(), "format": FORMAT, "backbone": main.backbone}
    payload = json.dumps({"main": main.config_hash, "views": views.to_json(), "format": FORMAT}, sort_keys=True)
    return json.loads(json.dumps(config, default=str)), hashlib.sha256(payload.encode()).hexdigest()[:10]


def _model_input(views: list[np.ndarray]) -> "Any":
    """uint8 (S, S, 3) views -> float (B, 3, S, S) in [-1, 1] (the backbone contract)."""
    import torch

    x = np.stack(views).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def compute_view_shard(
    vs: ViewStore, shard: int, backbone: "DiffusionBackbone", timesteps: list[int], noise_seed: int, layers: list[str], paths: np.ndarray, batch_size: int
) -> dict:
    """Render and encode the views of one shard (``paths``: image files by main-store row), then write it (marker last)."""
    import torch

    from pipeline.backbones.common import noise_seed_for
    from pipeline.datasets.augment_views import render_view
    from pipeline.datasets.images import read_image

    store = vs.store
    start, stop = store.shard_range(shard)
    n = stop - start
    out = {k: np.zeros((n, *store.shapes[k]), np.float16) for k in store.keys}
    per_image_noise = "noise_seeds" in inspect.signature(backbone.extract).parameters
    n_main = int(store.attrs.get("main_n_images", 0))
    t0 = time.perf_counter()
    cache: dict[int, np.ndarray] = {}
    for b0 in range(start, stop, batch_size):
        rows = list(range(b0, min(b0 + batch_size, stop)))
        views = []
        for r in rows:
            src = int(vs.source_rows[r])
            if src not in cache:  # the M views of one image are neighbours: decode it once
                cache = {src: read_image(paths[src])}
            views.append(render_view(cache[src], store.crop_boxes[r], store.image_size, vs.affine[r], vs.jitter[r]))
        images = _model_input(views).to(backbone.device)
        with torch.no_grad():
            if per_image_noise:
                # Noise of its own per view (rows after the main store's), seeded by the row: resumable.
                seeds = [noise_seed_for(noise_seed, n_main + r) for r in rows]
                feats = backbone.extract(images, list(timesteps), layers, noise_seeds=seeds)
            else:
                gen = torch.Generator().manual_seed(int(noise_seed) * 1_000_003 + n_main + rows[0])
                feats = backbone.extract(images, list(timesteps), layers, generator=gen)
        for key in store.keys:
            x = feats[key].detach().float().cpu().numpy()
            proj = store.projection(key_layer(key))
            if proj is not None:
                x = np.einsum("oc,nchw->nohw", proj, x, optimize=True)
            with np.errstate(over="ignore", invalid="ignore"):  # write_shard refuses non-finite values
                out[key][np.asarray(rows) - start] = x.astype(np.float16)
    store.write_shard(shard, out)
    return {"shard": shard, "views": n, "seconds": time.perf_counter() - t0}


@task(name="extract-view-shard", task_run_name="views-{shard}", cache_policy=NO_CACHE, persist_result=False)
def view_shard_task(
    vs: ViewStore, shard: int, backbone: "DiffusionBackbone", timesteps: list[int], noise_seed: int, layers: list[str], paths: np.ndarray, batch_size: int
) -> dict:
    return compute_view_shard(vs, shard, backbone, timesteps, noise_seed, layers, paths, batch_size)


def view_store_path(home: str | Path, dataset: str, main: FeatureStore, views: ViewAugmentConfig) -> Path:
    """Where the view store of (main store, augmentation config) lives."""
    _, vhash = views_config(main, views)
    name = str(main.config.get("backbone_name") or PurePosixPath(str(main.path)).parent.name.removesuffix(".zarr"))  # a folder or a URL
    return Workspace(Path(home)).view_store(dataset, name, main.config_hash, vhash)


def open_view_store(home: str | Path, dataset: str, main: FeatureStore, views: ViewAugmentConfig) -> ViewStore | None:
    """The complete view store for (main, views), or None when it still has to be extracted."""
    path = view_store_path(home, dataset, main, views)
    if not (path / "zarr.json").is_file():
        return None
    _, vhash = views_config(main, views)
    vs = ViewStore.open(path, require_complete=False, expected_hash=vhash)
    return vs if vs.store.is_complete() else None


@flow(name="extract-view-features", flow_run_name="views-{dataset}", validate_parameters=False, log_prints=True)
def extract_view_features(
    dataset: str,
    backbone: "str | DiffusionBackbone",
    main_store: str | Path,
    views: ViewAugmentConfig,
    home: str | Path = "workspace",
    device: str = "auto",
    batch_size: int = 16,
    shard_size: int = 64,
) -> Path:
    """Extract (or finish) the view store of ``main_store``'s training images; returns its path.

    ``backbone`` must be the one the main store was made with (its identity is
    checked). Views are drawn with :func:`pipeline.datasets.augment_views.view_transform`,
    seeded by ``views.seed`` and the image's row.
    """
    from flows.features import load_manifests
    from pipeline.settings import resolve_device

    home = Path(home)
    main = FeatureStore.open(main_store)
    path = view_store_path(home, dataset, main, views)
    config, vhash = views_config(main, views)
    vs = None
    if (path / "zarr.json").is_file():
        vs = ViewStore.open(path, require_complete=False, expected_hash=vhash, writable=True)
        if vs.store.is_complete():
            return path
    if isinstance(backbone, str):
        from pipeline.backbones.loading import load_backbone

        model = load_backbone(backbone, resolve_device(device), home=home)
    else:
        model = backbone
    if json.loads(json.dumps(model.identity(), default=str)) != main.backbone:
        raise StoreError(
            "the backbone differs from the one the main feature store was made with",
            where=str(main.path),
            fix="pass the same --backbone as to `uld features`",
        )
    manifest = load_manifests(home, dataset)
    if not np.array_equal(manifest.image_ids, main.image_ids):
        raise StoreError("the manifests changed since the feature store was made", where=str(main.path), fix="re-run `uld features` for this dataset")
    train = main.indices("train")
    if vs is None:
        tr = view_transforms(views, main.image_size, train)
        vs = ViewStore.create(
            path, main=main, source_rows=train, n_views=views.n_views, affine=tr.affine, flip=tr.flip, jitter=tr.jitter,
            config=config, config_hash=vhash, shard_size=shard_size,
            extra_attrs={"main_n_images": len(main), "extraction": {"batch_size": int(batch_size)}},
        )
    # The main store's own record of what it extracted (its canonical spec), not a rebuilt FeatureSpec.
    timesteps = [int(t) for t in main.config["timesteps"]]
    layers = [str(layer) for layer in main.config["layers"]]
    noise_seed = int(main.config["spec"]["noise_seed"])
    batch = int(vs.store.attrs.get("extraction", {}).get("batch_size", batch_size))
    paths = manifest.frame["path"].to_numpy(dtype=str)
    todo = vs.store.missing_shards()
    print(f"extracting {len(todo)} of {vs.store.n_shards()} shards of augmented views ({len(vs.store)} views of {len(train)} images) into {path}")
    for shard in todo:
        view_shard_task(vs, shard, model, timesteps, noise_seed, layers, paths, batch)
    vs.store.refresh()
    if not vs.store.is_complete():
        raise StoreError("view store is still incomplete after extraction", where=str(path), fix="re-run the same command")
    return path
