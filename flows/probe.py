"""The feature probe as a Prefect flow: transfer PCK of every feature key of a store.

``probe`` wires files and calls; the algorithm is :mod:`pipeline.evaluation.probe`.

1. find the feature store of (dataset, backbone, spec) -- or extract it with the
   features flow (a re-run finds it complete and goes on at once);
2. draw the validation subset from the *train* split
   (:func:`pipeline.evaluation.probe.validation_subset`: BLAKE2b of the image id
   and the seed), read its features and ground truth (crop pixels);
3. sweep: transfer PCK of every single key and the standard combinations;
4. optionally, ZeroShot restricted to the best few combinations (and the
   backbone's default spec): centroids and regressors fitted on the remaining
   train images, landmarks scored on the validation subset with the NME
   evaluator -- the test split is never read;
5. write ``probes/<dataset>/<backbone>/<store_hash>/probe.parquet`` (kind ``probe``)
   and ``probe.png`` (layers x timesteps heatmap); optionally store the best
   spec as the backbone's default (``uld_backbone.json``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline.backbones.base import FeatureSpec, feature_key, parse_feature_key
from pipeline.errors import ConfigError, StoreError
from pipeline.evaluation.probe import ProbeResult, TransferProbe, grid_of, pck_grid, top_combinations, validation_subset
from storage.features import FeatureStore
from storage.layout import Workspace
from storage.tables import write_table

if TYPE_CHECKING:
    from pipeline.backbones.base import DiffusionBackbone

PROBE_TIMESTEPS: tuple[int, ...] = (25, 50, 100, 150, 250, 400, 600)
_ZS_COLUMNS = ("nme_forward", "nme_backward", "hungarian_acc")


# ------------------------------------------------------------ helpers (no Prefect)
def validation_rows(store: FeatureStore, n_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(validation rows, remaining train rows)`` of the store, both ascending; only valid train rows."""
    train = store.indices("train")
    pick = validation_subset(store.image_ids[train], store.splits[train], n_images, seed)
    val = train[pick]
    return val, np.setdiff1d(train, val)


def ground_truth(home: str | Path, dataset: str, store: FeatureStore, rows: np.ndarray) -> dict[str, Any]:
    """Train-manifest ground truth of store ``rows``: original-pixel and crop-pixel landmarks, visibility,
    normalisers (original px and crop px), yaw, landmark names and crop boxes."""
    from flows.datasets import load_manifest
    from pipeline.datasets.crop import to_crop
    from pipeline.evaluation.nme import normaliser_to_unit

    manifest = load_manifest(home, dataset, "train")
    pos = pd.Series(np.arange(len(manifest)), index=manifest.image_ids)
    ids = store.image_ids[rows]
    missing = [i for i in ids if i not in pos.index]
    if missing or (store.splits[rows] != "train").any():
        raise StoreError(
            f"{len(missing)} store rows are not images of the train manifest of {dataset!r} (e.g. {missing[:3]})",
            where=str(store.path), fix="the store was built from other manifests: re-run `uld features` for this dataset",
        )
    m = pos.loc[ids].to_numpy()
    boxes = store.crop_boxes[rows].astype(np.float64)
    lm = manifest.landmarks()[m].astype(np.float64)
    norm = manifest.normalisers()[m]
    S = store.image_size
    return {
        "ids": ids,
        "landmarks": lm,
        "landmarks_crop": to_crop(lm, boxes, S).astype(np.float64),
        "visible": manifest.visible()[m] & np.isfinite(lm).all(-1),
        "norm": norm,
        "norm_crop": normaliser_to_unit(norm, boxes) * S,
        "yaw": manifest.frame["yaw"].to_numpy(np.float64)[m],
        "names": list(manifest.meta.landmark_names),
        "normalisation": manifest.meta.normalisation,
        "boxes": boxes,
    }


def default_keys(model: "DiffusionBackbone | None", backbone: str, home: str | Path, keys: list[str]) -> tuple[str, ...] | None:
    """The keys of the backbone's default spec (default layers x default timesteps), if the store has them all."""
    if model is None:
        return None
    from pipeline.backbones.defaults import default_timesteps

    want = tuple(sorted(feature_key(l, t) for l in model.default_layers() for t in default_timesteps(backbone, home)))
    return want if set(want) <= set(keys) else None


