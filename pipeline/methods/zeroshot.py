"""ZeroShot landmarks from frozen diffusion hyperfeatures (001, Sec 3.1).

Training-free: describe pixels with the backbone's hyperfeatures, k-means the
descriptors of random RoI pixels of the training images into K centroids, and
at test time label RoI pixels with their nearest centroid and keep, per image
and cluster, the pixel nearest the centroid (exemplar assignment).

Descriptor (our training-free stand-in for the learned aggregator of Eq. 2):
for every feature key (layer x timestep), in sorted key order,

1. optionally apply a fixed seeded Gaussian random projection to ``proj_dim``
   channels (Johnson-Lindenstrauss: keeps distances, bounds the dimension for
   wide backbones such as SD 1.5 whose up-blocks have 320-1280 channels);
2. bilinearly interpolate the map at the query pixel centres (exactly what
   ``interpolate(..., align_corners=False)`` to the crop size followed by
   indexing would give, without materialising the full-resolution map);
3. L2-normalise the channel vector at each pixel (layers differ in scale by
   orders of magnitude; without this the largest-norm layer decides alone);
4. concatenate the keys and scale by ``1/sqrt(n_keys)``.

The result has unit norm and ``||a - b||^2 = 2 - 2 * mean_over_keys(cos_key)``:
k-means on it is k-means on the *equally weighted average* of the per-layer,
per-timestep cosine similarities -- the "equal mixing weights" of the
hyperfeature aggregator without its learned bottlenecks. Concatenation rather
than summing keeps layers from interfering through shared channels.

Sampling: ``fit`` draws ``n_samples_per_image`` distinct random pixels inside
each training image's RoI (seeded per image, so the sample does not depend on
the batch size); ``predict`` uses *every* RoI pixel by default
(``n_test_samples=None``), which makes the prediction deterministic and the
exemplar the best pixel of the whole RoI; an int draws that many random RoI
pixels per test image instead (the paper's setting, cheaper on big crops).
"""

from __future__ import annotations

import json
import functools
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline.clustering.kmeans import FaissKMeans, centroid_index, nearest_centroid
from pipeline.clustering.selection import cluster_spread, select_compact
from pipeline.errors import ConfigError, StoreError
from pipeline.methods.exemplar import exemplar_assign
from pipeline.methods.foreground import mask_lookup
from pipeline.methods.landmarks import LandmarkSet
from storage.atomic import atomic_path, write_json

FeatureBatch = Mapping[str, Any]  # key -> (B, C, h, w) numpy or torch


# ------------------------------------------------------------ descriptors
@functools.lru_cache(maxsize=256)
def projection_matrix(key: str, c_in: int, c_out: int, seed: int) -> np.ndarray:
    """Fixed Gaussian projection (c_out, c_in) for feature ``key``; N(0, 1/c_out) entries.

    Cached: it is drawn once per (key, shape, seed), not once per batch (callers must
    not modify the returned array)."""
    rng = np.random.default_rng([int(seed), zlib.crc32(key.encode())])
    return (rng.standard_normal((c_out, c_in)) / np.sqrt(c_out)).astype(np.float32)


def _as_tensor(a: Any) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.float()
    arr = np.asarray(a)
    if not arr.flags.writeable:  # torch refuses (warns on) read-only buffers
        arr = arr.copy()
    return torch.from_numpy(arr).float()


def _project(t: torch.Tensor, key: str, proj_dim: int | None, seed: int) -> torch.Tensor:
    if proj_dim is None or proj_dim >= t.shape[1]:
        return t
    P = torch.from_numpy(projection_matrix(key, t.shape[1], proj_dim, seed)).to(t.device)
    return torch.einsum("oc,bchw->bohw", P, t)


def descriptor_dim(shapes: Mapping[str, tuple[int, ...]], proj_dim: int | None = None) -> int:
    """D of the descriptor for feature maps of the given (C, h, w) shapes."""
    return int(sum(min(s[0], proj_dim) if proj_dim else s[0] for s in shapes.values()))


