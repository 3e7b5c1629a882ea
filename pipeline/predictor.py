"""Landmarks for new images with a trained method: a model directory a user can copy.

::

    from pipeline import LandmarkPredictor

    p = LandmarkPredictor.from_pretrained("workspace/runs/<run_id>")   # or an exported model folder
    df = p.predict(["a.jpg", "b.jpg"])                                 # one row per (image, landmark)

A :class:`LandmarkPredictor` bundles everything that turns an image into the
method's landmarks:

* the backbone reference: how to load it (``shipped``, a folder, a hub id),
  its identity (weights hash, scheduler, ...) and its use (the features, the
  UNet StableKeypoints reads attention from, or only the training); a backbone
  whose identity differs is refused, because the method's centroids / heads /
  tokens only mean something on the backbone they were trained on;
* the crop rule (:class:`CropRule`: crop size and margin) and, for the methods
  that read features, the feature recipe: the :class:`FeatureSpec` (crop size,
  margin, timesteps, noise seed), the layers, and the fixed random projections
  of the store;
* the method's part (:class:`MethodPart`, below): its weights, RoI rule and read-out.

Features of new images are computed on the fly, exactly as the feature store
computes them (``flows.features.compute_shard``): the same crop, the same
[-1, 1] input, per-image noise seeded from ``(spec.noise_seed, noise index)``,
the same projection in float32 and the same cast to float16. The methods then
see the very numbers they would read from a store.

Unlabelled images have no object box: the box is the whole image (the
``folder`` dataset's rule, :func:`pipeline.datasets.folder.unlabelled_box`),
and the square crop box around it is made by the same
:func:`pipeline.datasets.crop.crop_boxes` as for every dataset.

Two things make the features of an image depend on more than the image; both
are fixed here so that a prediction depends only on the image:

* the noise: the store seeds it with the image's row; new images all use
  noise index 0 (:data:`NEW_IMAGE_NOISE_INDEX`), so an image's landmarks do not
  depend on its position in the list;
* the batch: a CPU convolution's float32 result differs in the last bits with
  the batch size (measured: ~1e-6, which flips ~0.4 % of the float16 values by
  one unit). To reproduce a store bit for bit, :class:`ImageItem` can name the
  backbone batch (``group``) an image was extracted in, with its batch mates
  (``keep=False``): ``uld predict --dataset`` does that.

Every trained method of the project plugs in as a *method part* (:class:`MethodPart`,
registered in :data:`PARTS` by bundle name and in :data:`RUN_METHODS` by run method):
the predictor owns the one predict loop (read, crop, encode when the part reads
features, batch, map back to original pixels), the part owns its weights and its
read-out of one batch. The parts:

* ``zeroshot`` (ZeroShot): centroids on the features;
* ``heads`` (``duld``, ``mallis-d``, and the D-ULD rounds of ``duld++``): the heads +
  the K landmark centroids of their last evaluation (Mallis (D): the K landmark
  centres of its over-clustering);
* ``tsc`` (the proxy and TSC rounds of ``duld++``): the heads, the pose VAE and the
  two-stage labeller: the VAE encoder gives a new image's pose code, its pose cluster's
  stage-2 centroids in identity order read out its K landmarks;
* ``condgen`` (``jakab``, ``c3``): the keypoint encoder's K expected coordinates on the
  crop (no backbone at prediction: the diffusion UNet was only the perceptual loss);
* ``stablekeypoints``: the optimised tokens' attention maps on the crop, through the
  frozen text-conditioned UNet (the backbone reference, identity-checked like the
  feature backbones).

Directory layout written by :meth:`LandmarkPredictor.save_pretrained`::

    predictor.json          method, part, crop rule, backbone reference + identity (+ its use),
                            feature recipe (feature methods), the part's settings, provenance
    projections.safetensors fixed random projections per layer (only with reduce_channels)
    zeroshot/               ZeroShot: zeroshot_config.json + zeroshot_centroids.npy
    heads/                  D-ULD / Mallis (D) / D-ULD++: config.json + model.safetensors (ULDHeads) and
                            centroids.npy; D-ULD++'s TSC read-out adds vae.json + vae.safetensors and
                            labeller.npz (the two-stage labeller's state)
    condgen/                Jakab / C3: model.safetensors (the whole CondGenNet)
    stablekeypoints/        StableKeypoints: tokens.safetensors (the N tokens and the K selected ids)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from pipeline.backbones.base import FeatureSpec
from pipeline.errors import BackboneError, ConfigError, DatasetError, StoreError
from pipeline.methods.landmarks import LandmarkSet

if TYPE_CHECKING:
    from pipeline.backbones.base import DiffusionBackbone

CONFIG_NAME = "predictor.json"
PROJECTIONS_NAME = "projections.safetensors"
ZEROSHOT_DIR = "zeroshot"
HEADS_DIR = "heads"
CENTROIDS_NAME = "centroids.npy"
FORMAT = "uld-landmark-predictor"
CONDGEN_DIR = "condgen"
STABLEKEYPOINTS_DIR = "stablekeypoints"
# D-ULD++'s checkpoint files (flows/duldpp_stages.py writes them; tests/test_predict_methods.py checks the names agree).
VAE_WEIGHTS = "vae.safetensors"
VAE_CONFIG = "vae.json"
LABELLER_NAME = "labeller.npz"
# D-ULD++'s stages that read landmarks out with the two-stage labeller (flows.duld PROXY / DULDPP).
TSC_STAGES = ("proxy", "duldpp")
# Jakab / C3 and StableKeypoints checkpoint files (flows/condgen.py, flows/stablekeypoints.py).
CONDGEN_WEIGHTS = "model.safetensors"
SK_TOKENS = "tokens.safetensors"
SK_SELECTION = "selection.json"
FORMAT_VERSION = 1  # new keys are optional: bundles written before the other methods still load
METHODS = ("zeroshot", "duld", "mallis-d", "duld++", "jakab", "c3", "stablekeypoints")
# What the backbone reference is for: the features the method reads, the text-conditioned UNet
# whose attention StableKeypoints reads, or only the training (Jakab / C3's perceptual loss).
BACKBONE_USES = ("features", "conditioned-unet", "training-only")
#: The noise index of every new image (the store uses the image's row): see the module doc.
NEW_IMAGE_NOISE_INDEX = 0
#: Columns of a prediction frame (one row per image and landmark; x, y in original pixels).
COLUMNS = ("image", "image_id", "method", "landmark_id", "x", "y", "score", "present", "fallback",
           "width", "height", "crop_x0", "crop_y0", "crop_x1", "crop_y1")


# ------------------------------------------------------------------ parts of the bundle
@dataclass(frozen=True)
class BackboneRef:
    """How to load the backbone (``spec`` for :func:`load_backbone`) and what it must be (``identity``).

    ``use`` (:data:`BACKBONE_USES`): ``features`` (a :class:`DiffusionBackbone`),
    ``conditioned-unet`` (StableKeypoints' UNet, :func:`load_conditioned_unet`) or
    ``training-only`` (recorded for provenance, never loaded to predict).
    """

    spec: str
    name: str
    identity: dict[str, Any]
    use: str = "features"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "BackboneRef":
        return cls(spec=str(d["spec"]), name=str(d.get("name", d["spec"])), identity=dict(d.get("identity") or {}), use=str(d.get("use", "features")))

    def check(self, backbone: Any, where: str) -> None:
        """Refuse a backbone whose identity is not the one the model was trained with."""
        # JSON round trip: identities read from disk have lists where fresh ones have tuples.
        have = json.loads(json.dumps(backbone_identity(backbone), sort_keys=True, default=str))
        want = json.loads(json.dumps(self.identity, sort_keys=True, default=str))
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            name = getattr(backbone, "name", None) or getattr(backbone, "kind", "?")
            raise BackboneError(
                f"backbone {name!r} is not the one this model was trained with (identity differs in {', '.join(diff)}; "
                f"weights {have.get('weights', '?')} here, {want.get('weights', '?')} expected)",
                where=where,
                fix=f"load the backbone the model was trained with ({self.spec!r}, weights hash {want.get('weights', '?')}): "
                "pass it as backbone= / --backbone, or retrain the method on this backbone",
            )


def backbone_identity(backbone: Any) -> dict[str, Any]:
    """A loaded backbone's identity: ``DiffusionBackbone.identity()`` or ``ConditionedUNet.identity``."""
    ident = backbone.identity
    return dict(ident() if callable(ident) else ident)


@dataclass(frozen=True)
class FeatureRecipe:
    """How the method's features are made from a crop (the feature store's recipe)."""

    spec: FeatureSpec
    layers: tuple[str, ...]
    keys: tuple[str, ...]
    shapes: dict[str, tuple[int, int, int]]
    projections: dict[str, np.ndarray]
    store_config_hash: str = ""
    shard_size: int = 64  # how the source store was extracted: lets a check reproduce its batches
    extraction_batch_size: int = 16

    @property
    def image_size(self) -> int:
        return int(self.spec.image_size)

    def to_json(self) -> dict:
        return {
            "spec": self.spec.to_json(),
            "layers": list(self.layers),
            "keys": list(self.keys),
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "projected_layers": sorted(self.projections),
            "store_config_hash": self.store_config_hash,
            "shard_size": self.shard_size,
            "extraction_batch_size": self.extraction_batch_size,
        }

    @classmethod
    def from_json(cls, d: dict, projections: dict[str, np.ndarray]) -> "FeatureRecipe":
        return cls(
            spec=spec_from_json(d["spec"]),
            layers=tuple(d["layers"]),
            keys=tuple(d["keys"]),
            shapes={k: tuple(int(x) for x in v) for k, v in d["shapes"].items()},
            projections=projections,
            store_config_hash=str(d.get("store_config_hash", "")),
            shard_size=int(d.get("shard_size", 64)),
            extraction_batch_size=int(d.get("extraction_batch_size", 16)),
        )


def spec_from_json(d: dict) -> FeatureSpec:
    """A FeatureSpec from its JSON (lists back to tuples); an old crop rule is refused by FeatureSpec."""
    d = dict(d)
    d["timesteps"] = tuple(int(t) for t in d.get("timesteps", ()))
    d["layers"] = tuple(d.get("layers", ()))
    return FeatureSpec(**d)


@dataclass(frozen=True)
class ImageItem:
    """One image to predict.

    ``box``: the object box (x0, y0, x1, y1) in original pixels, or None for an
    unlabelled image (the whole image). ``noise_index``: the per-image noise
    index (a store row; new images use :data:`NEW_IMAGE_NOISE_INDEX`).
    ``group``: items with the same group go through the backbone in one call
    (None: consecutive ungrouped items in chunks of the batch size). ``keep=False``:
    encoded only as a batch mate of its group, not predicted nor reported.
    """

    path: str
    image_id: str
    box: tuple[float, float, float, float] | None = None
    noise_index: int = NEW_IMAGE_NOISE_INDEX
    group: int | None = None
    keep: bool = True


@dataclass
class PredictionResult:
    """What :meth:`LandmarkPredictor.run` returns.

    ``frame``: one row per (image, landmark) (:data:`COLUMNS`); ``skipped``:
    one row per image that could not be used (``image``, ``image_id``, ``reason``);
    ``landmarks`` (crop pixels), ``crop_boxes`` (N, 4) and ``image_ids`` of
    the predicted images, in input order.
    """

    frame: pd.DataFrame
    skipped: pd.DataFrame
    landmarks: LandmarkSet
    crop_boxes: np.ndarray
    image_ids: list[str]

    def summary(self) -> str:
        n = len(self.image_ids)
        k = self.landmarks.k
        found = f", {self.landmarks.present.mean():.0%} of the {k} landmarks present" if n else ""
        return f"predicted {n} image(s){found}; skipped {len(self.skipped)} unreadable"


# ------------------------------------------------------------------ on-the-fly features
def to_model_input(crops: np.ndarray) -> "Any":
    """uint8 crops (B, S, S, 3) -> float32 tensor (B, 3, S, S) in [-1, 1] (the backbone contract)."""
    import torch

    x = np.asarray(crops)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ConfigError(f"crops must be uint8 (B, S, S, 3), got {x.dtype} {x.shape}", where="to_model_input")
    return torch.from_numpy(np.ascontiguousarray((x.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)))


def encode_crops(backbone: "DiffusionBackbone", crops: np.ndarray, recipe: FeatureRecipe, noise_indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Features of ``crops`` in the stored form: ``{key: float16 (B, C, h, w)}``, one backbone call.

    The same steps as the feature store's extraction: noise per image from
    ``(spec.noise_seed, noise index)`` (or, for a backbone without per-image
    noise, one generator seeded by the batch's first index), projection in
    float32, cast to float16. Values that overflow float16 become inf / NaN
    (the caller reports those images).
    """
    import inspect

    import torch

    spec = recipe.spec
    images = to_model_input(crops).to(backbone.device)
    idx = [int(i) for i in noise_indices]
    if len(idx) != len(images):
        raise ConfigError(f"{len(idx)} noise indices for {len(images)} crops", where="encode_crops")
    with torch.no_grad():
        if "noise_seeds" in inspect.signature(backbone.extract).parameters:
            from pipeline.backbones.common import noise_seed_for

            feats = backbone.extract(images, list(spec.timesteps), list(recipe.layers), noise_seeds=[noise_seed_for(spec.noise_seed, i) for i in idx])
        else:
            gen = torch.Generator().manual_seed(int(spec.noise_seed) * 1_000_003 + idx[0])
            feats = backbone.extract(images, list(spec.timesteps), list(recipe.layers), generator=gen)
    out = {}
    for key in recipe.keys:
        if key not in feats:
            raise BackboneError(f"the backbone returned no feature {key!r} (got {sorted(feats)})", where="encode_crops",
                                fix="load the backbone the model was trained with")
        x = feats[key].detach().float().cpu().numpy()
        proj = recipe.projections.get(key.rsplit("@t", 1)[0])
        if proj is not None:
            x = np.einsum("oc,nchw->nohw", proj, x, optimize=True)
        with np.errstate(over="ignore", invalid="ignore"):
            out[key] = x.astype(np.float16)
        want = (len(images), *recipe.shapes[key])
        if out[key].shape != want:
            raise BackboneError(f"feature {key!r} has shape {out[key].shape}, the model expects {want}", where="encode_crops",
                                fix="load the backbone the model was trained with, at the model's crop size")
    return out


def object_rois(boxes: np.ndarray, sizes: np.ndarray, crops: np.ndarray, crop_size: int) -> np.ndarray:
    """RoIs (N, 4) in crop px: object boxes mapped into the crops and clipped to the in-image part
    (as ``flows.zeroshot.store_rois`` builds them for stores)."""
    from pipeline.datasets.crop import clip_rois_to_image, to_crop

    b = np.asarray(boxes, np.float64).reshape(-1, 2, 2)
    rois = to_crop(b, np.asarray(crops, np.float64), crop_size).reshape(-1, 4)
    return clip_rois_to_image(rois, np.asarray(sizes, np.float64), crops, crop_size)


# ------------------------------------------------------------------ method parts
@dataclass(frozen=True)
class CropRule:
    """How an image becomes the method's input: the square crop box around the object box with
    ``margin`` (:func:`pipeline.datasets.crop.crop_boxes`), resized to ``size`` px -- the
    feature store's rule for the feature methods, ``load_crops``' (the same) for the others."""

    size: int
    margin: float

    def to_json(self) -> dict[str, Any]:
        return {"size": int(self.size), "margin": float(self.margin)}


@dataclass
class MethodBatch:
    """One batch as a method part sees it.

    ``crops`` uint8 (B, S, S, 3); ``features`` the stored-form features (feature parts, else
    None); ``rois`` (B, 4) crop px; ``noise_indices`` (B,) (a store row, or
    :data:`NEW_IMAGE_NOISE_INDEX`); ``backbone`` the loaded backbone or None.
    """

    crops: np.ndarray
    features: dict[str, np.ndarray] | None
    rois: np.ndarray
    noise_indices: np.ndarray
    backbone: Any = None


@dataclass
class RunParts:
    """What :meth:`MethodPart.from_run` reads from a run folder: the part and the predictor's other pieces."""

    part: "MethodPart"
    crop: CropRule
    backbone_ref: BackboneRef
    recipe: FeatureRecipe | None
    source: dict[str, Any]


class MethodPart:
    """A trained method's own part of a :class:`LandmarkPredictor`: its weights and its read-out of one batch.

    Subclasses set ``name`` (the bundle's ``part``, key of :data:`PARTS`), ``inputs``
    (``features``: the predictor runs the backbone first and hands the stored-form features;
    ``crops``: the part reads the crops), ``backbone_use`` (:data:`BACKBONE_USES`) and
    ``eval_batch`` (the batch the run predicted its splits with, so that ``uld predict
    --dataset`` redoes its batches), and implement :meth:`predict_batch`, :meth:`save` /
    :meth:`load` (the bundle) and :meth:`from_run` (a run folder). The predict loop is the
    predictor's alone.
    """

    name: ClassVar[str] = ""
    inputs: ClassVar[str] = "features"
    backbone_use: ClassVar[str] = "features"

    def __init__(self, method: str) -> None:
        self.method = method

    @property
    def k(self) -> int:
        raise NotImplementedError

    @property
    def roi(self) -> Any:
        """The RoI rule recorded in predictor.json (None: the part reads the whole crop)."""
        return None

    @property
    def eval_batch(self) -> int:
        return 16

    def predict_batch(self, batch: MethodBatch) -> LandmarkSet:
        """K landmarks per image of ``batch``, crop pixels."""
        raise NotImplementedError

    def save(self, directory: Path) -> dict[str, Any]:
        """Write the part's files under ``directory``; return its keys of predictor.json."""
        raise NotImplementedError

    @classmethod
    def load(cls, directory: Path, method: str, config: dict[str, Any], device: str) -> "MethodPart":
        """The part of the bundle at ``directory`` (``config``: its predictor.json)."""
        raise NotImplementedError

    @classmethod
    def from_run(cls, run_dir: Path, config: dict[str, Any], round_: int | None, device: str) -> RunParts:
        """The part of the run at ``run_dir`` (``config``: its config.json) and the predictor's other pieces."""
        raise NotImplementedError


def _feature_run(rm: Any) -> tuple[FeatureRecipe, BackboneRef, CropRule, dict[str, Any]]:
    """A feature method's recipe, backbone reference, crop rule and provenance from its run's store."""
    from storage.run_models import read_store_recipe

    sr = read_store_recipe(rm.store_path)
    recipe = FeatureRecipe(
        spec=spec_from_json(sr.spec), layers=tuple(sr.layers), keys=tuple(sr.keys), shapes=sr.shapes, projections=sr.projections,
        store_config_hash=sr.config_hash, shard_size=sr.shard_size, extraction_batch_size=sr.extraction_batch_size,
    )
    # The backbone as the run was given it (a workspace name, folder or hub id); identity from the store.
    ref = BackboneRef(spec=str(rm.config.get("backbone") or sr.backbone_name), name=sr.backbone_name, identity=sr.backbone_identity)
    source = {"run_id": rm.run_id, "dataset": rm.config.get("dataset"), "stage": rm.stage, "round": rm.round}
    return recipe, ref, CropRule(recipe.image_size, float(recipe.spec.crop_margin)), source


def _feature_tensors(features: dict[str, np.ndarray]) -> dict:
    """The D-ULD batch format for one batch: float32 from float16, as the store's loader hands features to the heads."""
    import torch

    n = len(next(iter(features.values())))
    return {"index": torch.arange(n), "features": {k: torch.from_numpy(v.astype(np.float32)) for k, v in features.items()}}


class ZeroShotPart(MethodPart):
    """ZeroShot: the fitted centroids on the features; ``roi`` ``box`` or ``foreground``."""

    name = "zeroshot"

    def __init__(self, method: str, model: Any, roi: str = "box") -> None:
        super().__init__(method)
        if roi not in ("box", "foreground"):
            raise ConfigError(f"unknown RoI rule {roi!r}", where="predictor.json roi", fix="use 'box' or 'foreground'")
        self.model, self._roi = model, roi

    @property
    def k(self) -> int:
        return int(self.model.n_clusters)

    @property
    def roi(self) -> str:
        return self._roi

    def predict_batch(self, batch: MethodBatch) -> LandmarkSet:
        # (With n_test_samples set, ZeroShot draws each image's pixels from its position in
        # the batch; runs default to every RoI pixel, which does not depend on it.)
        masks = None
        if self._roi == "foreground":
            from pipeline.methods.foreground import foreground_masks

            masks = foreground_masks([batch.features])
        return self.model.predict([batch.features], batch.rois, progress=False, masks=masks)

    def save(self, directory: Path) -> dict[str, Any]:
        self.model.save_pretrained(directory / ZEROSHOT_DIR)
        return {"roi": self._roi}

    @classmethod
    def load(cls, directory: Path, method: str, config: dict[str, Any], device: str) -> "ZeroShotPart":
        from pipeline.methods.zeroshot import ZeroShot

        return cls(method, ZeroShot.from_pretrained(directory / ZEROSHOT_DIR), str(config.get("roi", "box")))

    @classmethod
    def from_run(cls, run_dir: Path, config: dict[str, Any], round_: int | None, device: str) -> RunParts:
        from pipeline.methods.zeroshot import ZeroShot
        from storage.run_models import locate_run_model

        rm = locate_run_model(run_dir, round_)
        recipe, ref, crop, source = _feature_run(rm)
        model = ZeroShot.from_pretrained(rm.model_dir)
        if model.crop_size != recipe.image_size:
            raise StoreError(f"ZeroShot crop size {model.crop_size} differs from its store's {recipe.image_size}", where=str(rm.model_dir))
        return RunParts(cls(rm.method, model, str(rm.config.get("roi", "box"))), crop, ref, recipe, source)


class HeadsPart(MethodPart):
    """The self-training engine's heads (D-ULD, Mallis (D), D-ULD++'s D-ULD rounds) and the K landmark
    centroids of their evaluation (``centroids.npy``); ``roi``: keypoints inside the object box."""

    name = "heads"

    def __init__(self, method: str, heads: Any, centers: np.ndarray, duld_config: Any, roi: bool = True) -> None:
        super().__init__(method)
        self.heads, self.duld_config, self._roi = heads, duld_config, bool(roi)
        self.centers = np.asarray(centers, np.float32)

    @property
    def k(self) -> int:
        return int(len(self.centers))

    @property
    def roi(self) -> bool:
        return self._roi

    @property
    def eval_batch(self) -> int:
        # flows.duld.RunContext.eval_batch: predicting a run's own split with the same batches
        # reproduces its keypoints bit for bit.
        return 32

    def _readout(self, tb: dict) -> tuple[np.ndarray, Any]:
        """The centroids to read K landmarks out with, and per-image ones (or None)."""
        return self.centers, None

    def predict_batch(self, batch: MethodBatch) -> LandmarkSet:
        from pipeline.methods.duld import predict_landmarks

        tb = _feature_tensors(batch.features)
        centers, per_image = self._readout(tb)
        pred = predict_landmarks(self.heads, [tb], centers, self.duld_config, progress=False, rois=batch.rois if self._roi else None,
                                 image_centers=per_image)
        return pred.landmarks

    def save(self, directory: Path) -> dict[str, Any]:
        from storage.atomic import atomic_path

        self.heads.save_pretrained(directory / HEADS_DIR)
        with atomic_path(directory / HEADS_DIR / CENTROIDS_NAME) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, self.centers)
        return {"roi": self._roi, "duld": self.duld_config.to_json()}

    @classmethod
    def _from_dir(cls, folder: Path, method: str, duld_config: Any, roi: bool) -> "HeadsPart":
        """From a folder in the checkpoint layout (a run's checkpoint, or a bundle's heads/)."""
        from pipeline.heads.model import ULDHeads

        centroids = folder / CENTROIDS_NAME
        if not centroids.is_file():
            raise StoreError("the model has no landmark centroids", where=str(centroids), fix="copy the whole model folder")
        return cls(method, ULDHeads.from_pretrained(folder), np.load(centroids), duld_config, roi)

    @classmethod
    def load(cls, directory: Path, method: str, config: dict[str, Any], device: str) -> "HeadsPart":
        from pipeline.methods.duld import DULDConfig

        return cls._from_dir(directory / HEADS_DIR, method, DULDConfig.from_json(config["duld"]), bool(config.get("roi", True)))

    @classmethod
    def from_run(cls, run_dir: Path, config: dict[str, Any], round_: int | None, device: str) -> RunParts:
        from pipeline.methods.duld import DULDConfig
        from storage.run_models import locate_run_model

        rm = locate_run_model(run_dir, round_)
        recipe, ref, crop, source = _feature_run(rm)
        # D-ULD++'s proxy and TSC rounds read out with the two-stage labeller; its D-ULD rounds as D-ULD.
        part_cls = TSCPart if rm.method == "duld++" and rm.stage in TSC_STAGES else HeadsPart
        part = part_cls._from_dir(rm.model_dir, rm.method, DULDConfig.from_json(rm.config["duld"]), bool(rm.config.get("roi", True)))
        if tuple(part.heads.config.feature_keys) != tuple(sorted(recipe.keys)):
            raise StoreError(f"the heads read {part.heads.config.feature_keys}, the store holds {recipe.keys}", where=str(rm.model_dir))
        return RunParts(part, crop, ref, recipe, source)


class TSCPart(HeadsPart):
    """D-ULD++'s proxy / TSC rounds: heads + pose VAE + two-stage labeller.

    Per image the VAE encoder's pose code (the posterior mean of the detector's heatmap,
    :func:`pipeline.methods.duldpp.pose_codes`) picks its pose cluster, whose stage-2
    centroids in identity order (:meth:`TwoStageLabeller.identity_centers`) read out its K
    landmarks -- what ``flows.duldpp_stages.evaluate_tsc_task`` does for the run's splits.
    ``centers`` are the global K-means (they give K and the shared fallback shape).
    """

    name = "tsc"

    def __init__(self, method: str, heads: Any, centers: np.ndarray, duld_config: Any, roi: bool, vae: Any, labeller: Any) -> None:
        super().__init__(method, heads, centers, duld_config, roi)
        self.vae, self.labeller = vae, labeller

    def _readout(self, tb: dict) -> tuple[np.ndarray, Any]:
        from pipeline.methods.duldpp import pose_codes

        _, codes = pose_codes(self.heads, self.vae, [tb])
        per_image = self.labeller.identity_centers(codes)  # (B, K, D); batch["index"] is the batch position
        return self.centers, lambda rows: per_image[np.asarray(rows, np.int64)]

    def save(self, directory: Path) -> dict[str, Any]:
        from safetensors.torch import save_file

        from storage.atomic import atomic_path, write_json

        out = super().save(directory)
        folder = directory / HEADS_DIR
        with atomic_path(folder / VAE_WEIGHTS) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.vae.state_dict().items()}, str(tmp))
        write_json(folder / VAE_CONFIG, self.vae.config.to_json())
        with atomic_path(folder / LABELLER_NAME) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **self.labeller.get_state())
        return out

    @classmethod
    def _from_dir(cls, folder: Path, method: str, duld_config: Any, roi: bool) -> "TSCPart":
        from safetensors.torch import load_file

        from pipeline.heads.pose_vae import PoseVAE, PoseVAEConfig
        from pipeline.labelling.two_stage import TwoStageLabeller

        base = HeadsPart._from_dir(folder, method, duld_config, roi)
        missing = [n for n in (VAE_WEIGHTS, VAE_CONFIG, LABELLER_NAME) if not (folder / n).is_file()]
        if missing:
            raise StoreError(f"the D-ULD++ model lacks {', '.join(missing)} (its pose VAE and two-stage labeller)", where=str(folder),
                             fix="copy the whole model folder, or export it again from its run")
        vcfg = json.loads((folder / VAE_CONFIG).read_text())
        vae = PoseVAE(PoseVAEConfig.from_json({**vcfg, "widths": tuple(vcfg["widths"])}))
        vae.load_state_dict(load_file(str(folder / VAE_WEIGHTS)))
        with np.load(folder / LABELLER_NAME) as z:
            state = {n: z[n] for n in z.files}
        q, k = np.asarray(state["centers"]).shape[:2]
        labeller = TwoStageLabeller(q=int(q), k=int(k)).set_state(state)
        return cls(method, base.heads, base.centers, duld_config, roi, vae, labeller)