def probe_frame(results: list[ProbeResult], backbone: str, dataset: str, names: list[str], object_size: str) -> pd.DataFrame:
    """Rows of the ``probe`` table: per result the overall row (landmark -1) and one per landmark."""
    rows = []
    for r in results:
        layer, t = parse_feature_key(r.keys[0]) if r.n_keys == 1 else ("", -1)
        if r.n_keys > 1:  # per-layer / per-timestep combinations still name their layer or timestep
            ls, ts = grid_of(r.keys)
            layer = ls[0] if len(ls) == 1 else ""
            t = ts[0] if len(ts) == 1 else -1
        base = {"backbone": backbone, "dataset": dataset, "features": r.name, "kind": r.kind, "n_keys": r.n_keys,
                "layer": layer, "timestep": int(t), "alpha": r.alpha, "object_size": object_size,
                "pck_chance": r.chance, "n_pairs": r.n_pairs, **{c: np.nan for c in _ZS_COLUMNS}}
        rows.append({**base, "landmark": -1, "landmark_name": "all", "pck": r.pck, "pck_norm": r.pck_norm, "n_points": r.n_points})
        for l in range(len(r.per_landmark)):
            rows.append({**base, "landmark": l, "landmark_name": names[l] if l < len(names) else str(l),
                         "pck": r.per_landmark[l], "pck_norm": r.per_landmark_norm[l], "n_points": int(r.n_points_per_landmark[l])})
    return pd.DataFrame(rows)


def zeroshot_on_validation(
    home: str | Path, dataset: str, store: FeatureStore, keys: tuple[str, ...], fit_rows: np.ndarray, val_rows: np.ndarray, cfg: dict[str, Any]
) -> dict[str, float]:
    """ZeroShot restricted to ``keys``: centroids and NME regressors from ``fit_rows`` (train images
    outside the validation subset), landmarks scored on ``val_rows`` (the validation subset)."""
    from flows.zeroshot import iter_batches, store_rois
    from pipeline.datasets.crop import to_original
    from pipeline.evaluation import EvalData, evaluate_nme, hungarian_accuracy
    from pipeline.methods.zeroshot import ZeroShot

    model = ZeroShot(n_clusters=cfg["k"], crop_size=store.image_size, n_samples_per_image=cfg["n_samples_per_image"],
                     seed=cfg["seed"], n_init=cfg["n_init"], max_iter=cfg["max_iter"])
    bs = cfg["batch_size"]
    model.fit(iter_batches(store, fit_rows, bs, list(keys)), store_rois(home, dataset, store, fit_rows))
    data = []
    for rows in (fit_rows, val_rows):
        lms = model.predict(iter_batches(store, rows, bs, list(keys)), store_rois(home, dataset, store, rows))
        gt = ground_truth(home, dataset, store, rows)
        coords = to_original(lms.coords, gt["boxes"], store.image_size)
        data.append(EvalData.from_pixels(coords, lms.present, gt["landmarks"], gt["norm"], gt["boxes"], yaw=gt["yaw"], image_ids=gt["ids"]))
    rep = evaluate_nme(data[0], data[1], n_regressor_images=cfg["n_regressor_images"], repeats=cfg["repeats"], seed=cfg["seed"])
    hung = hungarian_accuracy(data[0], data[1], cfg["hungarian_threshold"])
    return {"nme_forward": rep.forward.mean, "nme_backward": rep.backward.mean, "hungarian_acc": hung.mean}


def write_default_spec(
    backbone: str, home: str | Path, store: FeatureStore, best: ProbeResult, provenance: dict[str, Any], default_dir: str | Path | None = None
) -> Path:
    """Store ``best``'s layers and timesteps as the backbone's defaults (see pipeline.backbones.defaults).

    Without ``default_dir`` the backbone's own folder is used (the shipped
    assets are refused); with it, that folder, after checking it holds the very
    weights the store was extracted with.
    """
    from pipeline.backbones.defaults import local_backbone_dir, write_backbone_defaults

    layers, timesteps = grid_of(best.keys)
    if default_dir is None:
        folder = local_backbone_dir(backbone, home)
        if folder is None:
            raise ConfigError(f"backbone {backbone!r} has no local folder to store defaults in", where="--write-default",
                              fix="pass the backbone's folder with --default-dir, or probe a backbone trained in the workspace")
        return write_backbone_defaults(folder, layers, timesteps, provenance)
    from pipeline.backbones.loading import load_backbone

    folder = Path(default_dir).expanduser()
    theirs = load_backbone(str(folder), "cpu").identity()
    if store.backbone is not None and theirs.get("weights") != store.backbone.get("weights"):
        raise ConfigError(f"{folder} holds other weights ({theirs.get('weights')}) than the probed store ({store.backbone.get('weights')})",
                          where="--default-dir", fix="pass the folder of the backbone you probed")
    return write_backbone_defaults(folder, layers, timesteps, provenance, allow_shipped=True)


