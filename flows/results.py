"""Result writers shared by every method: run ids and configs, keypoints, metrics, errors, CED plots.

Plain functions (no Prefect): the flows of every method call them, and so can
notebooks and tests.

``keypoints.parquet`` rows hold landmarks in *original* image pixels (the
schema's x, y), a ``fallback`` flag (present but filled in by the method, not
detected; see :class:`pipeline.methods.landmarks.LandmarkSet`) plus four extra
columns ``crop_x0, crop_y0, crop_x1, crop_y1``: the square crop box the method saw. The evaluator needs that box to bring
predictions and ground truth into the same unit crop frame (see
``pipeline.evaluation.nme``); storing it with the keypoints keeps a run's
evaluation independent of which feature store it came from.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError, StoreError
from pipeline.evaluation import EvalData, evaluate_nme, hungarian_accuracy, nme_by_yaw
from pipeline.evaluation.nme import MissingRule, ced_curve
from pipeline.methods.landmarks import LandmarkSet
from storage.atomic import write_json
from storage.layout import Workspace, check_name
from storage.tables import append_table, read_table

CROP_COLUMNS = ("crop_x0", "crop_y0", "crop_x1", "crop_y1")
CED_MAX_ERROR = 10.0  # % of the normaliser: the usual CED x-range for faces
_RUN_KEYS = ["run_id", "method", "stage", "round"]
# protocol / box are keys: one run can hold its scores under several protocols side by side.
METRIC_KEYS = _RUN_KEYS + ["dataset", "split", "metric", "repeat", "n_regressor_images", "protocol", "box"]
ERROR_KEYS = _RUN_KEYS + ["dataset", "split", "direction", "protocol", "box"]


# ------------------------------------------------------------ runs
def new_run_id(method: str) -> str:
    """``<method>-YYYYmmdd-HHMMSS-<6 hex>``: sortable by time, unique across processes."""
    check_name("method", method)
    now = _dt.datetime.now(_dt.timezone.utc)
    salt = f"{method}{now.isoformat()}{os.getpid()}{uuid.uuid4().hex}"
    return f"{method}-{now:%Y%m%d-%H%M%S}-{hashlib.sha256(salt.encode()).hexdigest()[:6]}"


def write_run_config(home: str | Path, run_id: str, config: dict[str, Any]) -> Path:
    """Write the run's full configuration to ``runs/<run_id>/config.json`` (atomically)."""
    path = Workspace(Path(home)).run_file(run_id, "config.json")
    write_json(path, {"run_id": run_id, **config})
    return path


def read_run_config(home: str | Path, run_id: str) -> dict[str, Any]:
    import json

    path = Workspace(Path(home)).run_file(run_id, "config.json")
    if not path.is_file():
        raise StoreError(f"run {run_id!r} has no config.json", where=str(path), fix="check the run id (`ls <home>/runs`) or re-run the method")
    return json.loads(path.read_text())


# ------------------------------------------------------------ keypoints
def keypoints_frame(
    run_id: str, method: str, stage: str, round_: int, image_ids: np.ndarray, splits: np.ndarray,
    crop_boxes: np.ndarray, image_size: int, landmarks: LandmarkSet,
) -> pd.DataFrame:
    """One row per (image, landmark) with original-pixel x, y (NaN where absent) and the crop box."""
    from pipeline.datasets.crop import to_original

    n, K = landmarks.n_images, landmarks.k
    if not (len(image_ids) == len(splits) == len(crop_boxes) == n):
        raise StoreError(f"{n} landmark rows but {len(image_ids)} ids / {len(crop_boxes)} crop boxes", where="write_keypoints")
    boxes = np.asarray(crop_boxes, dtype=np.float32).reshape(n, 4)
    xy = to_original(landmarks.coords, boxes, int(image_size)) if n else np.zeros((0, K, 2), np.float32)
    return pd.DataFrame(
        {
            "run_id": run_id,
            "method": method,
            "stage": stage,
            "round": int(round_),
            "split": np.repeat(np.asarray(splits).astype(str), K),
            "image_id": np.repeat(np.asarray(image_ids).astype(str), K),
            "landmark_id": np.tile(np.arange(K, dtype=np.int32), n),
            "x": xy[..., 0].reshape(-1),
            "y": xy[..., 1].reshape(-1),
            "score": landmarks.scores.reshape(-1),
            "present": landmarks.present.reshape(-1),
            "fallback": landmarks.fallback.reshape(-1),
            **{c: np.repeat(boxes[:, j], K) for j, c in enumerate(CROP_COLUMNS)},
        }
    )