def _check_step_checkpoint(run_dir: Path, run_id: str, round_: int | None, what: str) -> Path:
    """The last finished ``checkpoints/step-NNNNNN/`` of an image-trained run (they have one round, 0)."""
    from storage import step_checkpoints

    if round_ not in (None, 0):
        raise StoreError(f"a {what} run has only round 0, not {round_}", where=str(run_dir), fix="drop --round")
    ckpt = step_checkpoints.last(run_dir / "checkpoints")
    if ckpt is None:
        raise StoreError(f"the {what} run has no finished checkpoint", where=str(run_dir / "checkpoints"),
                         fix=f"let it train: `uld train --method ... --run-id {run_id} --resume` continues it")
    return ckpt


def _image_run_source(run_dir: Path, config: dict[str, Any], step: int) -> dict[str, Any]:
    return {"run_id": str(config.get("run_id", run_dir.name)), "dataset": config.get("dataset"), "stage": "train", "round": 0, "step": int(step)}


class CondGenPart(MethodPart):
    """Jakab et al. / C3: the keypoint encoder's K expected coordinates on the crop (``CondGenLandmarks.predict``).

    Reads crops, not features: the diffusion UNet was only the training's perceptual loss,
    so the backbone reference is ``training-only``.
    """

    name = "condgen"
    inputs = "crops"
    backbone_use = "training-only"

    def __init__(self, method: str, estimator: Any) -> None:
        super().__init__(method)
        self.estimator = estimator

    @property
    def k(self) -> int:
        return int(self.estimator.config.k)

    @property
    def eval_batch(self) -> int:
        return 64  # CondGenLandmarks.predict's batch, what flows.condgen's predict task used

    def predict_batch(self, batch: MethodBatch) -> LandmarkSet:
        return self.estimator.predict(batch.crops, batch_size=max(1, len(batch.crops)))

    def save(self, directory: Path) -> dict[str, Any]:
        from safetensors.torch import save_file

        from storage.atomic import atomic_path

        est = self.estimator
        (directory / CONDGEN_DIR).mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / CONDGEN_DIR / CONDGEN_WEIGHTS) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in est.net_.state_dict().items()}, str(tmp))
        return {"condgen": {"config": est.config.to_json(), "image_size": int(est.image_size_), "step": int(est.step_)}}

    @classmethod
    def _build(cls, method: str, config: dict[str, Any], weights: Path, image_size: int, step: int, device: str) -> "CondGenPart":
        from safetensors.torch import load_file

        from pipeline.methods.condgen import CondGenConfig, make_estimator

        if not weights.is_file():
            raise StoreError("the model has no weights", where=str(weights), fix="copy the whole model folder")
        est = make_estimator(method, CondGenConfig.from_json(config), device=device)
        est.load_state_dict({"net": load_file(str(weights)), "optimizer": None, "step": int(step), "image_size": int(image_size)})
        return cls(method, est)

    @classmethod
    def load(cls, directory: Path, method: str, config: dict[str, Any], device: str) -> "CondGenPart":
        sec = config["condgen"]
        return cls._build(method, sec["config"], directory / CONDGEN_DIR / CONDGEN_WEIGHTS, sec["image_size"], sec["step"], device)

    @classmethod
    def from_run(cls, run_dir: Path, config: dict[str, Any], round_: int | None, device: str) -> RunParts:
        from storage import step_checkpoints

        method = str(config["method"])
        ckpt = _check_step_checkpoint(run_dir, str(config.get("run_id", run_dir.name)), round_, method)
        meta = step_checkpoints.read_state(ckpt)
        if int(meta["image_size"]) != int(config["size"]):
            raise StoreError(f"the checkpoint was trained on {meta['image_size']} px crops, the run says {config['size']}", where=str(ckpt))
        part = cls._build(method, config["condgen"], ckpt / CONDGEN_WEIGHTS, int(meta["image_size"]), int(meta["step"]), device)
        spec = str(config["condgen"].get("backbone", ""))
        ref = BackboneRef(spec=spec, name=spec, identity={}, use="training-only")
        return RunParts(part, CropRule(int(config["size"]), float(config["crop_margin"])), ref, None, _image_run_source(run_dir, config, meta["step"]))