# ------------------------------------------------------------ tasks
@task(name="probe-sweep", cache_policy=NO_CACHE, persist_result=False)
def sweep_task(home: Path, dataset: str, store_path: Path, val_rows: np.ndarray, cfg: dict[str, Any], extra: tuple[str, ...] | None) -> tuple[list[ProbeResult], dict[str, Any]]:
    """Transfer PCK of every key and the standard combinations on the validation subset (+ the default spec)."""
    store = FeatureStore.open(store_path)
    gt = ground_truth(home, dataset, store, val_rows)
    probe = TransferProbe(alpha=cfg["alpha"], object_size=cfg["object_size"], stride=cfg["stride"], n_pairs=cfg["n_pairs"], seed=cfg["seed"])
    probe.fit(gt["landmarks_crop"], gt["visible"], store.image_size, normalisers=gt["norm_crop"])
    # The probe images' features, all keys: (n_images x bytes/image), e.g. 100 x 2.9 MB for 8 layers x 7 timesteps.
    feats = store.read_indices(val_rows)
    results = probe.sweep(feats)
    if extra is not None:
        hit = next((r for r in results if r.keys == extra), None)
        results.append(dataclasses.replace(hit if hit is not None else probe.score(feats, extra), kind="default"))
    return results, gt


@task(name="probe-zeroshot", task_run_name="zeroshot-{label}", cache_policy=NO_CACHE, persist_result=False)
def zeroshot_task(home: Path, dataset: str, store_path: Path, keys: tuple[str, ...], fit_rows: np.ndarray, val_rows: np.ndarray, cfg: dict[str, Any], label: str) -> dict[str, float]:
    return zeroshot_on_validation(home, dataset, FeatureStore.open(store_path), keys, fit_rows, val_rows, cfg)


