"""The features stage's plain planning helpers: manifests, store configuration, identity, checks.

No Prefect and no torch here: ``uld features`` on a finished store (the no-op)
and every reader of a store use these without paying for either. The Prefect
flow that extracts features is :mod:`flows.features`, which re-exports these.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.backbones.base import FeatureSpec, feature_key
from pipeline.errors import DatasetError, StoreError
from storage.layout import Workspace, feature_store_location
from storage.store_format import FORMAT_VERSION

if TYPE_CHECKING:
    # numpy and the store (hence Zarr) are imported on use: the recorded no-op needs neither.
    import numpy as np

    from pipeline.backbones.base import DiffusionBackbone
    from pipeline.datasets.base import Manifest
    from storage.features import FeatureStore

SPLITS = ("train", "test")
# Manifest columns that decide what goes into the store (paths and boxes decide the crops).
_FINGERPRINT_COLUMNS = ("image_id", "split", "path", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")


# helpers (plain functions: usable and testable without Prefect) -------------
def manifest_hint(dataset: str, home: str | Path, data_root: str | Path | None = None) -> str:
    """The exact command that builds a missing manifest (and, for LS3D, where its data was looked for)."""
    if dataset == "synthetic":
        return f"build it first: `uld --home {home} datasets generate synthetic` (or run `uld demo`)"
    root = Path(data_root) / dataset if data_root is not None else None
    cmd = f"uld --home {home} datasets manifest {dataset} --root {root if root is not None else 'PATH'}"
    hint = f"build it first: `{cmd}`"
    if dataset == "ls3d":
        where = f"under {root}" if root is not None else "nowhere yet (no --data-root / $ULD_DATA given)"
        hint += f"; the LS3D-W test images and 300W-LP training files were looked for {where}"
    return hint


def check_manifests(home: str | Path, dataset: str, data_root: str | Path | None = None) -> None:
    """Raise :class:`DatasetError` with the command to run if a manifest of ``dataset`` is missing.

    Cheap (file existence only): the CLI calls it before starting a flow run so
    a missing manifest is one clear line, not a failed Prefect run.
    """
    ws = Workspace(Path(home))
    for split in SPLITS:
        path = ws.manifest(dataset, split)
        if not path.is_file():
            raise DatasetError(f"no {split} manifest for dataset {dataset!r}", where=str(path), fix=manifest_hint(dataset, home, data_root))


def load_manifests(home: str | Path, dataset: str, data_root: str | Path | None = None) -> "Manifest":
    """Train then test manifest of ``dataset``, concatenated (the store's row order)."""
    from pipeline.datasets.base import Manifest

    # Checked here to name the data folder that was used (and the command that builds it).
    check_manifests(home, dataset, data_root)
    ws = Workspace(Path(home))
    return Manifest.concat([Manifest.load(ws.manifest(dataset, split)) for split in SPLITS])


def manifest_fingerprint(manifest: "Manifest") -> str:
    """A hash of what decides the crops: ids, splits, paths and boxes, in order."""
    import numpy as np

    h = hashlib.sha256()
    frame = manifest.frame
    for col in _FINGERPRINT_COLUMNS:
        values = frame[col].to_numpy()
        if col.startswith("bbox"):
            h.update(np.ascontiguousarray(values, dtype=np.float32).tobytes())
        else:
            h.update("\x1f".join(str(v) for v in values).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class StorePlan:
    """Everything that defines one store, computed before touching the disk."""

    config: dict
    config_hash: str
    layers: list[str]
    keys: list[str]
    shapes: dict[str, tuple[int, int, int]]
    projections: dict[str, np.ndarray]


def plan_store(dataset: str, backbone: "DiffusionBackbone", backbone_name: str, spec: FeatureSpec, manifest: "Manifest") -> StorePlan:
    """Resolve layers, keys, stored shapes, projections, the full config and its hash."""
    from storage.features import random_projection

    spec = backbone.canonical_spec(spec)  # e.g. `pixels` ignores timesteps: one store whatever --timesteps says
    identity = backbone.identity()
    layers = list(spec.layers) or list(backbone.default_layers())
    layer_shapes = backbone.feature_shapes(spec.image_size, layers)
    projections: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, int, int]] = {}
    keys: list[str] = []
    for layer in layers:
        c, h, w = (int(x) for x in layer_shapes[layer])
        if spec.reduce_channels is not None and spec.reduce_channels < c:
            projections[layer] = random_projection(c, int(spec.reduce_channels), spec.noise_seed, layer)
            c = int(spec.reduce_channels)
        for t in spec.timesteps:
            key = feature_key(layer, t)
            keys.append(key)
            shapes[key] = (c, h, w)
    config, config_hash = store_config(dataset, backbone_name, identity, layers, spec, manifest)
    return StorePlan(config, config_hash, layers, keys, shapes, projections)


