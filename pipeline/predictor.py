"""Landmarks for new images with a trained method: a model directory a user can copy.

::

    from pipeline import LandmarkPredictor

    p = LandmarkPredictor.from_pretrained("workspace/runs/<run_id>")   # or an exported model folder
    df = p.predict(["a.jpg", "b.jpg"])                                 # one row per (image, landmark)

A :class:`LandmarkPredictor` bundles everything that turns an image into the
method's landmarks:

* the backbone reference: how to load it (``shipped``, a folder, a hub id) and
  its identity (weights hash, scheduler, ...); a backbone whose identity differs
  is refused, because the method's centroids / heads only mean something on
  the features they were trained on;
* the feature recipe: the :class:`FeatureSpec` (crop size, margin, timesteps,
  noise seed), the layers, and the fixed random projections of the store;
* the method: ZeroShot's centroids, or D-ULD's heads + the centroids of their
  last evaluation; and its RoI rule.

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

Directory layout written by :meth:`LandmarkPredictor.save_pretrained`::

    predictor.json          method, backbone reference + identity, feature recipe, RoI rule, provenance
    projections.safetensors fixed random projections per layer (only with reduce_channels)
    zeroshot/               ZeroShot: zeroshot_config.json + zeroshot_centroids.npy
    heads/                  D-ULD: config.json + model.safetensors (ULDHeads) and centroids.npy
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
FORMAT_VERSION = 1
METHODS = ("zeroshot", "duld")
#: The noise index of every new image (the store uses the image's row): see the module doc.
NEW_IMAGE_NOISE_INDEX = 0
#: Columns of a prediction frame (one row per image and landmark; x, y in original pixels).
COLUMNS = ("image", "image_id", "method", "landmark_id", "x", "y", "score", "present", "fallback",
           "width", "height", "crop_x0", "crop_y0", "crop_x1", "crop_y1")


# ------------------------------------------------------------------ parts of the bundle
@dataclass(frozen=True)
class BackboneRef:
    """How to load the backbone (``spec`` for :func:`load_backbone`) and what it must be (``identity``)."""

    spec: str
    name: str
    identity: dict[str, Any]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, backbone: "DiffusionBackbone", where: str) -> None:
        """Refuse a backbone whose identity is not the one the model was trained with."""
        # JSON round trip: identities read from disk have lists where fresh ones have tuples.
        have = json.loads(json.dumps(backbone.identity(), sort_keys=True, default=str))
        want = json.loads(json.dumps(self.identity, sort_keys=True, default=str))
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise BackboneError(
                f"backbone {backbone.name!r} is not the one this model was trained with (identity differs in {', '.join(diff)}; "
                f"weights {have.get('weights', '?')} here, {want.get('weights', '?')} expected)",
                where=where,
                fix=f"load the backbone the features were made with ({self.spec!r}, weights hash {want.get('weights', '?')}): "
                "pass it as backbone= / --backbone, or retrain the method on this backbone's features",
            )


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


# ------------------------------------------------------------------ the predictor
class LandmarkPredictor:
    """A trained landmark method with everything needed to run it on new images (see the module doc)."""

    def __init__(
        self,
        method: str,
        recipe: FeatureRecipe,
        backbone_ref: BackboneRef,
        *,
        zeroshot: Any = None,
        heads: Any = None,
        centers: np.ndarray | None = None,
        duld_config: Any = None,
        roi: str | bool = "box",
        source: dict[str, Any] | None = None,
        device: str = "cpu",
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}", where="LandmarkPredictor", fix=f"one of {', '.join(METHODS)}")
        if method == "zeroshot" and zeroshot is None:
            raise ConfigError("a ZeroShot predictor needs the fitted ZeroShot model", where="LandmarkPredictor")
        if method == "duld" and (heads is None or centers is None or duld_config is None):
            raise ConfigError("a D-ULD predictor needs heads, centroids and its DULDConfig", where="LandmarkPredictor")
        self.method = method
        self.recipe = recipe
        self.backbone_ref = backbone_ref
        self.zeroshot = zeroshot
        self.heads = heads
        self.centers = None if centers is None else np.asarray(centers, np.float32)
        self.duld_config = duld_config
        self.roi = roi
        self.source = dict(source or {})
        self.device = device
        self._backbone: DiffusionBackbone | None = None
        self._home: str | Path | None = None

    @property
    def k(self) -> int:
        return int(self.zeroshot.n_clusters) if self.method == "zeroshot" else int(len(self.centers))

    def __repr__(self) -> str:
        src = self.source.get("run_id", "?")
        return f"LandmarkPredictor(method={self.method!r}, k={self.k}, backbone={self.backbone_ref.spec!r}, crop={self.recipe.image_size}, run={src!r})"

    # ---------------------------------------------------------- backbone
    def set_backbone(self, backbone: "str | DiffusionBackbone", home: str | Path | None = None) -> "DiffusionBackbone":
        """Load (from a spec) or take ``backbone``; refuse it unless its identity is the model's."""
        if isinstance(backbone, str):
            from pipeline.backbones.loading import load_backbone

            try:
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
    def backbone(self) -> "DiffusionBackbone":
        if self._backbone is None:
            self.set_backbone(self.backbone_ref.spec, self._home)
        return self._backbone

    # ---------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the bundle (see the module doc) to ``directory``; load it with :meth:`from_pretrained`."""
        from storage.atomic import atomic_path, write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.recipe.projections:
            from safetensors.numpy import save_file

            with atomic_path(directory / PROJECTIONS_NAME) as tmp:
                save_file({k: np.ascontiguousarray(v, np.float32) for k, v in self.recipe.projections.items()}, str(tmp))
        if self.method == "zeroshot":
            self.zeroshot.save_pretrained(directory / ZEROSHOT_DIR)
        else:
            self.heads.save_pretrained(directory / HEADS_DIR)
            with atomic_path(directory / HEADS_DIR / CENTROIDS_NAME) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, self.centers)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "k": self.k,
            "roi": self.roi,
            "backbone": self.backbone_ref.to_json(),
            "features": self.recipe.to_json(),
            "source": self.source,
        }
        if self.method == "duld":
            config["duld"] = self.duld_config.to_json()
        write_json(directory / CONFIG_NAME, config)  # last: a folder without it is not a model
        return directory

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        backbone: "str | DiffusionBackbone | None" = None,
        device: str = "cpu",
        home: str | Path | None = None,
        round_: int | None = None,
        load_backbone: bool = True,
    ) -> "LandmarkPredictor":
        """A predictor from a folder written by :meth:`save_pretrained`, or from a run folder
        (``<home>/runs/<run_id>``: ZeroShot's centroids or D-ULD's last finished checkpoint,
        ``round_`` for another round).

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
        elif load_backbone:
            pred.set_backbone(pred.backbone_ref.spec, home)
        pred._home = home  # for a lazy load of a backbone trained in that workspace
        return pred

    @classmethod
    def _from_bundle(cls, path: Path, device: str) -> "LandmarkPredictor":
        cfg = json.loads((path / CONFIG_NAME).read_text())
        if cfg.get("format") != FORMAT or int(cfg.get("format_version", -1)) != FORMAT_VERSION:
            raise StoreError(f"not a landmark model of format {FORMAT} v{FORMAT_VERSION}", where=str(path / CONFIG_NAME),
                             fix="export it again with this version (`uld export-model`)")
        projections: dict[str, np.ndarray] = {}
        if (path / PROJECTIONS_NAME).is_file():
            from safetensors.numpy import load_file

            projections = {k: np.asarray(v, np.float32) for k, v in load_file(str(path / PROJECTIONS_NAME)).items()}
        missing = sorted(set(cfg["features"].get("projected_layers", [])) - set(projections))
        if missing:
            raise StoreError(f"the model's projections of layers {missing} are missing", where=str(path / PROJECTIONS_NAME),
                             fix="copy the whole model folder")
        recipe = FeatureRecipe.from_json(cfg["features"], projections)
        ref = BackboneRef(**cfg["backbone"])
        common = dict(roi=cfg.get("roi", "box"), source=cfg.get("source"), device=device)
        if cfg["method"] == "zeroshot":
            from pipeline.methods.zeroshot import ZeroShot

            return cls("zeroshot", recipe, ref, zeroshot=ZeroShot.from_pretrained(path / ZEROSHOT_DIR), **common)
        from pipeline.heads.model import ULDHeads
        from pipeline.methods.duld import DULDConfig

        centroids = path / HEADS_DIR / CENTROIDS_NAME
        if not centroids.is_file():
            raise StoreError("the D-ULD model has no centroids", where=str(centroids), fix="copy the whole model folder")
        return cls("duld", recipe, ref, heads=ULDHeads.from_pretrained(path / HEADS_DIR), centers=np.load(centroids),
                   duld_config=DULDConfig.from_json(cfg["duld"]), **common)

    @classmethod
    def _from_run(cls, run_dir: Path, device: str, round_: int | None) -> "LandmarkPredictor":
        from storage.run_models import CENTROIDS_NAME as RUN_CENTROIDS
        from storage.run_models import locate_run_model, read_store_recipe

        rm = locate_run_model(run_dir, round_)
        sr = read_store_recipe(rm.store_path)
        recipe = FeatureRecipe(
            spec=spec_from_json(sr.spec), layers=tuple(sr.layers), keys=tuple(sr.keys), shapes=sr.shapes, projections=sr.projections,
            store_config_hash=sr.config_hash, shard_size=sr.shard_size, extraction_batch_size=sr.extraction_batch_size,
        )
        # The backbone as the run was given it (a workspace name, folder or hub id); identity from the store.
        ref = BackboneRef(spec=str(rm.config.get("backbone") or sr.backbone_name), name=sr.backbone_name, identity=sr.backbone_identity)
        source = {"run_id": rm.run_id, "dataset": rm.config.get("dataset"), "stage": rm.stage, "round": rm.round}
        if rm.method == "zeroshot":
            from pipeline.methods.zeroshot import ZeroShot

            model = ZeroShot.from_pretrained(rm.model_dir)
            if model.crop_size != recipe.image_size:
                raise StoreError(f"ZeroShot crop size {model.crop_size} differs from its store's {recipe.image_size}", where=str(rm.model_dir))
            return cls("zeroshot", recipe, ref, zeroshot=model, roi=str(rm.config.get("roi", "box")), source=source, device=device)
        from pipeline.heads.model import ULDHeads
        from pipeline.methods.duld import DULDConfig

        heads = ULDHeads.from_pretrained(rm.model_dir)
        if tuple(heads.config.feature_keys) != tuple(sorted(recipe.keys)):
            raise StoreError(f"the heads read {heads.config.feature_keys}, the store holds {recipe.keys}", where=str(rm.model_dir))
        return cls("duld", recipe, ref, heads=heads, centers=np.load(rm.model_dir / RUN_CENTROIDS),
                   duld_config=DULDConfig.from_json(rm.config["duld"]), roi=bool(rm.config.get("roi", True)), source=source, device=device)

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

        Streams: images are read, cropped and encoded one backbone batch at a
        time, and the method runs on ``batch_size`` images at a time, so memory
        is a batch whatever the number of images.
        """
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}", where="--batch-size", fix="use e.g. 16")
        items = [im if isinstance(im, ImageItem) else ImageItem(str(im), str(im)) for im in ([images] if isinstance(images, (str, Path)) else images)]
        skipped: list[dict[str, str]] = []
        parts: list[tuple[list[ImageItem], LandmarkSet, np.ndarray, np.ndarray]] = []
        buf_items: list[ImageItem] = []
        buf_feats: list[dict[str, np.ndarray]] = []
        buf_meta: list[tuple[np.ndarray, np.ndarray, tuple[int, int]]] = []  # (crop box, object box, (w, h))

        def flush(n: int) -> None:
            feats = {k: np.concatenate([f[k] for f in buf_feats[:n]]) for k in self.recipe.keys}
            crops = np.stack([m[0] for m in buf_meta[:n]])
            rois = object_rois(np.stack([m[1] for m in buf_meta[:n]]), np.array([m[2] for m in buf_meta[:n]]), crops, self.recipe.image_size)
            parts.append((buf_items[:n], self._predict_batch(feats, rois), crops, np.array([m[2] for m in buf_meta[:n]])))
            del buf_items[:n], buf_feats[:n], buf_meta[:n]

        bar = tqdm(total=sum(it.keep for it in items), desc=f"predict {self.method}", unit="img", disable=not progress)
        for group in _encode_groups(items, batch_size):
            for item, out in zip(group, self._encode_group(group)):
                if isinstance(out, str):
                    if item.keep:
                        skipped.append({"image": item.path, "image_id": item.image_id, "reason": out})
                    continue
                if item.keep:
                    feats, meta = out
                    buf_items.append(item)
                    buf_feats.append(feats)
                    buf_meta.append(meta)
            while len(buf_items) >= batch_size:
                flush(batch_size)
            bar.update(sum(it.keep for it in group))
        if buf_items:
            flush(len(buf_items))
        bar.close()
        return self._result(parts, skipped)

    def _encode_group(self, group: list[ImageItem]) -> list[Any]:
        """Per item: ``(features, (crop box, object box, (w, h)))`` or the reason it failed (a str)."""
        from pipeline.datasets.crop import crop_boxes, crop_image
        from pipeline.datasets.folder import unlabelled_box
        from pipeline.datasets.images import read_image

        S = self.recipe.image_size
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
            cbox = crop_boxes(box[None], self.recipe.spec.crop_margin)[0]
            crops.append(crop_image(image, cbox, S))
            ok.append(j)
            meta[j] = (cbox, box.astype(np.float32), (w, h))
        if ok:
            feats = encode_crops(self.backbone, np.stack(crops), self.recipe, [group[j].noise_index for j in ok])
            for n, j in enumerate(ok):
                one = {k: v[n : n + 1] for k, v in feats.items()}
                if not all(np.isfinite(v).all() for v in one.values()):
                    out[j] = "features overflow float16 (|x| > 65504) or are NaN"  # as the store refuses them
                    continue
                out[j] = (one, meta[j])
        return out

    def _predict_batch(self, feats: dict[str, np.ndarray], rois: np.ndarray) -> LandmarkSet:
        """The method on one batch of stored-form features; landmarks in crop pixels."""
        if self.method == "zeroshot":
            # (With n_test_samples set, ZeroShot draws each image's pixels from its position in
            # the batch; runs default to every RoI pixel, which does not depend on it.)
            masks = None
            if self.roi == "foreground":
                from pipeline.methods.foreground import foreground_masks

                masks = foreground_masks([feats])
            elif self.roi != "box":
                raise ConfigError(f"unknown RoI rule {self.roi!r}", where="predictor.json roi", fix="use 'box' or 'foreground'")
            return self.zeroshot.predict([feats], rois, progress=False, masks=masks)
        import torch

        from pipeline.methods.duld import predict_landmarks

        n = len(rois)
        batch = {"index": torch.arange(n), "features": {k: torch.from_numpy(v.astype(np.float32)) for k, v in feats.items()}}
        # Float32 from float16, as the store's loader hands features to the heads.
        pred = predict_landmarks(self.heads, [batch], self.centers, self.duld_config, progress=False, rois=rois if self.roi else None)
        return pred.landmarks

    def _result(self, parts: list, skipped: list[dict[str, str]]) -> PredictionResult:
        from pipeline.datasets.crop import to_original

        K = self.k
        items = [it for p in parts for it in p[0]]
        lms = LandmarkSet.concat([p[1] for p in parts]) if parts else LandmarkSet.empty(0, K)
        boxes = np.concatenate([p[2] for p in parts]).astype(np.float32) if parts else np.zeros((0, 4), np.float32)
        sizes = np.concatenate([p[3] for p in parts]) if parts else np.zeros((0, 2), np.int64)
        n = len(items)
        xy = to_original(lms.coords, boxes, self.recipe.image_size) if n else np.zeros((0, K, 2), np.float32)
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