class StableKeypointsPart(MethodPart):
    """StableKeypoints: the selected tokens' attention maps on the crop through the frozen
    text-conditioned UNet (``StableKeypoints.predict``; the noise and the augmentation warps of an
    image are seeded by its noise index, as the run seeds them by the crop's row, so the batch
    size does not matter)."""

    name = "stablekeypoints"
    inputs = "crops"
    backbone_use = "conditioned-unet"

    def __init__(self, method: str, config: Any, tokens: np.ndarray, selected: np.ndarray) -> None:
        super().__init__(method)
        self.config = config
        self.tokens = np.asarray(tokens, np.float32)
        self.selected = np.asarray(selected, np.int64)
        self._est: Any = None

    @property
    def k(self) -> int:
        return int(len(self.selected))

    def _estimator(self, unet: Any) -> Any:
        import torch

        from pipeline.methods.stablekeypoints import StableKeypoints

        if self._est is None or self._est.model is not unet:
            est = StableKeypoints(unet, self.config)
            if tuple(est.tokens_.shape) != self.tokens.shape:
                raise BackboneError(f"the model's tokens are {self.tokens.shape}, this UNet takes {tuple(est.tokens_.shape)}",
                                    where="StableKeypoints tokens", fix="load the UNet the tokens were optimised against")
            with torch.no_grad():
                est.tokens_.copy_(torch.from_numpy(self.tokens).to(est.device))
            est.selected_ = self.selected.copy()
            self._est = est
        return self._est

    def predict_batch(self, batch: MethodBatch) -> LandmarkSet:
        if batch.backbone is None:
            raise BackboneError("StableKeypoints needs its text-conditioned UNet to predict", where="LandmarkPredictor",
                                fix="load it: backbone= / --backbone, or let the predictor load the recorded one")
        return self._estimator(batch.backbone).predict(batch.crops, batch.noise_indices, rois=batch.rois)

    def save(self, directory: Path) -> dict[str, Any]:
        from safetensors.numpy import save_file

        from storage.atomic import atomic_path

        (directory / STABLEKEYPOINTS_DIR).mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / STABLEKEYPOINTS_DIR / SK_TOKENS) as tmp:
            save_file({"tokens": np.ascontiguousarray(self.tokens), "selected": np.ascontiguousarray(self.selected)}, str(tmp))
        return {"stablekeypoints": self.config.to_json()}

    @staticmethod
    def _config(d: dict[str, Any]) -> Any:
        from pipeline.methods.stablekeypoints import StableKeypointsConfig

        known = {f.name for f in dataclasses.fields(StableKeypointsConfig)}
        # Runs and bundles from before the RoI rule (no "roi" recorded) predicted on the whole crop.
        return StableKeypointsConfig(**{"roi": False, **{k: v for k, v in d.items() if k in known}})

    @classmethod
    def load(cls, directory: Path, method: str, config: dict[str, Any], device: str) -> "StableKeypointsPart":
        from safetensors.numpy import load_file

        path = directory / STABLEKEYPOINTS_DIR / SK_TOKENS
        if not path.is_file():
            raise StoreError("the StableKeypoints model has no tokens", where=str(path), fix="copy the whole model folder")
        t = load_file(str(path))
        return cls(method, cls._config(config["stablekeypoints"]), t["tokens"], t["selected"])

    @classmethod
    def from_run(cls, run_dir: Path, config: dict[str, Any], round_: int | None, device: str) -> RunParts:
        from safetensors.numpy import load_file

        from storage import step_checkpoints

        run_id = str(config.get("run_id", run_dir.name))
        ckpt = _check_step_checkpoint(run_dir, run_id, round_, "StableKeypoints")
        selection = run_dir / SK_SELECTION
        if not selection.is_file():
            raise StoreError("the StableKeypoints run has not selected its K tokens yet", where=str(selection),
                             fix=f"finish the run: `uld train --method stablekeypoints --run-id {run_id} --resume ...`")
        cfg = cls._config(config["stablekeypoints"])
        tokens = load_file(str(ckpt / SK_TOKENS))["tokens"]
        part = cls(str(config["method"]), cfg, tokens, np.asarray(json.loads(selection.read_text())["tokens"], np.int64))
        ref = BackboneRef(spec=str(cfg.backbone), name=str(cfg.backbone), identity=dict(config.get("backbone_identity") or {}), use="conditioned-unet")
        step = step_checkpoints.read_state(ckpt)["step"]
        return RunParts(part, CropRule(int(config["size"]), float(config["crop_margin"])), ref, None, _image_run_source(run_dir, config, step))