def store_config(dataset: str, backbone_name: str, identity: dict, layers: list[str], spec: FeatureSpec, manifest: "Manifest") -> tuple[dict, str]:
    """The store's recorded config and its hash (the store's folder name) from the backbone's identity.

    ``spec`` is the backbone's canonical spec and ``layers`` the resolved ones;
    no model is needed, so a recorded identity names the store as well as a loaded model.
    """
    return config_from_facts(dataset, backbone_name, identity, layers, spec, manifest_fingerprint(manifest), len(manifest))


def config_from_facts(dataset: str, backbone_name: str, identity: dict, layers: list[str], spec: FeatureSpec, fingerprint: str, n_images: int) -> tuple[dict, str]:
    """:func:`store_config` from the two facts of the manifest it uses (its fingerprint and length)."""
    spec_hash = spec.config_hash(identity)
    config = {
        "dataset": dataset,
        "backbone_name": backbone_name,
        "backbone": identity,
        "spec": spec.to_json(),
        "spec_hash": spec_hash,
        "manifest_fingerprint": fingerprint,
        "layers": list(layers),
        "timesteps": [int(t) for t in spec.timesteps],
        "n_images": int(n_images),
    }
    payload = json.dumps({"spec_hash": spec_hash, "manifest": fingerprint, "format": FORMAT_VERSION}, sort_keys=True)
    config_hash = hashlib.sha256(payload.encode()).hexdigest()[:12]
    # JSON round trip so the comparison with a reopened store's attrs is like for like.
    return json.loads(json.dumps(config, default=str)), config_hash


def check_same(store: FeatureStore, plan: StorePlan, ids: np.ndarray) -> None:
    """Raise :class:`StoreError` unless ``store`` was written for exactly ``plan`` and these image ids."""
    import numpy as np

    diffs = sorted(k for k in set(plan.config) | set(store.config) if plan.config.get(k) != store.config.get(k))
    if store.keys != sorted(plan.keys):
        diffs.append("keys")
    if len(store) != len(ids) or not np.array_equal(store.image_ids, ids):
        diffs.append("image_ids")
    if diffs:
        raise StoreError(
            f"the feature store on disk was written for a different configuration (differs in: {', '.join(diffs)})",
            where=str(store.path),
            fix="delete that folder and re-run `uld features` to rebuild it",
        )


def check_usable(store: FeatureStore) -> None:
    """Refuse a store in which a split has no readable image (every one skipped with --skip-bad).

    Such a store is complete but useless: every later stage would fail on an
    empty split, far from the cause. Said here, with the reasons recorded.
    """
    valid = store.valid
    for split in SPLITS:
        rows = store.splits == split
        if rows.any() and not valid[rows].any():
            reasons = [f"{k}: {v}" for k, v in list(store.skipped.items())[:3]]
            raise DatasetError(
                f"none of the {int(rows.sum())} {split} images could be read (all skipped with --skip-bad)"
                + (f"; e.g. {'; '.join(reasons)}" if reasons else ""),
                where=str(store.path),
                fix="repair the image files (or the manifest's paths), delete the store folder, and re-run `uld features`",
            )


# stores named from a recorded identity (no model) ------------------------------
# Kinds whose stores are named by spec as given (their canonical_spec is the identity;
# `pixels` has no weights to load and takes the ordinary path).
_RECORDED_KINDS = ("ddpm", "stable-diffusion")


def local_backbone(backbone: str, home: str | Path | None) -> tuple[str, Path] | None:
    """``(kind, folder)`` when ``backbone`` names a local DDPM / Stable Diffusion folder, else None."""
    from pipeline.backbones.loading import resolve_spec
    from pipeline.errors import BackboneError

    try:
        kind, source = resolve_spec(backbone, home)
    except BackboneError:
        return None
    if kind not in _RECORDED_KINDS or not Path(source).is_dir():
        return None  # pixels, or a hub id: nothing local to fingerprint
    return kind, Path(source)


def remember_backbone(home: str | Path, backbone: str, identity: dict, default_layers: list[str]) -> None:
    """After a real load of ``backbone``: record its identity by file content (best effort)."""
    from storage.backbone_identities import identity_cache

    local = local_backbone(backbone, home)
    if local is not None:
        identity_cache(home).record(local[1], local[0], identity, default_layers)


