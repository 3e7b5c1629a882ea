"""D-ULD training and inference on cached hyperfeatures (paper 001, Sec 3.2).

Algorithm only: batches of cached feature maps in, tensors / arrays out. The
Prefect flow (``flows/duld.py``) wires these to the feature store, the run
directory and the evaluator.

Stages
------
1. :func:`train_bootstrap` -- SiLK-style keypoint learning between a crop and
   an augmented view of it (Sec 3.2: "correspondences between an image and
   its augmentation"): the view's features come from the backbone run on the
   rendered augmented image (a view store, ``pipeline.datasets.augment_views``),
   and the stored affine gives the exact dense correspondence. Matching NLL
   for descriptors, BCE on "matching succeeds here" for the detector. Without
   a view store (``DULDConfig.views = None``) the older shortcut warps the
   cached maps instead (``pipeline.heads.augment``), which needs no invariance
   from the descriptor and is kept only for comparison.
2. Each self-training round:
   :func:`extract_keypoints` (NMS + descriptors on all train crops) ->
   a pseudo-labeller (``pipeline.labelling``: ``KMeansLabeller`` = FAISS
   k-means into K clusters for D-ULD, ``OverClusterLabeller`` = K clusters
   over-segmented into M training labels for Mallis (D)) -> exemplar
   assignment (<= one keypoint per image and training label) ->
   :func:`train_self_round` (detector MSE to Gaussian pseudo-label heatmaps,
   contrastive descriptor loss with margin m over the training labels, on the
   same crop / view pairs) -> :func:`predict_landmarks` (K landmarks per image
   for evaluation, from the labeller's K ``landmark_centers_``).

Paper settings (SD features, GPU): Adam lr 1e-4, betas (0.9, 0.999), batch 12,
bootstrap 50k iterations, re-cluster every 5k of 100k iterations, m = 0.8.
The defaults below are CPU-sized (hundreds of steps) for 64 px crops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from pipeline.clustering import nearest_centroid
from pipeline.datasets.augment_views import ViewAugmentConfig
from pipeline.errors import ConfigError
from pipeline.heads.augment import (
    AugmentConfig,
    dense_correspondence,
    random_affine,
    valid_mask,
    warp_features,
    warp_points,
)
from pipeline.heads.descriptor import crop_to_normalised, sample_descriptors
from pipeline.heads.detector import local_maxima, nms_keypoints, refine_subcell
from pipeline.heads.losses import (
    bce_detector_loss,
    contrastive_loss,
    heatmap_targets,
    matching_nll,
    mse_heatmap_loss,
    silk_detector_targets,
)
from pipeline.heads.model import ULDHeads, ULDHeadsConfig
# base and kmeans, not the package: pipeline.labelling's __init__ imports labellers that import this module
from pipeline.labelling.base import KeypointSet, PseudoLabels, exemplar_labels
from pipeline.labelling.kmeans import KMeansLabeller
from pipeline.methods.exemplar import exemplar_assign
from pipeline.methods.landmarks import LandmarkSet, roi_cell_mask

# {"index": LongTensor (B,), "features": {key: float32 (B, C, h, w)}}, and with a view store also
# "view_features" (same keys: one augmented view per crop), "view_affine" (B, 2, 3) normalised
# coordinates crop -> view, "view_flip" (B,) bool (see storage.augmented_features.attach_views).
Batch = dict


@dataclass(frozen=True)
class DULDConfig:
    """Training and inference hyper-parameters (CPU-sized defaults; paper values in comments)."""

    k: int = 10
    lr: float = 1e-3  # paper 1e-4 over 150k iterations; 1e-3 for a few hundred CPU steps
    batch_size: int = 12  # paper 12
    bootstrap_steps: int = 300  # paper 50k
    steps_per_round: int = 150  # paper 5k (re-cluster every 5k of 100k)
    temperature: float = 0.1  # matching NLL softmax temperature
    silk_tol: int = 1  # cells: a match within tol of the true cell counts as correct
    detector_weight: float = 1.0
    margin: float = 0.8  # contrastive margin m (paper)
    match_weight: float = 0.5  # keep the bootstrap matching loss during self-training (0 = paper's losses only)
    sigma: float = 1.0  # Gaussian pseudo-label heatmaps, in map cells
    top_k: int = 30  # keypoints per image fed to k-means
    # 0 = no suppression: the top_k strongest cells of the RoI are the keypoints, as SiLK's dense
    # keypoints are (paper 001, Sec 3.2: exemplar assignment leaves K keypoints *per image*). With
    # radius 1 a smooth 16x16 heatmap has ~5 local maxima per crop, so half the K pseudo-labels were
    # missing in every image and the detector learned to fire on ~5 parts (bench/results/duld_engine.md).
    nms_radius: int = 0
    # The k-means (pseudo-labeller fit) reads only the keypoints that are local maxima of their
    # (2r+1)^2 cells; the exemplar assignment still picks among all top_k keypoints. 0 = fit on
    # every keypoint. Dense top-k cells crowd around the strongest part (8 of 10 MTFL centroids
    # in the eye band), while the maxima give each part the detector fires on about one keypoint
    # per image. Off by default: with r = 1 and top_k 60 MTFL gains (forward 8.22 -> 7.72,
    # Hungarian 0.35 -> 0.58, 3 seeds) but the synthetic heads lose (forward 5.51 -> 7.62 at
    # top_k 30); bench/results/faces.md. The face backbone records r = 1, top_k 60 for D-ULD
    # (method_defaults in its uld_backbone.json, read by flows.duld.detector_gates).
    cluster_nms_radius: int = 0
    threshold: float = 0.0  # absolute heatmap (sigmoid) floor for keypoints, see nms_keypoints
    relative_threshold: float = 0.0  # keep maxima >= this fraction of the image's strongest one
    fallback_temperature: float = 0.5  # see predict_landmarks
    kmeans_n_init: int = 3
    kmeans_max_iter: int = 50
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # feature warps (only without views)
    views: ViewAugmentConfig | None = field(default_factory=ViewAugmentConfig)  # None = warp cached maps

    def __post_init__(self) -> None:
        for name in ("k", "batch_size", "top_k"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}", where=f"--{name.replace('_', '-')}")
        for name in ("bootstrap_steps", "steps_per_round", "nms_radius", "cluster_nms_radius"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0", where=f"--{name.replace('_', '-')}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}", where="--lr")
        if not 0 < self.margin <= 2:
            raise ConfigError(f"margin must be in (0, 2] for unit descriptors, got {self.margin}", where="margin")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "DULDConfig":
        d = dict(d)
        aug = d.pop("augment", None)
        if aug is not None:
            aug = dict(aug)
            aug["scale_range"] = tuple(aug["scale_range"])
            d["augment"] = AugmentConfig(**aug)
        if d.get("views") is not None:
            d["views"] = ViewAugmentConfig.from_json(d["views"])
        return cls(**d)


def make_optimizer(model: ULDHeads, lr: float) -> torch.optim.Optimizer:
    """Adam with the paper's betas."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))