# ------------------------------------------------------------ the flow
@flow(name="feature-probe", flow_run_name="probe-{dataset}", validate_parameters=False, log_prints=True)
def probe(
    dataset: str,
    backbone: str = "shipped",
    spec: FeatureSpec | None = None,
    home: str | Path = "workspace",
    device: str = "cpu",
    *,
    all_layers: bool = False,
    store_path: str | Path | None = None,
    n_images: int = 100,
    n_pairs: int = 200,
    alpha: float = 0.1,
    object_size: str = "max_side",
    stride: int = 1,
    seed: int = 0,
    zeroshot: bool = True,
    zeroshot_top: int = 3,
    k: int = 10,
    n_samples_per_image: int = 200,
    zeroshot_train_images: int | None = None,
    n_regressor_images: int | None = 300,
    repeats: int = 5,
    n_init: int = 3,
    max_iter: int = 50,
    batch_size: int = 16,
    write_default: bool = False,
    default_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Transfer-PCK probe of a backbone's hyperfeatures on a train-split validation subset.

    ``spec`` names the features (default: PROBE_TIMESTEPS, the backbone's default
    layers; ``all_layers=True`` probes every layer). Returns a summary: the
    table and figure paths, the store, the best combinations and, with
    ``write_default``, the backbone metadata file written.
    """
    home = Path(home)
    model = None
    if store_path is not None:
        store = FeatureStore.open(store_path)
        name = str(store.config.get("backbone_name", backbone))
    else:
        from flows.features import complete_store_path, extract_features
        from pipeline.backbones.loading import load_backbone

        model = load_backbone(backbone, device, home=home)
        name = model.name
        spec = spec or FeatureSpec(timesteps=PROBE_TIMESTEPS)
        if all_layers:
            spec = dataclasses.replace(spec, layers=tuple(model.layer_names()))
        path = complete_store_path(dataset, model, spec, home=home, device=device)
        if path is None:
            path = extract_features(dataset, model, spec, home=home, device=device, batch_size=batch_size)
        store = FeatureStore.open(path)
    val_rows, fit_rows = validation_rows(store, n_images, seed)
    if len(val_rows) < 2:
        raise ConfigError(f"only {len(val_rows)} training image(s) for the validation subset", where="--n-images", fix="use a dataset with more training images")
    cfg = {"alpha": float(alpha), "object_size": object_size, "stride": int(stride), "n_pairs": int(n_pairs), "seed": int(seed)}
    dkeys = default_keys(model, backbone, home, store.keys)
    results, gt = sweep_task(home, dataset, store.path, val_rows, cfg, dkeys)
    frame = probe_frame(results, name, dataset, gt["names"], object_size)

    zs: dict[tuple[str, ...], dict[str, float]] = {}
    if zeroshot:
        if len(fit_rows) < 2:
            raise ConfigError(f"only {len(fit_rows)} training images remain outside the validation subset for ZeroShot",
                              where="--n-images", fix="use a smaller --n-images, or --no-zeroshot")
        pool = fit_rows
        if zeroshot_train_images is not None and 0 < zeroshot_train_images < len(pool):
            pool = np.sort(np.random.default_rng([int(seed), 23]).choice(pool, size=int(zeroshot_train_images), replace=False))
        zcfg = {"k": int(k), "n_samples_per_image": int(n_samples_per_image), "seed": int(seed), "n_init": int(n_init),
                "max_iter": int(max_iter), "batch_size": int(batch_size), "n_regressor_images": n_regressor_images,
                "repeats": int(repeats), "hungarian_threshold": 0.2}
        chosen = [r.keys for r in top_combinations(results, zeroshot_top)]
        if dkeys is not None and dkeys not in chosen:
            chosen.append(dkeys)
        for i, keys in enumerate(chosen):
            zs[keys] = zeroshot_task(home, dataset, store.path, keys, pool, val_rows, zcfg, label=f"{i}")
            print(f"zeroshot {'+'.join(keys)[:80]}: " + ", ".join(f"{c}={v:.4g}" for c, v in zs[keys].items()))
        overall = frame["landmark"] == -1
        for keys, metrics in zs.items():
            m = overall & (frame["features"] == "+".join(keys))
            for c, v in metrics.items():
                frame.loc[m, c] = v

    pdir = Workspace(home).probe_dir(dataset, name, store.config_hash)
    meta = {"store": str(store.path), "store_config_hash": store.config_hash, "n_images": int(len(val_rows)),
            "validation_ids": [str(i) for i in gt["ids"]], "probe": cfg, "normalisation": gt["normalisation"],
            "zeroshot_train_images": int(len(fit_rows)) if zeroshot else 0, "default_keys": list(dkeys or [])}
    table = write_table(frame, pdir / "probe.parquet", "probe", metadata=meta)
    figure = _plot(results, pdir / "probe.png", f"{name} on {dataset}: transfer PCK@{alpha:g} ({object_size}), {len(val_rows)} train images, {results[0].n_pairs} pairs")
    summary: dict[str, Any] = {"table": table, "figure": figure, "store": store.path, "n_images": int(len(val_rows)),
                               "frame": frame, "default_keys": dkeys, "written": None}
    if write_default or default_dir is not None:
        best = top_combinations(results, 1, grid_only=True)[0]
        prov = {"tool": "uld backbone probe", "dataset": dataset, "store_config_hash": store.config_hash, "table": str(table),
                "pck": best.pck, "alpha": float(alpha), "object_size": object_size, "n_images": int(len(val_rows)),
                "n_pairs": best.n_pairs, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")}
        summary["written"] = write_default_spec(backbone, home, store, best, prov, default_dir)
        summary["written_keys"] = best.keys
    return summary


def _plot(results: list[ProbeResult], path: Path, title: str) -> Path:
    from pipeline.evaluation.plots import plot_probe_heatmap

    grid, layers, ts = pck_grid(results)
    by = {(r.kind, r.keys): r.pck for r in results}
    per_layer = {grid_of(keys)[0][0]: v for (kind, keys), v in by.items() if kind == "layer"}
    per_t = {grid_of(keys)[1][0]: v for (kind, keys), v in by.items() if kind == "timestep"}
    every = next((v for (kind, _), v in by.items() if kind == "all"), None)
    rows = np.array([per_layer.get(l, np.nan) for l in layers]) if per_layer else None
    cols = np.array([per_t.get(t, np.nan) for t in ts]) if per_t else None
    return plot_probe_heatmap(grid, layers, ts, path, layer_rows=rows, timestep_cols=cols, all_keys=every,
                              chance=results[0].chance, title=title)


def summary_table(summary: dict[str, Any], top: int = 10) -> str:
    """The best combinations (overall rows, one per key set) and the default spec, as printable text."""
    f = summary["frame"]
    f = f[f["landmark"] == -1].drop_duplicates("features")
    shown = f.sort_values(["pck", "n_keys", "features"], ascending=[False, True, True]).head(int(top))
    dkeys = summary.get("default_keys")
    if dkeys is not None:
        shown = pd.concat([shown, f[f["features"] == "+".join(dkeys)]]).drop_duplicates("features")
    cols = ["kind", "n_keys", "pck", "pck_norm"] + [c for c in ("nme_forward", "hungarian_acc") if f[c].notna().any()]
    table = shown.set_index("features")[cols]
    table.index = [n if len(n) <= 60 else n[:57] + "..." for n in table.index]
    lines = [table.to_string(float_format=lambda v: f"{v:.4g}"), "",
             f"chance PCK {f['pck_chance'].iloc[0]:.4f}; {summary['n_images']} train images, {int(f['n_pairs'].iloc[0])} pairs with a common visible landmark"]
    if dkeys is not None:
        lines.append(f"default spec: {'+'.join(dkeys)}")
    return "\n".join(lines)