def write_keypoints(
    home: str | Path, run_id: str, method: str, stage: str, round_: int, store: Any, indices: np.ndarray, landmark_set: LandmarkSet
) -> Path:
    """Append the landmarks of store rows ``indices`` to ``runs/<run_id>/keypoints.parquet``.

    ``landmark_set`` is in crop pixels of ``store``'s crops; rows already there
    for the same (run, method, stage, round, image) are replaced, so a re-run
    does not duplicate. Call it once per split (it rewrites the file).
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    df = keypoints_frame(run_id, method, stage, round_, store.image_ids[idx], store.splits[idx], store.crop_boxes[idx], store.image_size, landmark_set)
    path = Workspace(Path(home)).run_file(run_id, "keypoints.parquet")
    return append_table(df, path, "keypoints", replace_on=_RUN_KEYS + ["image_id"])


def read_keypoints(home: str | Path, run_id: str) -> pd.DataFrame:
    return read_table(Workspace(Path(home)).run_file(run_id, "keypoints.parquet"), "keypoints")


def keypoint_arrays(kp: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(image_ids (N,), coords (N,K,2) original px, present (N,K), crop boxes (N,4))`` from keypoint rows."""
    missing = [c for c in CROP_COLUMNS if c not in kp.columns]
    if missing:
        raise StoreError(
            f"keypoints table lacks the crop box columns {missing}",
            fix="write keypoints with flows.results.write_keypoints (it records the crop boxes the evaluator needs)",
        )
    K = int(kp["landmark_id"].max()) + 1
    ids, inv = np.unique(kp["image_id"].to_numpy(dtype=str), return_inverse=True)
    lm = kp["landmark_id"].to_numpy(np.int64)
    coords = np.full((len(ids), K, 2), np.nan, np.float64)
    present = np.zeros((len(ids), K), bool)
    boxes = np.zeros((len(ids), 4), np.float64)
    coords[inv, lm, 0] = kp["x"].to_numpy(np.float64)
    coords[inv, lm, 1] = kp["y"].to_numpy(np.float64)
    present[inv, lm] = kp["present"].to_numpy(bool)
    boxes[inv] = kp[list(CROP_COLUMNS)].to_numpy(np.float64)
    return ids, coords, present, boxes


def keypoint_fallback(kp: pd.DataFrame) -> np.ndarray:
    """(N, K) bool fallback flags of keypoint rows, images in the order of :func:`keypoint_arrays`."""
    K = int(kp["landmark_id"].max()) + 1
    ids, inv = np.unique(kp["image_id"].to_numpy(dtype=str), return_inverse=True)
    out = np.zeros((len(ids), K), bool)
    flags = kp["fallback"].to_numpy(bool) if "fallback" in kp.columns else np.zeros(len(kp), bool)
    out[inv, kp["landmark_id"].to_numpy(np.int64)] = flags
    return out


def write_metrics(home: str | Path, run_id: str, rows: list[dict[str, Any]]) -> Path:
    """Append long-format metric rows (replacing rows with the same key)."""
    from storage.tables import ADDED_COLUMNS

    df = pd.DataFrame(rows)
    # Rows that do not depend on the evaluation protocol (cluster quality, fallback shares)
    # carry the default protocol / box, which are part of the row key.
    df = df.assign(**{c: v for c, v in ADDED_COLUMNS["metrics"].items() if c not in df.columns})
    path = Workspace(Path(home)).run_file(run_id, "metrics.parquet")
    return append_table(df, path, "metrics", replace_on=METRIC_KEYS)


# ------------------------------------------------------------ evaluation
def box_source_label(sources: np.ndarray) -> str:
    """One label for how the object boxes of evaluated images were made: the manifests'
    ``box_source`` when all agree, else the sorted distinct values joined by ``+``."""
    values = sorted({str(v) for v in np.asarray(sources, dtype=object).reshape(-1)})
    return "+".join(values) if values else "none"


def _eval_split(home: Path, dataset: str, split: str, kp: pd.DataFrame, box: str = "landmarks") -> tuple[EvalData, np.ndarray, list[str], int, str]:
    from flows.datasets import load_manifest

    manifest = load_manifest(home, dataset, split)
    ids, coords, present, boxes = keypoint_arrays(kp)
    pos = pd.Series(np.arange(len(manifest)), index=manifest.image_ids)
    unknown = [i for i in ids if i not in pos.index]
    if unknown:
        raise StoreError(
            f"{len(unknown)} keypoint images are not in the {split} manifest of {dataset!r} (e.g. {unknown[:3]})",
            fix="evaluate against the dataset the run was made on (see the run's config.json)",
        )
    rows = pos.loc[ids].to_numpy()
    data = EvalData.from_pixels(
        coords, present, manifest.landmarks()[rows], manifest.normalisers(box)[rows], boxes,
        yaw=manifest.frame["yaw"].to_numpy(np.float64)[rows], image_ids=ids,
    )
    return data, keypoint_fallback(kp), list(manifest.meta.landmark_names), len(manifest) - len(ids), box_source_label(manifest.box_sources()[rows])