# --------------------------------------------------------------------------- training


def _steps(batches: Iterator[Batch], steps: int, desc: str, progress: bool) -> Iterator[tuple[int, Batch]]:
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        try:
            batch = next(batches)
        except StopIteration:
            raise ConfigError(
                "the batch iterator ran dry before the requested number of steps",
                where=desc,
                fix="pass an endless iterator (see flows.duld.endless_batches)",
            ) from None
        yield step, batch


def second_view(
    batch: Batch, config: DULDConfig, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The second view of a batch: ``(affine (B, 2, 3) normalised, its features, flip (B,))``.

    With a view store the batch carries one augmented view per crop (features of
    the augmented *image*, its exact transform); otherwise the cached maps are
    warped (the shortcut, see ``pipeline.heads.augment``).
    """
    features = batch["features"]
    B = next(iter(features.values())).shape[0]
    if "view_features" in batch:
        return batch["view_affine"].float(), batch["view_features"], batch["view_flip"].bool()
    if config.views is not None:
        raise ConfigError(
            "D-ULD is configured to learn from augmented views but the batch has none",
            where="DULDConfig.views",
            fix="pair the batches with their view store (storage.augmented_features.attach_views), or set views=None",
        )
    affine = random_affine(B, config.augment, generator)
    return affine, warp_features(features, affine), torch.zeros(B, dtype=torch.bool)


def bootstrap_step(model: ULDHeads, batch: Batch, config: DULDConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Losses of one bootstrapping step (view A = the crop, view B = its augmented view)."""
    R = model.config.out_size
    affine, view_feats, _ = second_view(batch, config, generator)
    out_a = model(batch["features"])
    out_b = model(view_feats)
    # For each cell of B, its cell in A. A flipped view keeps its geometric correspondence:
    # the crop's left eye matches the mirrored position (see ViewAugmentConfig.flip).
    corr = dense_correspondence(affine, R)
    l_desc = matching_nll(out_a.descriptors, out_b.descriptors, corr, config.temperature)
    t_a, m_a, t_b, m_b = silk_detector_targets(out_a.descriptors.detach(), out_b.descriptors.detach(), corr, config.silk_tol)
    l_det = bce_detector_loss(out_a.logits, t_a, m_a) + bce_detector_loss(out_b.logits, t_b, m_b)
    loss = l_desc + config.detector_weight * l_det
    return {"loss": loss, "descriptor": l_desc, "detector": l_det, "positive_rate": t_b[m_b].mean() if m_b.any() else torch.tensor(0.0)}


def train_bootstrap(
    model: ULDHeads,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    steps: int,
    config: DULDConfig,
    generator: torch.Generator,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Bootstrap the heads for ``steps`` steps; returns one loss record per step."""
    model.train()
    log: list[dict[str, float]] = []
    for step, batch in _steps(batches, steps, "bootstrap", progress):
        losses = bootstrap_step(model, batch, config, generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        log.append({"step": step, **{k: float(v.detach()) for k, v in losses.items()}})
    return log


def self_training_step(
    model: ULDHeads,
    batch: Batch,
    coords: torch.Tensor,
    present: torch.Tensor,
    config: DULDConfig,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Losses of one self-training step on a batch with pseudo-labels (coords in crop px).

    ``coords`` (B, L, 2) / ``present`` (B, L): column ``c`` is training label ``c``
    (L = K for D-ULD, M for Mallis (D)); the contrastive term has L classes and
    the detector target is the max over all L Gaussians.
    The pseudo-labels of the crop are carried into its second view by the
    view's transform. A *flipped* view keeps them for the detector (a landmark
    is a landmark wherever it moved), but not for the descriptor terms: its
    mirrored left eye looks like a right eye, and giving it the left eye's
    cluster would teach left = right (Mallis et al. swap such labels with a
    flip correspondence of the clusters instead; here they are left out).
    """
    features = batch["features"]
    B, L = present.shape
    R, S = model.config.out_size, model.config.crop_size
    affine, view_feats, flip = second_view(batch, config, generator)
    out_a = model(features)
    out_b = model(view_feats)
    pts_a = crop_to_normalised(coords, S)
    pts_b = warp_points(pts_a, affine)
    # a pseudo-label warped out of view is no longer a label of view B
    present_b = present & (pts_b.abs() < 1.0).all(-1)
    inside_b = valid_mask(affine, R)
    l_det = mse_heatmap_loss(out_a.logits, heatmap_targets(pts_a, present, R, config.sigma)) + mse_heatmap_loss(
        out_b.logits, heatmap_targets(pts_b, present_b, R, config.sigma), inside_b
    )
    d_a = sample_descriptors(out_a.descriptors, pts_a)  # (B, K, D)
    d_b = sample_descriptors(out_b.descriptors, pts_b)
    labels = torch.arange(L).expand(B, L)
    desc_b = present_b & ~flip[:, None]
    desc = torch.cat([d_a[present], d_b[desc_b]])
    lab = torch.cat([labels[present], labels[desc_b]])
    l_con = contrastive_loss(desc, lab, config.margin)
    loss = config.detector_weight * l_det + l_con
    out = {"detector": l_det, "contrastive": l_con}
    if config.match_weight > 0:
        corr = dense_correspondence(affine, R)
        corr = torch.where(flip[:, None], torch.full_like(corr, -1), corr)  # same reason as above
        l_match = matching_nll(out_a.descriptors, out_b.descriptors, corr, config.temperature)
        loss = loss + config.match_weight * l_match
        out["matching"] = l_match
    return {"loss": loss, **out}


def train_self_round(
    model: ULDHeads,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    labels: PseudoLabels,
    steps: int,
    config: DULDConfig,
    generator: torch.Generator,
    progress: bool = True,
    desc: str = "self-training",
) -> list[dict[str, float]]:
    """Train the heads on pseudo-labels for ``steps`` steps; one loss record per step."""
    model.train()
    log: list[dict[str, float]] = []
    for step, batch in _steps(batches, steps, desc, progress):
        coords, present = labels.lookup(batch["index"])
        losses = self_training_step(model, batch, coords, present, config, generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        log.append({"step": step, **{k: float(v.detach()) for k, v in losses.items()}})
    return log


# --------------------------------------------------------------------------- inference


def _cells_to_crop(xy_cells: torch.Tensor, R: int, S: int) -> torch.Tensor:
    return (xy_cells + 0.5) * (S / R)


@torch.no_grad()
def _detect(model: ULDHeads, features: dict[str, torch.Tensor], config: DULDConfig, rois: np.ndarray | None = None):
    out = model(features)
    heat = torch.sigmoid(out.logits)
    R, S = model.config.out_size, model.config.crop_size
    mask = roi_cell_mask(rois, heat.shape[0], R, S)
    if mask is not None:
        # keypoints only inside the object RoI (as ZeroShot samples only RoI pixels)
        heat = heat * mask[:, None].to(heat.dtype)
    kp = nms_keypoints(heat, config.nms_radius, config.top_k, config.threshold, config.relative_threshold)
    # descriptors at the peak cell; position refined to sub-cell precision
    pts = (2.0 * kp.xy + 1.0) / R - 1.0
    desc = sample_descriptors(out.descriptors, pts)
    return out, heat, kp, _cells_to_crop(refine_subcell(heat, kp.xy), R, S), desc


def _batch_rois(rois: np.ndarray | None, batch: Batch) -> np.ndarray | None:
    return None if rois is None else np.asarray(rois)[batch["index"].numpy()]


@torch.no_grad()
def extract_keypoints(
    model: ULDHeads, batches: Iterable[Batch], config: DULDConfig, progress: bool = True, rois: np.ndarray | None = None
) -> KeypointSet:
    """NMS keypoints (top ``config.top_k`` per image) and their descriptors for every image of ``batches``.

    ``rois``: optional (n_store_rows, 4) RoI boxes in crop px indexed by store row; keypoints are
    then restricted to each image's RoI.
    """
    from tqdm.auto import tqdm

    model.eval()
    rows, xy, score, desc, peak = [], [], [], [], []
    for batch in tqdm(batches, desc="keypoints", disable=not progress, leave=False):
        _, heat, kp, crop_xy, d = _detect(model, batch["features"], config, _batch_rois(rois, batch))
        v = kp.valid
        rows.append(batch["index"][:, None].expand_as(v)[v].numpy())
        xy.append(crop_xy[v].numpy())
        score.append(kp.score[v].numpy())
        desc.append(d[v].numpy())
        if config.cluster_nms_radius > 0:
            peak.append(local_maxima(heat, kp.xy, config.cluster_nms_radius)[v].numpy())
    D = model.config.descriptor_dim
    if not rows:
        return KeypointSet(np.zeros(0, np.int64), np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros((0, D), np.float32))
    return KeypointSet(
        np.concatenate(rows).astype(np.int64),
        np.concatenate(xy).astype(np.float32),
        np.concatenate(score).astype(np.float32),
        np.concatenate(desc).astype(np.float32),
        np.concatenate(peak).astype(bool) if peak else None,
    )


def cluster_keypoints(keypoints: KeypointSet, config: DULDConfig, seed: int) -> KMeansLabeller:
    """D-ULD's k-means of the keypoint descriptors: a fitted :class:`KMeansLabeller` (``cluster_centers_``)."""
    return KMeansLabeller(config.k, config.kmeans_n_init, config.kmeans_max_iter).fit(keypoints.peaks(), np.unique(keypoints.rows), seed)


# Exemplar assignment of keypoints to given centroids (the old name; the engine uses the labellers).
pseudo_labels = exemplar_labels


@dataclass
class Prediction:
    """K landmarks per image plus which came from the fallback (cluster absent among keypoints)."""

    rows: np.ndarray
    landmarks: LandmarkSet
    fallback: np.ndarray  # (N, K) bool


@torch.no_grad()
def predict_landmarks(
    model: ULDHeads,
    batches: Iterable[Batch],
    centers: np.ndarray,
    config: DULDConfig,
    progress: bool = True,
    rois: np.ndarray | None = None,
    image_centers: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Prediction:
    """K landmarks per image (crop pixels).

    Per cluster, the detected keypoint whose descriptor is nearest the
    centroid (exemplar assignment over the image's NMS keypoints). When no
    keypoint of the image falls in a cluster, the fallback picks the cell
    maximising ``heat(x) * exp(-||f(x) - c||^2 / fallback_temperature)`` over
    the whole map (the heatmap-weighted best match of the centroid); those
    entries are flagged in ``fallback`` and still count as present, so every
    image has K coordinates for the regressors. ``rois`` restricts both to the RoI
    (see :func:`extract_keypoints`).

    ``image_centers``: per-image centroids instead of the shared ``centers`` (K, D): called
    with a batch's store rows, returns (B, K, D). D-ULD++ reads its K landmarks this way:
    each image with its pose cluster's stage-2 centroids in identity order (paper 001,
    Sec 3.3.2; ``TwoStageLabeller.identity_centers``). ``centers`` still gives K.
    """
    from tqdm.auto import tqdm

    model.eval()
    k = len(centers)
    C = torch.from_numpy(np.asarray(centers, np.float32))
    R, S = model.config.out_size, model.config.crop_size
    all_rows, coords, scores, fallback = [], [], [], []
    for batch in tqdm(batches, desc="predict", disable=not progress, leave=False):
        out, heat, kp, crop_xy, d = _detect(model, batch["features"], config, _batch_rois(rois, batch))
        B, T = kp.valid.shape
        v = kp.valid.numpy()
        flat_desc = d.reshape(B * T, -1).numpy()
        Cb = None if image_centers is None else torch.from_numpy(np.asarray(image_centers(batch["index"].numpy()), np.float32))
        if Cb is None:
            lab, sq = nearest_centroid(flat_desc, C.numpy(), use_gpu=False)
        else:  # every image against its own K centroids
            dk = (d.reshape(B, T, 1, -1) - Cb[:, None]).pow(2).sum(-1)  # (B, T, K)
            sq_t, lab_t = dk.min(-1)
            lab, sq = lab_t.reshape(-1).numpy(), sq_t.reshape(-1).numpy()
        img = np.repeat(np.arange(B), T)
        keep = v.reshape(-1)
        sel = np.flatnonzero(keep)
        assign = exemplar_assign(img[sel], lab[sel], sq[sel], B, k)  # index into sel
        found = assign >= 0
        pick = sel[np.where(found, assign, 0)] if len(sel) else np.zeros_like(assign)
        xy = crop_xy.reshape(B * T, 2).numpy()[pick]
        sc = kp.score.reshape(-1).numpy()[pick]
        # fallback for absent clusters: dense heatmap-weighted centroid match
        dense = out.descriptors.flatten(2).transpose(1, 2)  # (B, R*R, D)
        if Cb is None:
            d2 = (dense.pow(2).sum(-1, keepdim=True) + C.pow(2).sum(-1) - 2 * dense @ C.T).clamp_min(0)  # (B, R*R, K)
        else:
            d2 = (dense.pow(2).sum(-1, keepdim=True) + Cb.pow(2).sum(-1)[:, None, :] - 2 * dense @ Cb.transpose(1, 2)).clamp_min(0)
        w = heat.flatten(1)[:, :, None] * torch.exp(-d2 / config.fallback_temperature)
        best = w.argmax(1)  # (B, K)
        cells = torch.stack([best % R, torch.div(best, R, rounding_mode="floor")], -1).float()
        fb_xy = _cells_to_crop(refine_subcell(heat, cells), R, S).numpy()
        fb_sc = torch.gather(heat.flatten(1), 1, best).numpy()
        xy = np.where(found[..., None], xy, fb_xy)
        sc = np.where(found, sc, fb_sc)
        all_rows.append(batch["index"].numpy())
        coords.append(xy)
        scores.append(sc)
        fallback.append(~found)
    rows = np.concatenate(all_rows).astype(np.int64)
    co = np.concatenate(coords).astype(np.float32)
    fb = np.concatenate(fallback)
    return Prediction(
        rows=rows,
        landmarks=LandmarkSet(co, np.ones(co.shape[:2], bool), np.concatenate(scores), fallback=fb),
        fallback=fb,
    )


def seeded_generator(seed: int, stage: str, round_: int) -> torch.Generator:
    """A generator for one stage/round, independent of what ran before (so a resumed run matches)."""
    mix = np.random.SeedSequence([int(seed), sum(map(ord, stage)), int(round_)]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(mix))


def build_model(config: ULDHeadsConfig, seed: int) -> ULDHeads:
    """Build the heads with a fixed initialisation seed (does not disturb the global RNG)."""
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        return ULDHeads(config)