def manifest_paths(home: str | Path, dataset: str) -> list[Path]:
    """The manifest files of ``dataset`` (train, then test: the store's row order)."""
    ws = Workspace(Path(home))
    return [ws.manifest(dataset, split) for split in SPLITS]


def remember_manifest(home: str | Path, dataset: str, manifest: "Manifest") -> None:
    """Record the manifests' fingerprint for the next no-op (best effort, :mod:`storage.completion_cache`)."""
    from storage.completion_cache import record_manifest

    record_manifest(home, dataset, manifest_paths(home, dataset), manifest_fingerprint(manifest), len(manifest))


def remember_complete(home: str | Path, store: FeatureStore) -> None:
    """Record a store just found complete, if it is also usable, for the next no-op (best effort)."""
    from storage.completion_cache import record_complete

    try:
        check_usable(store)
    except DatasetError:
        return  # the ordinary path must keep saying why it is unusable
    record_complete(home, store)


def recorded_store_path(
    dataset: str,
    backbone: str,
    spec: FeatureSpec | None = None,
    home: str | Path = "workspace",
    data_root: str | Path | None = None,
    deep: bool = False,
    store_url: str | None = None,
) -> "Path | str | None":
    """The finished store of this configuration found *without building the backbone*, or None.

    The backbone's identity comes from the workspace's record
    (:mod:`storage.backbone_identities`), valid only while the files the loader
    reads are unchanged; the store must then exist, match the configuration
    exactly and be complete (markers and shard files; ``deep``: every chunk
    decodes). None means "not known to be finished": the caller takes the
    ordinary path, which loads the model and decides.
    """
    found = recorded_no_op(dataset, backbone, spec, home=home, data_root=data_root, deep=deep, store_url=store_url)
    return found[0] if found is not None else None


def recorded_no_op(
    dataset: str,
    backbone: str,
    spec: FeatureSpec | None = None,
    home: str | Path = "workspace",
    data_root: str | Path | None = None,
    deep: bool = False,
    store_url: str | None = None,
) -> "tuple[Path | str, dict | None] | None":
    """:func:`recorded_store_path` and, when the store's completion record answered, its summary.

    Cheapest first (:mod:`storage.completion_cache`): manifests known by their
    files' stat, the store known complete by its files' stat and index CRCs:
    then neither pandas nor Zarr is imported and the summary (what the CLI
    prints) comes from the record. Otherwise the store is opened and checked
    (summary None) and, when complete, recorded for next time.
    """
    from pipeline.backbones.loading import backbone_name
    from storage.backbone_identities import identity_cache
    from storage.completion_cache import recorded_complete, recorded_manifest

    local = local_backbone(backbone, home)
    if local is None:
        return None
    recorded = identity_cache(home).lookup(local[1])
    if recorded is None or recorded.kind != local[0]:
        return None
    spec = spec or FeatureSpec()
    check_manifests(home, dataset, data_root)
    manifest = None
    facts = recorded_manifest(home, dataset, manifest_paths(home, dataset))
    if facts is None:
        manifest = load_manifests(home, dataset, data_root)
        remember_manifest(home, dataset, manifest)
        facts = {"fingerprint": manifest_fingerprint(manifest), "n_images": len(manifest)}
    name = backbone_name(backbone)
    layers = list(spec.layers) or list(recorded.default_layers)
    config, config_hash = config_from_facts(dataset, name, recorded.identity, layers, spec, facts["fingerprint"], facts["n_images"])
    path = feature_store_location(home, dataset, name, config_hash, store_url)
    if not deep and isinstance(path, Path):
        summary = recorded_complete(home, path, config_hash, config)
        if summary is not None:
            return path, summary
    import numpy as np

    from storage.features import FeatureStore

    if not FeatureStore.exists(path):
        return None
    store = FeatureStore.open(path, require_complete=False, expected_hash=config_hash)
    keys = sorted(feature_key(layer, t) for layer in layers for t in spec.timesteps)
    manifest = manifest if manifest is not None else load_manifests(home, dataset, data_root)
    if store.config != config or store.keys != keys or not np.array_equal(store.image_ids, manifest.image_ids):
        return None  # the ordinary path names the difference
    if deep and store.verify(deep=True):
        return None
    if not store.is_complete():
        return None
    remember_complete(home, store)
    return path, None