#: Bundle part name -> class (predictor.json ``part``).
PARTS: dict[str, type[MethodPart]] = {c.name: c for c in (ZeroShotPart, HeadsPart, TSCPart, CondGenPart, StableKeypointsPart)}
#: Run method (config.json ``method``) -> the class that reads its run folder.
RUN_METHODS: dict[str, type[MethodPart]] = {
    "zeroshot": ZeroShotPart, "duld": HeadsPart, "mallis-d": HeadsPart, "duld++": HeadsPart,
    "jakab": CondGenPart, "c3": CondGenPart, "stablekeypoints": StableKeypointsPart,
}


# ------------------------------------------------------------------ the predictor
class LandmarkPredictor:
    """A trained landmark method with everything needed to run it on new images (see the module doc).

    ``part``: the method's :class:`MethodPart`; ``crop``: how images become its input;
    ``backbone_ref``: the backbone it needs (and its use); ``recipe``: the feature recipe
    (feature parts only).
    """

    def __init__(
        self,
        part: MethodPart,
        crop: CropRule,
        backbone_ref: BackboneRef,
        *,
        recipe: FeatureRecipe | None = None,
        source: dict[str, Any] | None = None,
        device: str = "cpu",
    ) -> None:
        if part.method not in METHODS:
            raise ConfigError(f"unknown method {part.method!r}", where="LandmarkPredictor", fix=f"one of {', '.join(METHODS)}")
        if part.inputs == "features" and recipe is None:
            raise ConfigError(f"a {part.method} predictor reads features: it needs their recipe", where="LandmarkPredictor")
        if backbone_ref.use not in BACKBONE_USES:
            raise ConfigError(f"unknown backbone use {backbone_ref.use!r}", where="predictor.json backbone.use", fix=f"one of {', '.join(BACKBONE_USES)}")
        self.part = part
        self.crop = crop
        self.recipe = recipe
        self.backbone_ref = backbone_ref
        self.source = dict(source or {})
        self.device = device
        self._backbone: Any = None
        self._home: str | Path | None = None

    @property
    def method(self) -> str:
        return self.part.method

    @property
    def k(self) -> int:
        return self.part.k

    @property
    def roi(self) -> Any:
        return self.part.roi

    @property
    def eval_batch(self) -> int:
        """The batch the run predicted its splits with (``uld predict --dataset``'s default)."""
        return self.part.eval_batch

    def __repr__(self) -> str:
        src = self.source.get("run_id", "?")
        return f"LandmarkPredictor(method={self.method!r}, k={self.k}, backbone={self.backbone_ref.spec!r}, crop={self.crop.size}, run={src!r})"

    # ---------------------------------------------------------- backbone
    @property
    def needs_backbone(self) -> bool:
        return self.backbone_ref.use != "training-only"

    def set_backbone(self, backbone: Any, home: str | Path | None = None) -> Any:
        """Load (from a spec) or take ``backbone``; refuse it unless its identity is the model's."""
        if not self.needs_backbone:
            raise ConfigError(
                f"a {self.method} model needs no backbone to predict (its backbone {self.backbone_ref.spec!r} was only its training's perceptual loss)",
                where="backbone= / --backbone",
                fix="drop the backbone",
            )
        if isinstance(backbone, str):
            try:
                if self.backbone_ref.use == "conditioned-unet":
                    from pipeline.methods.stablekeypoints import load_conditioned_unet

                    backbone = load_conditioned_unet(backbone, device=self.device, home=home)
                else:
                    from pipeline.backbones.loading import load_backbone

                    backbone = load_backbone(backbone, self.device, home=home)
            except BackboneError as err:
                raise BackboneError(
                    f"the model's backbone cannot be loaded: {err.what}",
                    where=err.where,
                    fix=f"pass the backbone the model was trained with (weights hash {self.backbone_ref.identity.get('weights', '?')}) "
                    "as backbone= / --backbone (a folder or hub id on this machine)",
                ) from None
        self.backbone_ref.check(backbone, where=f"backbone {self.backbone_ref.spec!r}")
        self._backbone = backbone
        return backbone

    @property
    def backbone(self) -> Any:
        """The loaded backbone (loaded on first use); None for a method that predicts without one."""
        if self._backbone is None and self.needs_backbone:
            self.set_backbone(self.backbone_ref.spec, self._home)
        return self._backbone

    # ---------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the bundle (see the module doc) to ``directory``; load it with :meth:`from_pretrained`."""
        from storage.atomic import atomic_path, write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.recipe is not None and self.recipe.projections:
            from safetensors.numpy import save_file

            with atomic_path(directory / PROJECTIONS_NAME) as tmp:
                save_file({k: np.ascontiguousarray(v, np.float32) for k, v in self.recipe.projections.items()}, str(tmp))
        own = self.part.save(directory)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "part": self.part.name,
            "k": self.k,
            "crop": self.crop.to_json(),
            "backbone": self.backbone_ref.to_json(),
            **({"features": self.recipe.to_json()} if self.recipe is not None else {}),
            "source": self.source,
            **own,
        }
        write_json(directory / CONFIG_NAME, config)  # last: a folder without it is not a model
        return directory

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        backbone: Any = None,
        device: str = "cpu",
        home: str | Path | None = None,
        round_: int | None = None,
        load_backbone: bool = True,
    ) -> "LandmarkPredictor":
        """A predictor from a folder written by :meth:`save_pretrained`, or from a run folder
        (``<home>/runs/<run_id>``) of any method in :data:`RUN_METHODS` (the engine methods' last
        finished checkpoint, ``round_`` for another round; the image-trained methods' last checkpoint).

        ``backbone`` overrides the recorded backbone spec (e.g. a local folder
        for a hub id); either way its identity must match. ``home`` resolves
        backbones trained in a workspace (default for a run: the run's workspace).
        ``load_backbone=False`` defers loading it to the first prediction.
        """
        from storage.run_models import is_run_dir

        path = Path(path)
        if (path / CONFIG_NAME).is_file():
            pred = cls._from_bundle(path, device)
        elif is_run_dir(path):
            pred = cls._from_run(path, device, round_)
            home = home if home is not None else path.resolve().parent.parent
        else:
            raise StoreError(
                "no model here: neither an exported model (predictor.json) nor a run folder (config.json)",
                where=str(path),
                fix="pass a run folder (<home>/runs/<run_id>), or a folder written by `uld export-model` / save_pretrained",
            )
        if round_ is not None and (path / CONFIG_NAME).is_file() and int(pred.source.get("round", -1)) != int(round_):
            raise ConfigError(f"the exported model is round {pred.source.get('round')}, not {round_}", where=str(path),
                              fix="drop the round, or export that round from its run")
        if backbone is not None:
            pred.set_backbone(backbone, home)
        elif load_backbone and pred.needs_backbone:
            pred.set_backbone(pred.backbone_ref.spec, home)
        pred._home = home  # for a lazy load of a backbone trained in that workspace
        return pred

    @classmethod
    def _from_bundle(cls, path: Path, device: str) -> "LandmarkPredictor":
        cfg = json.loads((path / CONFIG_NAME).read_text())
        if cfg.get("format") != FORMAT or int(cfg.get("format_version", -1)) != FORMAT_VERSION:
            raise StoreError(f"not a landmark model of format {FORMAT} v{FORMAT_VERSION}", where=str(path / CONFIG_NAME),
                             fix="export it again with this version (`uld export-model`)")
        # Bundles written before the part key: ZeroShot's or D-ULD's.
        name = str(cfg.get("part") or ("zeroshot" if cfg.get("method") == "zeroshot" else "heads"))
        if name not in PARTS:
            raise StoreError(f"unknown model part {name!r}", where=str(path / CONFIG_NAME),
                             fix=f"this version reads {', '.join(PARTS)}: update the project, or export the model again")
        recipe = None
        if "features" in cfg:
            projections: dict[str, np.ndarray] = {}
            if (path / PROJECTIONS_NAME).is_file():
                from safetensors.numpy import load_file

                projections = {k: np.asarray(v, np.float32) for k, v in load_file(str(path / PROJECTIONS_NAME)).items()}
            missing = sorted(set(cfg["features"].get("projected_layers", [])) - set(projections))
            if missing:
                raise StoreError(f"the model's projections of layers {missing} are missing", where=str(path / PROJECTIONS_NAME),
                                 fix="copy the whole model folder")
            recipe = FeatureRecipe.from_json(cfg["features"], projections)
        if "crop" in cfg:
            crop = CropRule(int(cfg["crop"]["size"]), float(cfg["crop"]["margin"]))
        elif recipe is not None:
            crop = CropRule(recipe.image_size, float(recipe.spec.crop_margin))
        else:
            raise StoreError("the model records neither its crop rule nor its features", where=str(path / CONFIG_NAME),
                             fix="export it again (`uld export-model`)")
        part = PARTS[name].load(path, str(cfg["method"]), cfg, device)
        return cls(part, crop, BackboneRef.from_json(cfg["backbone"]), recipe=recipe, source=cfg.get("source"), device=device)

    @classmethod
    def _from_run(cls, run_dir: Path, device: str, round_: int | None) -> "LandmarkPredictor":
        config = json.loads((run_dir / "config.json").read_text())
        method = str(config.get("method", ""))
        if method not in RUN_METHODS:
            raise StoreError(f"runs of method {method!r} have no trained model to predict with", where=str(run_dir / "config.json"),
                             fix=f"use a run of one of: {', '.join(RUN_METHODS)}")
        rp = RUN_METHODS[method].from_run(run_dir, config, round_, device)
        return cls(rp.part, rp.crop, rp.backbone_ref, recipe=rp.recipe, source=rp.source, device=device)

    # ---------------------------------------------------------- prediction
    def predict(self, images: Sequence[str | Path | ImageItem] | str | Path, *, batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
        """Landmarks of ``images`` (paths or :class:`ImageItem`), one row per (image, landmark), original pixels.

        Unreadable images are skipped; their reasons are in ``frame.attrs["skipped"]``
        (a list of dicts) and in :meth:`run`'s result.
        """
        res = self.run(images, batch_size=batch_size, progress=progress)
        res.frame.attrs["skipped"] = res.skipped.to_dict("records")
        return res.frame

    def run(self, images: Sequence[str | Path | ImageItem] | str | Path, *, batch_size: int = 16, progress: bool = True) -> PredictionResult:
        """:meth:`predict` with everything: the frame, the skipped images, crop-pixel landmarks and crop boxes.

        Streams: images are read, cropped (and, for a feature method, encoded) one backbone
        batch at a time, and the method part runs on ``batch_size`` images at a time, so
        memory is a batch whatever the number of images.
        """
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}", where="--batch-size", fix="use e.g. 16")
        items = [im if isinstance(im, ImageItem) else ImageItem(str(im), str(im)) for im in ([images] if isinstance(images, (str, Path)) else images)]
        skipped: list[dict[str, str]] = []
        parts: list[tuple[list[ImageItem], LandmarkSet, np.ndarray, np.ndarray]] = []
        buf: list[tuple[ImageItem, Any]] = []  # (item, (features, (crop box, object box, (w, h)), crop))
        reads_features = self.part.inputs == "features"

        def flush(n: int) -> None:
            items_n = [b[0] for b in buf[:n]]
            outs = [b[1] for b in buf[:n]]
            feats = {k: np.concatenate([o[0][k] for o in outs]) for k in self.recipe.keys} if reads_features else None
            boxes = np.stack([o[1][0] for o in outs])
            sizes = np.array([o[1][2] for o in outs])
            rois = object_rois(np.stack([o[1][1] for o in outs]), sizes, boxes, self.crop.size)
            batch = MethodBatch(np.stack([o[2] for o in outs]), feats, rois, np.array([it.noise_index for it in items_n], np.int64),
                                self.backbone if self.needs_backbone else None)
            parts.append((items_n, self.part.predict_batch(batch), boxes, sizes))
            del buf[:n]

        bar = tqdm(total=sum(it.keep for it in items), desc=f"predict {self.method}", unit="img", disable=not progress)
        for group in _encode_groups(items, batch_size):
            for item, out in zip(group, self._encode_group(group)):
                if isinstance(out, str):
                    if item.keep:
                        skipped.append({"image": item.path, "image_id": item.image_id, "reason": out})
                    continue
                if item.keep:
                    buf.append((item, out))
            while len(buf) >= batch_size:
                flush(batch_size)
            bar.update(sum(it.keep for it in group))
        if buf:
            flush(len(buf))
        bar.close()
        return self._result(parts, skipped)

    def _encode_group(self, group: list[ImageItem]) -> list[Any]:
        """Per item: ``(features, (crop box, object box, (w, h)), crop)`` or the reason it failed (a str).

        ``features`` is ``{}`` for a part that reads crops (no backbone call)."""
        from pipeline.datasets.crop import crop_boxes, crop_image
        from pipeline.datasets.folder import unlabelled_box
        from pipeline.datasets.images import read_image

        S = self.crop.size
        out: list[Any] = [None] * len(group)
        crops, ok, meta = [], [], {}
        for j, item in enumerate(group):
            try:
                image = read_image(item.path)
            except DatasetError as err:
                out[j] = err.what
                continue
            h, w = image.shape[:2]
            box = np.asarray(unlabelled_box(w, h) if item.box is None else item.box, np.float64)
            if not (np.isfinite(box).all() and box[2] > box[0] and box[3] > box[1]):
                out[j] = f"invalid object box {tuple(box)}"
                continue
            cbox = crop_boxes(box[None], self.crop.margin)[0]
            crops.append(crop_image(image, cbox, S))
            ok.append(j)
            meta[j] = (cbox, box.astype(np.float32), (w, h))
        if not ok:
            return out
        if self.part.inputs != "features":
            for n, j in enumerate(ok):
                out[j] = ({}, meta[j], crops[n])
            return out
        feats = encode_crops(self.backbone, np.stack(crops), self.recipe, [group[j].noise_index for j in ok])
        for n, j in enumerate(ok):
            one = {k: v[n : n + 1] for k, v in feats.items()}
            if not all(np.isfinite(v).all() for v in one.values()):
                out[j] = "features overflow float16 (|x| > 65504) or are NaN"  # as the store refuses them
                continue
            out[j] = (one, meta[j], crops[n])
        return out

    def _result(self, parts: list, skipped: list[dict[str, str]]) -> PredictionResult:
        from pipeline.datasets.crop import to_original

        K = self.k
        items = [it for p in parts for it in p[0]]
        lms = LandmarkSet.concat([p[1] for p in parts]) if parts else LandmarkSet.empty(0, K)
        boxes = np.concatenate([p[2] for p in parts]).astype(np.float32) if parts else np.zeros((0, 4), np.float32)
        sizes = np.concatenate([p[3] for p in parts]) if parts else np.zeros((0, 2), np.int64)
        n = len(items)
        xy = to_original(lms.coords, boxes, self.crop.size) if n else np.zeros((0, K, 2), np.float32)
        frame = pd.DataFrame(
            {
                "image": np.repeat(np.array([it.path for it in items], dtype=object), K),
                "image_id": np.repeat(np.array([it.image_id for it in items], dtype=object), K),
                "method": self.method,
                "landmark_id": np.tile(np.arange(K, dtype=np.int32), n),
                "x": xy[..., 0].reshape(-1),
                "y": xy[..., 1].reshape(-1),
                "score": lms.scores.reshape(-1),
                "present": lms.present.reshape(-1),
                "fallback": lms.fallback.reshape(-1),
                "width": np.repeat(sizes[:, 0].astype(np.int32), K) if n else np.zeros(0, np.int32),
                "height": np.repeat(sizes[:, 1].astype(np.int32), K) if n else np.zeros(0, np.int32),
                **{c: np.repeat(boxes[:, j], K) for j, c in enumerate(("crop_x0", "crop_y0", "crop_x1", "crop_y1"))},
            },
            columns=list(COLUMNS),
        )
        skipped_frame = pd.DataFrame(skipped, columns=["image", "image_id", "reason"])
        return PredictionResult(frame, skipped_frame, lms, boxes, [it.image_id for it in items])


def _encode_groups(items: list[ImageItem], batch_size: int) -> Iterator[list[ImageItem]]:
    """Backbone batches: consecutive items of one ``group``, or up to ``batch_size`` consecutive ungrouped ones."""
    cur: list[ImageItem] = []
    for item in items:
        if cur and (item.group != cur[-1].group or (item.group is None and len(cur) >= batch_size)):
            yield cur
            cur = []
        cur.append(item)
    if cur:
        yield cur