def describe_points(
    features: FeatureBatch, points: np.ndarray, crop_size: int, proj_dim: int | None = None, seed: int = 0
) -> np.ndarray:
    """Descriptors (B, P, D) float32 at ``points`` (B, P, 2) given in crop pixels (x, y).

    See the module docstring for the construction. Points are continuous
    crop coordinates: the centre of crop pixel (i, j) is (j + 0.5, i + 0.5).
    """
    keys = sorted(features)
    if not keys:
        raise ConfigError("no feature maps given", where="describe_points")
    pts = torch.from_numpy(np.array(points, dtype=np.float32))  # a copy: callers may pass read-only views
    if pts.ndim != 3 or pts.shape[-1] != 2:
        raise ConfigError(f"points must be (B, P, 2), got {tuple(pts.shape)}", where="describe_points")
    # grid_sample's normalised coordinates with align_corners=False: -1 and 1 are the outer pixel edges.
    grid = (pts / float(crop_size) * 2.0 - 1.0)[:, :, None, :]  # (B, P, 1, 2)
    parts = []
    for key in keys:
        t = _project(_as_tensor(features[key]), key, proj_dim, seed)
        if t.ndim != 4 or t.shape[0] != pts.shape[0]:
            raise ConfigError(f"feature {key!r} has shape {tuple(t.shape)}; expected ({pts.shape[0]}, C, h, w)", where="describe_points")
        s = F.grid_sample(t, grid.to(t.device), mode="bilinear", padding_mode="border", align_corners=False)  # (B, C, P, 1)
        s = s[..., 0].transpose(1, 2)  # (B, P, C)
        parts.append(F.normalize(s, dim=-1))
    desc = torch.cat(parts, dim=-1) / np.sqrt(len(keys))
    return desc.cpu().numpy().astype(np.float32)


def describe_pixels(features: FeatureBatch, out_size: int, proj_dim: int | None = None, seed: int = 0) -> np.ndarray:
    """Dense descriptor maps (B, D, out_size, out_size) float32: :func:`describe_points` at every pixel centre.

    Equivalent to upsampling every map bilinearly (align_corners=False) to
    ``out_size``, normalising per key, concatenating and scaling by 1/sqrt(n_keys).
    """
    b = next(iter(features.values())).shape[0]
    c = np.arange(out_size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    pts = np.broadcast_to(np.stack([xx.ravel(), yy.ravel()], -1), (b, out_size * out_size, 2))
    d = describe_points(features, pts, out_size, proj_dim, seed)  # (B, P, D)
    return np.ascontiguousarray(d.transpose(0, 2, 1).reshape(b, -1, out_size, out_size))


# ------------------------------------------------------------ RoI pixels
def roi_pixels(roi: np.ndarray, crop_size: int) -> np.ndarray:
    """Centres (P, 2) of the crop pixels whose centre lies inside ``roi`` (x0, y0, x1, y1) in crop px.

    An RoI that covers no pixel centre (degenerate or outside the crop) falls
    back to the whole crop, so every image still gets landmarks.
    """
    S = int(crop_size)
    x0, y0, x1, y1 = (float(v) for v in roi)
    if not np.isfinite([x0, y0, x1, y1]).all():
        x0, y0, x1, y1 = 0.0, 0.0, float(S), float(S)
    ix = np.arange(max(0, int(np.ceil(x0 - 0.5))), min(S - 1, int(np.floor(x1 - 0.5))) + 1)
    iy = np.arange(max(0, int(np.ceil(y0 - 0.5))), min(S - 1, int(np.floor(y1 - 0.5))) + 1)
    if len(ix) == 0 or len(iy) == 0:
        ix = iy = np.arange(S)
    yy, xx = np.meshgrid(iy, ix, indexing="ij")
    return np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], -1).astype(np.float32)


def sample_roi_pixels(
    roi: np.ndarray, crop_size: int, n: int | None, rng: np.random.Generator, mask: np.ndarray | None = None, min_pixels: int = 1
) -> np.ndarray:
    """``n`` distinct random RoI pixel centres (all of them when ``n`` is None or exceeds the count).

    ``mask`` (r, r) bool, optional: keep only RoI pixels on its True cells (a
    foreground estimate, :mod:`pipeline.methods.foreground`), unless fewer than
    ``min_pixels`` would remain, in which case the whole RoI is used.
    """
    pix = roi_pixels(roi, crop_size)
    if mask is not None:
        keep = mask_lookup(mask, pix, crop_size)
        if keep.sum() >= max(1, int(min_pixels)):
            pix = pix[keep]
    if n is None or n >= len(pix):
        return pix
    return pix[np.sort(rng.choice(len(pix), size=int(n), replace=False))]