def evaluate_keypoints(
    home: str | Path,
    run_id: str,
    dataset: str,
    method: str,
    stage: str,
    round_: int,
    *,
    protocol: str = "paper",
    box: str = "landmarks",
    n_regressor_images: int | None = None,
    repeats: int | None = None,
    seed: int = 0,
    forward_lambda: float | None = None,
    backward_lambda: float | None = None,
    missing: MissingRule = "impute",
    hungarian_threshold: float = 0.2,
    train_split: str = "train",
    test_split: str = "test",
    plot: bool = True,
) -> pd.DataFrame:
    """Evaluate one (method, stage, round) of a run; append to metrics.parquet and errors.parquet.

    Returns the metric rows written. The regressors are fitted on the run's
    training-split keypoints (so methods must predict training images too)
    and scored on its test-split keypoints against the manifests' ground truth.
    ``nme_forward`` / ``nme_backward`` / ``acc<t>_hungarian`` score the landmarks
    as written; ``nme_forward_nofallback``, ``nme_backward_nofallback`` and
    ``acc<t>_hungarian_nofallback`` score them with every ``fallback`` landmark
    treated as missing (``missing`` rule), and ``fallback_fraction`` is the share
    of test landmarks that are fallbacks (all equal for methods without any).

    ``protocol`` names the regressor protocol (``pipeline.evaluation.protocols``:
    paper / mallis / lstsq; the size, repeat and lambda arguments override it
    when not None, 0 images = all) and ``box`` the normalising box rule
    (landmarks / image, see ``Manifest.normalisers``); both are recorded in every
    row, so scores under several protocols live side by side.
    """
    from pipeline.evaluation.protocols import check_box, get_protocol

    proto = get_protocol(protocol)
    box = check_box(box)
    home = Path(home)
    ws = Workspace(home)
    kp = read_keypoints(home, run_id)
    kp = kp[(kp["method"] == method) & (kp["stage"] == stage) & (kp["round"] == int(round_))]
    parts = {}
    for split in (train_split, test_split):
        sub = kp[kp["split"] == split]
        if sub.empty:
            raise StoreError(
                f"run {run_id!r} has no {split} keypoints for method={method} stage={stage} round={round_}",
                where=str(ws.run_file(run_id, "keypoints.parquet")),
                fix="the regressors need keypoints on training images and the test images: re-run the method on both splits",
            )
        parts[split] = _eval_split(home, dataset, split, sub, box)
    (train, train_fb, names, _, _), (test, test_fb, _, n_unpredicted, box_source) = parts[train_split], parts[test_split]
    if train.gt.shape[1] == 0:
        # A dataset without labels (the `folder` loader, `uld discover`): nothing to score against.
        # The methods' label-free measures (presence, fallbacks, cluster quality) are their own rows.
        return pd.DataFrame(columns=["run_id", "method", "stage", "round", "dataset", "split", "metric", "value", "k", "n_regressor_images", "repeat", "protocol", "box"])
    nme_args = dict(
        protocol=proto, n_regressor_images=n_regressor_images, repeats=repeats, seed=seed,
        forward_lambda=forward_lambda, backward_lambda=backward_lambda, missing=missing,
    )
    rep = evaluate_nme(train, test, **nme_args)
    # The same protocol with every fallback landmark treated as missing (then imputed or
    # dropped by `missing`, like any absent landmark): what the detections alone are worth.
    train_nf, test_nf = train.without(train_fb), test.without(test_fb)
    try:
        rep_nf = evaluate_nme(train_nf, test_nf, **nme_args)
    except ConfigError:  # e.g. missing="drop" with fallbacks in almost every image: nothing left to fit
        rep_nf = None
    K = train.disc.shape[1]
    n_fit = rep.counts["n_regressor_images"]
    base = {"run_id": run_id, "method": method, "stage": stage, "round": int(round_), "dataset": dataset, "split": test_split, "k": K,
            "n_regressor_images": n_fit, "protocol": proto.name, "box": box, "box_source": box_source}
    rows: list[dict[str, Any]] = []

    def add(metric: str, value: float, repeat: int = -1, **over: Any) -> None:
        rows.append({**base, **over, "metric": metric, "value": float(value), "repeat": int(repeat)})

    for res in (rep.forward, rep.backward):
        # Each direction's rows carry its own regressor size (they differ under `mallis`).
        add(f"nme_{res.direction}", res.mean, n_regressor_images=res.n_regressor_images)
        for r, v in enumerate(res.per_repeat):
            add(f"nme_{res.direction}", v, r, n_regressor_images=res.n_regressor_images)
        add(f"ced_auc{CED_MAX_ERROR:g}_{res.direction}", ced_curve(res.per_image, CED_MAX_ERROR)[2])
        if np.isfinite(test.yaw).any():
            for label, value, count in nme_by_yaw(res.per_image, test.yaw):
                add(f"nme_{res.direction}_yaw{label}", value)
                add(f"n_images_{res.direction}_yaw{label}", count)
    for direction in ("forward", "backward"):
        res_nf = None if rep_nf is None else getattr(rep_nf, direction)
        add(f"nme_{direction}_nofallback", float("nan") if res_nf is None else res_nf.mean,
            n_regressor_images=-1 if rep_nf is None else rep_nf.counts["n_regressor_images"])
    for name, value in rep.counts.items():
        add(name, value)
    add("n_test_without_keypoints", n_unpredicted)
    add("missing_rule_drop", 1.0 if missing == "drop" else 0.0)
    add("fallback_fraction", float(test_fb.mean()) if test_fb.size else 0.0)
    hung = hungarian_accuracy(train, test, hungarian_threshold)
    add(f"acc{hungarian_threshold:g}_hungarian", hung.mean)
    for l, acc in enumerate(hung.accuracy):
        add(f"acc{hungarian_threshold:g}_gt{l}_{names[l] if l < len(names) else l}", acc)
        add(f"hungarian_match_gt{l}", hung.matched[l])
    # A fallback landmark never counts as a hit here (the matching is fitted on detections only).
    add(f"acc{hungarian_threshold:g}_hungarian_nofallback", hungarian_accuracy(train_nf, test_nf, hungarian_threshold).mean)
    write_metrics(home, run_id, rows)

    err = pd.concat(
        [
            pd.DataFrame({**{k: base[k] for k in _RUN_KEYS + ["dataset", "split", "protocol", "box"]}, "direction": res.direction,
                          "image_id": test.image_ids, "nme": res.per_image, "yaw": test.yaw.astype(np.float32)})
            for res in (rep.forward, rep.backward)
        ],
        ignore_index=True,
    )
    append_table(err, ws.run_file(run_id, "errors.parquet"), "errors", replace_on=ERROR_KEYS)
    if plot:
        from pipeline.evaluation.plots import plot_ced

        plot_ced(
            {"forward": rep.forward.per_image, "backward": rep.backward.per_image},
            ws.figures_dir(run_id) / f"ced_{method}_{stage}_{int(round_):03d}{protocol_suffix(proto.name, box)}.png",
            max_error=CED_MAX_ERROR,
            title=f"{method} {stage} r{round_} on {dataset} (K={K}){'' if not protocol_suffix(proto.name, box) else f', {proto.name}/{box}'}",
        )
    return pd.DataFrame(rows)


