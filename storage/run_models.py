"""Where a method run keeps the parts of its trained model, and what its feature store says.

A run folder (``<home>/runs/<run_id>/``) holds a method's model in the method's
own layout:

* ZeroShot: ``zeroshot/model/`` (centroids + config, ``ZeroShot.save_pretrained``);
* D-ULD: ``checkpoints/<stage>-<round>/`` with the heads (``config.json`` +
  ``model.safetensors``), the evaluation centroids (``centroids.npy``) and
  ``state.json``, written last (a checkpoint without it is unfinished).

The features the model was trained on are described by the run's feature
store (its spec, backbone identity, layers, projections). This module finds
those files and reads that description; it builds no model (that is
:mod:`pipeline.predictor`'s job).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import StoreError
from storage.locations import is_url

ZEROSHOT_MODEL_DIR = "zeroshot/model"
CHECKPOINTS_DIR = "checkpoints"
# The D-ULD checkpoint files (flows/duld.py writes them; tests/test_predict.py checks the names agree).
STATE_NAME = "state.json"
CENTROIDS_NAME = "centroids.npy"
# Methods whose runs are trained heads + landmark centroids in checkpoints (flows/duld.py's engine;
# D-ULD++'s proxy / TSC checkpoints add its pose VAE and two-stage labeller, read by pipeline.predictor).
HEADS_METHODS = ("duld", "mallis-d", "duld++")


@dataclass(frozen=True)
class RunModel:
    """The files of one run's trained model: ``model_dir`` holds the method's weights."""

    run_dir: Path
    run_id: str
    method: str
    config: dict[str, Any]
    model_dir: Path
    stage: str
    round: int
    store_path: Path | str  # a folder, or the fsspec URL of a remote store


@dataclass(frozen=True)
class StoreRecipe:
    """What a feature store says about how its features were made (all a predictor needs to redo it)."""

    spec: dict[str, Any]  # FeatureSpec.to_json() as stored (the backbone's canonical spec)
    backbone_name: str
    backbone_identity: dict[str, Any]
    layers: list[str]
    keys: list[str]
    shapes: dict[str, tuple[int, int, int]]
    image_size: int
    config_hash: str
    shard_size: int
    extraction_batch_size: int
    projections: dict[str, np.ndarray] = field(default_factory=dict)


def is_run_dir(path: str | Path) -> bool:
    """True for a folder with a run's ``config.json`` naming its method."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "method" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def _finished_checkpoints(run_dir: Path) -> list[tuple[int, str, Path]]:
    out = []
    root = run_dir / CHECKPOINTS_DIR
    for d in sorted(root.glob("*-[0-9][0-9][0-9]")) if root.is_dir() else []:
        if not (d / STATE_NAME).is_file():
            continue  # unfinished: never used
        stage, _, number = d.name.rpartition("-")
        out.append((int(number), stage, d))
    return sorted(out)


def resolve_store_path(recorded: str | Path, run_dir: Path) -> Path | str:
    """The run's feature store on this machine.

    Runs record the store path as it was given, which is relative to the
    directory the run was started from when the workspace was; so a relative
    path that does not exist from here is looked up again under the run's own
    workspace (``<home>/features/...``). A store at an fsspec URL is the URL.
    """
    if is_url(recorded):
        return str(recorded)
    p = Path(recorded)
    if p.is_dir():
        return p
    parts = p.parts
    if "features" in parts:
        home = run_dir.resolve().parent.parent
        candidate = home.joinpath(*parts[parts.index("features") :])
        if candidate.is_dir():
            return candidate
    raise StoreError(
        "the run's feature store is not there; the model's feature settings (spec, backbone identity, projections) are read from it",
        where=str(p),
        fix="restore the workspace's features/ folder (or re-run `uld features` with the run's options), "
        "or load a model exported with `uld export-model` / LandmarkPredictor.save_pretrained",
    )


def locate_run_model(run_dir: str | Path, round_: int | None = None) -> RunModel:
    """The trained model of the run at ``run_dir``: ZeroShot's centroids, or D-ULD's last
    finished checkpoint (``round_`` picks another finished round)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise StoreError("not a run folder (no config.json)", where=str(run_dir), fix="pass a folder under <home>/runs/, or a run id with --home")
    config = json.loads(cfg_path.read_text())
    method = str(config.get("method", ""))
    run_id = str(config.get("run_id", run_dir.name))
    if method == "zeroshot":
        model_dir = run_dir / ZEROSHOT_MODEL_DIR
        if not (model_dir / "zeroshot_centroids.npy").is_file():
            raise StoreError("the ZeroShot run has no centroids yet", where=str(model_dir), fix=f"finish the run first: `uld zeroshot --run-id {run_id} ...` resumes it")
        if round_ not in (None, 0):
            raise StoreError(f"a ZeroShot run has only round 0, not {round_}", where=str(run_dir), fix="drop --round")
        return RunModel(run_dir, run_id, method, config, model_dir, "zeroshot", 0, resolve_store_path(config["store_path"], run_dir))
    if method in HEADS_METHODS:
        done = _finished_checkpoints(run_dir)
        if not done:
            raise StoreError("the D-ULD run has no finished checkpoint", where=str(run_dir / CHECKPOINTS_DIR),
                             fix=f"let the bootstrap finish: `uld duld --run-id {run_id} --resume ...`")
        if round_ is not None:
            done = [d for d in done if d[0] == int(round_)]
            if not done:
                raise StoreError(f"the D-ULD run has no finished round {round_}", where=str(run_dir / CHECKPOINTS_DIR),
                                 fix="pick one of its finished rounds (checkpoints/*/state.json)")
        number, stage, ckpt = done[-1]
        return RunModel(run_dir, run_id, method, config, ckpt, stage, number, resolve_store_path(config["feature_store"], run_dir))
    raise StoreError(
        f"runs of method {method!r} have no trained model to predict with",
        where=str(cfg_path),
        fix="use a ZeroShot (`uld zeroshot`) or D-ULD (`uld duld`) run",
    )


def read_store_recipe(store_path: str | Path) -> StoreRecipe:
    """The feature description of the store at ``store_path`` (its attributes only: no features are read)."""
    from storage.features import FeatureStore, key_layer

    store = FeatureStore.open(store_path, require_complete=False)
    cfg = store.config
    if "spec" not in cfg or "backbone" not in cfg:
        raise StoreError("the feature store does not record its feature spec and backbone", where=str(store.path),
                         fix="rebuild it with `uld features` (stores made by hand cannot be redone on new images)")
    layers = list(cfg.get("layers") or sorted({key_layer(k) for k in store.keys}))
    projections = {layer: np.asarray(p, np.float32) for layer in layers if (p := store.projection(layer)) is not None}
    return StoreRecipe(
        spec=dict(cfg["spec"]),
        backbone_name=str(cfg.get("backbone_name", "")),
        backbone_identity=dict(cfg["backbone"]),
        layers=layers,
        keys=list(store.keys),
        shapes=dict(store.shapes),
        image_size=int(store.image_size),
        config_hash=str(store.config_hash),
        shard_size=int(store.shard_size),
        extraction_batch_size=int(store.attrs.get("extraction", {}).get("batch_size", 16)),
        projections=projections,
    )