# ------------------------------------------------------------ estimator
class ZeroShot:
    """ZeroShot landmark discovery (see module docstring).

    ``fit(batches, rois)`` / ``predict(batches, rois) -> LandmarkSet``: ``batches``
    is an iterable of feature dicts (key -> (B, C, h, w)) covering the images in
    order, ``rois`` (N, 4) the RoI boxes in crop pixels of those N images. The
    estimator streams: it never needs more than one batch of feature maps.
    """

    config_name = "zeroshot_config.json"
    weights_name = "zeroshot_centroids.npy"
    selection_name = "zeroshot_selection.json"

    def __init__(
        self,
        n_clusters: int = 10,
        crop_size: int = 64,
        n_samples_per_image: int = 200,
        n_test_samples: int | None = None,
        max_train_points: int | None = 2_000_000,
        max_train_bytes: int | None = 4 * 2**30,
        proj_dim: int | None = None,
        seed: int = 0,
        n_init: int = 3,
        max_iter: int = 50,
        use_gpu: bool | str = "auto",
        point_chunk: int = 16_384,
        n_candidates: int | None = None,
        min_presence: float = 0.8,
        min_coherence: float = 0.0,
    ) -> None:
        if n_clusters < 1 or crop_size < 1 or n_samples_per_image < 1:
            raise ConfigError("n_clusters, crop_size and n_samples_per_image must be >= 1", where="ZeroShot")
        if n_candidates is not None and int(n_candidates) < int(n_clusters):
            raise ConfigError(
                f"n_candidates ({n_candidates}) must be >= n_clusters ({n_clusters})", where="--candidates",
                fix="give at least K candidate clusters, or none for the paper's plain K-means",
            )
        if not 0.0 <= float(min_presence) <= 1.0:
            raise ConfigError(f"min_presence must be in [0, 1], got {min_presence}", where="--min-presence")
        if not 0.0 <= float(min_coherence) <= 1.0:
            raise ConfigError(f"min_coherence must be in [0, 1], got {min_coherence}", where="--min-coherence")
        self.n_clusters = int(n_clusters)
        self.crop_size = int(crop_size)
        self.n_samples_per_image = int(n_samples_per_image)
        self.n_test_samples = n_test_samples
        self.max_train_points = max_train_points
        self.max_train_bytes = max_train_bytes
        self.proj_dim = proj_dim
        self.seed = int(seed)
        self.n_init = int(n_init)
        self.max_iter = int(max_iter)
        self.use_gpu = use_gpu
        self.point_chunk = int(point_chunk)
        self.n_candidates = None if n_candidates is None else int(n_candidates)
        self.min_presence = float(min_presence)
        self.min_coherence = float(min_coherence)

    def get_config(self) -> dict:
        return {
            "n_clusters": self.n_clusters,
            "crop_size": self.crop_size,
            "n_samples_per_image": self.n_samples_per_image,
            "n_test_samples": self.n_test_samples,
            "max_train_points": self.max_train_points,
            "max_train_bytes": self.max_train_bytes,
            "proj_dim": self.proj_dim,
            "seed": self.seed,
            "n_init": self.n_init,
            "max_iter": self.max_iter,
            "point_chunk": self.point_chunk,
            "n_candidates": self.n_candidates,
            "min_presence": self.min_presence,
            "min_coherence": self.min_coherence,
        }

    # ---------------------------------------------------------- training
    def samples_per_image(self, n_images: int, dim: int | None = None) -> int:
        """Per-image sample size after the caps on the training sample.

        The (M, D) float32 sample must fit in memory for k-means: M is capped by
        ``max_train_points`` and M * D * 4 by ``max_train_bytes`` (when ``dim`` is
        known). Wide backbones (SD: thousands of channels) therefore get fewer
        pixels per image rather than an out-of-memory error.
        """
        n = self.n_samples_per_image
        n_images = max(1, int(n_images))
        if self.max_train_points and n_images * n > self.max_train_points:
            n = int(self.max_train_points) // n_images
        if self.max_train_bytes and dim and n_images * n * dim * 4 > self.max_train_bytes:
            n = int(self.max_train_bytes) // (n_images * dim * 4)
        return max(1, n)

    def _rng(self, stream: int, image: int) -> np.random.Generator:
        # One generator per (purpose, image): results do not depend on the batching.
        return np.random.default_rng([self.seed, stream, int(image)])

    def sample_descriptors(
        self, batches: Iterable[FeatureBatch], rois: np.ndarray, progress: bool = True, masks: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Descriptors of random RoI pixels of every image: ``(desc (M, D), image_index (M,), xy (M, 2))``.

        ``masks`` (N, r, r) bool, optional: sample only RoI pixels on the mask (a foreground estimate).
        """
        rois = np.asarray(rois, dtype=np.float64).reshape(-1, 4)
        n_img = len(rois)
        _check_masks(masks, n_img)
        per = None
        descs, owners, points = [], [], []
        at = 0
        for batch in tqdm(batches, desc="zeroshot sample", unit="batch", disable=not progress):
            b = _batch_len(batch)
            if per is None:  # the descriptor width is known once the first batch is seen
                per = self.samples_per_image(n_img, descriptor_dim({k: tuple(v.shape[1:]) for k, v in batch.items()}, self.proj_dim))
                self.samples_per_image_ = per
            if at + b > n_img:
                raise ConfigError(f"feature batches cover more than the {n_img} images given RoIs for", where="ZeroShot.sample_descriptors")
            pts = [sample_roi_pixels(rois[at + i], self.crop_size, per, self._rng(0, at + i), _mask(masks, at + i), self.n_clusters) for i in range(b)]
            counts = [len(p) for p in pts]
            if len(set(counts)) == 1:  # the usual case: one batched call
                d = describe_points(batch, np.stack(pts), self.crop_size, self.proj_dim, self.seed)
                descs.append(d.reshape(-1, d.shape[-1]))
            else:  # an RoI smaller than `per` pixels: describe image by image
                for i in range(b):
                    single = {k: v[i : i + 1] for k, v in batch.items()}
                    descs.append(describe_points(single, pts[i][None], self.crop_size, self.proj_dim, self.seed)[0])
            owners.append(np.repeat(np.arange(at, at + b), counts))
            points.append(np.concatenate(pts))
            at += b
        if at != n_img:
            raise ConfigError(f"got features for {at} images but {n_img} RoIs", where="ZeroShot.sample_descriptors")
        return np.concatenate(descs), np.concatenate(owners), np.concatenate(points)

    def fit_descriptors(self, desc: np.ndarray, owner: np.ndarray | None = None, xy: np.ndarray | None = None) -> "ZeroShot":
        """k-means (FaissKMeans, k-means++ seeded) of sampled descriptors into the K centroids.

        Paper rule (``n_candidates=None``): K-means with K clusters. With ``n_candidates = M > K``:
        K-means with M clusters, then the K most compact clusters that are present in at least
        ``min_presence`` of the images (:mod:`pipeline.clustering.selection`), which needs each
        sample's image (``owner``) and crop position (``xy``), as returned by
        :meth:`sample_descriptors`. ``train_labels_`` are the samples' nearest *kept* centroid.
        """
        m = self.n_candidates or self.n_clusters
        km = FaissKMeans(m, n_init=self.n_init, max_iter=self.max_iter, seed=self.seed, use_gpu=self.use_gpu)
        km.fit(desc)
        self.n_train_points_ = int(len(desc))
        if m == self.n_clusters:
            self.cluster_centers_ = km.cluster_centers_
            self.inertia_ = km.inertia_
            self.train_labels_ = km.labels_
            self.selected_ = np.arange(m)
            return self
        if owner is None or xy is None:
            raise ConfigError(
                "choosing K of the candidate clusters needs each sample's image and position",
                where="ZeroShot.fit_descriptors", fix="pass owner and xy from sample_descriptors (or use fit)",
            )
        owner = np.asarray(owner, dtype=np.int64)
        stats = cluster_spread(km.labels_, owner, xy, m, int(owner.max(initial=-1)) + 1)
        self.selected_ = select_compact(stats, self.n_clusters, self.min_presence, self.min_coherence)
        self.candidate_centers_ = km.cluster_centers_
        self.candidate_stats_ = stats
        self.cluster_centers_ = np.ascontiguousarray(km.cluster_centers_[self.selected_])
        self.train_labels_, sq = nearest_centroid(desc, self.cluster_centers_, use_gpu=self.use_gpu)
        self.inertia_ = float(np.sum(sq))
        return self

    def fit(self, batches: Iterable[FeatureBatch], rois: np.ndarray, progress: bool = True, masks: np.ndarray | None = None) -> "ZeroShot":
        desc, owner, xy = self.sample_descriptors(batches, rois, progress, masks)
        return self.fit_descriptors(desc, owner, xy)

    # ---------------------------------------------------------- inference
    def _check_fitted(self) -> None:
        if getattr(self, "cluster_centers_", None) is None:
            raise ConfigError("ZeroShot is not fitted", where="ZeroShot.predict", fix="call fit() or load centroids with from_pretrained()")

    def predict(self, batches: Iterable[FeatureBatch], rois: np.ndarray, progress: bool = True, masks: np.ndarray | None = None) -> LandmarkSet:
        """Landmarks (crop pixels) of the images covered by ``batches``; score = -squared distance to the centroid.

        ``masks`` as in :meth:`sample_descriptors`: only masked RoI pixels can become landmarks.
        """
        self._check_fitted()
        rois = np.asarray(rois, dtype=np.float64).reshape(-1, 4)
        n_img, K = len(rois), self.n_clusters
        _check_masks(masks, n_img)
        coords = np.full((n_img, K, 2), np.nan, np.float32)
        scores = np.full((n_img, K), np.nan, np.float32)
        present = np.zeros((n_img, K), bool)
        index = centroid_index(self.cluster_centers_, self.use_gpu)  # once, not per image
        at = 0
        for batch in tqdm(batches, desc="zeroshot predict", unit="batch", disable=not progress):
            b = _batch_len(batch)
            if at + b > n_img:
                raise ConfigError(f"feature batches cover more than the {n_img} images given RoIs for", where="ZeroShot.predict")
            for i in range(b):
                single = {k: v[i : i + 1] for k, v in batch.items()}
                pts = sample_roi_pixels(rois[at + i], self.crop_size, self.n_test_samples, self._rng(1, at + i), _mask(masks, at + i), K)
                labels = np.empty(len(pts), np.int64)
                dist = np.empty(len(pts), np.float32)
                for s in range(0, len(pts), self.point_chunk):
                    d = describe_points(single, pts[None, s : s + self.point_chunk], self.crop_size, self.proj_dim, self.seed)[0]
                    labels[s : s + len(d)], dist[s : s + len(d)] = nearest_centroid(d, self.cluster_centers_, index=index)
                ex = exemplar_assign(np.zeros(len(pts), np.int64), labels, dist, 1, K)[0]
                ok = ex >= 0
                coords[at + i, ok] = pts[ex[ok]]
                scores[at + i, ok] = -dist[ex[ok]]
                present[at + i] = ok
            at += b
        if at != n_img:
            raise ConfigError(f"got features for {at} images but {n_img} RoIs", where="ZeroShot.predict")
        return LandmarkSet(coords, present, scores)

    # ---------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the config (JSON) and the centroids (.npy) to ``directory``."""
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / self.weights_name) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, self.cluster_centers_.astype(np.float32))
        write_json(directory / self.config_name, {**self.get_config(), "use_gpu": str(self.use_gpu), "inertia": float(self.inertia_)})
        if getattr(self, "candidate_stats_", None) is not None:  # what the cluster choice saw, for reports
            write_json(directory / self.selection_name, {"selected": [int(c) for c in self.selected_], **self.candidate_stats_.to_json()})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any) -> "ZeroShot":
        directory = Path(directory)
        cfg_path = directory / cls.config_name
        if not cfg_path.is_file() or not (directory / cls.weights_name).is_file():
            raise StoreError("ZeroShot model not found", where=str(directory), fix="run `uld zeroshot` first, or point at its run folder")
        cfg = json.loads(cfg_path.read_text())
        inertia = cfg.pop("inertia", float("nan"))
        cfg.pop("use_gpu", None)
        model = cls(**{**cfg, **overrides})
        model.cluster_centers_ = np.load(directory / cls.weights_name).astype(np.float32)
        model.inertia_ = inertia
        if model.cluster_centers_.shape[0] != model.n_clusters:
            raise StoreError(f"centroid file holds {model.cluster_centers_.shape[0]} centroids, config says {model.n_clusters}", where=str(directory))
        return model


def _check_masks(masks: np.ndarray | None, n_img: int) -> None:
    if masks is not None and (np.ndim(masks) != 3 or len(masks) != n_img):
        raise ConfigError(f"masks must be (N, r, r) for the {n_img} images, got shape {np.shape(masks)}", where="ZeroShot")


def _mask(masks: np.ndarray | None, i: int) -> np.ndarray | None:
    return None if masks is None else masks[i]


def _batch_len(batch: FeatureBatch) -> int:
    if not batch:
        raise ConfigError("empty feature batch", where="ZeroShot")
    lens = {int(v.shape[0]) for v in batch.values()}
    if len(lens) != 1:
        raise ConfigError(f"feature maps in one batch have different batch sizes {sorted(lens)}", where="ZeroShot")
    return lens.pop()