def protocol_suffix(protocol: str, box: str) -> str:
    """File-name suffix of a non-default (protocol, box): '' for paper / landmarks, so older names stay."""
    return "" if (protocol, box) == ("paper", "landmarks") else f"_{protocol}_{box}"


def metrics_table(home: str | Path, run_id: str) -> pd.DataFrame:
    """The run's metrics (mean rows only), one line per (method, stage, round, protocol, box, metric): for printing."""
    m = read_table(Workspace(Path(home)).run_file(run_id, "metrics.parquet"), "metrics")
    m = m[m["repeat"] == -1]
    cols = ["method", "stage", "round", "dataset", "split", "k", "n_regressor_images", "protocol", "box", "metric", "value"]
    return m[cols].reset_index(drop=True)


def regressor_size_curve(
    home: str | Path,
    run_id: str,
    dataset: str,
    method: str,
    stage: str,
    round_: int,
    sizes: tuple[int, ...] | None = None,
    *,
    protocol: str = "paper",
    box: str = "landmarks",
    seed: int = 0,
    train_split: str = "train",
    test_split: str = "test",
) -> pd.DataFrame:
    """NME against the number of regressor images for one (method, stage, round) of a run
    (:func:`pipeline.evaluation.regressor_curve.nme_by_regressor_size` on the run's keypoints);
    an empty frame when the dataset has no labels or a split has no keypoints."""
    from pipeline.evaluation.regressor_curve import DEFAULT_SIZES, nme_by_regressor_size

    kp = read_keypoints(home, run_id)
    kp = kp[(kp["method"] == method) & (kp["stage"] == stage) & (kp["round"] == int(round_))]
    parts = {}
    for split in (train_split, test_split):
        sub = kp[kp["split"] == split]
        if sub.empty:
            return pd.DataFrame()
        parts[split] = _eval_split(Path(home), dataset, split, sub, box)[0]
    if parts[train_split].gt.shape[1] == 0:
        return pd.DataFrame()
    return nme_by_regressor_size(parts[train_split], parts[test_split], sizes or DEFAULT_SIZES, protocol=protocol, seed=seed)
