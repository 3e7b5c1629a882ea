"""Choose K landmark-like clusters out of M > K k-means clusters of pixel descriptors.

Why: k-means of descriptors sampled uniformly over the object spends its K
centroids where the *pixels* are -- skin, hair, the silhouette -- so with K = 10
most clusters are regions, and a region's "nearest pixel to the centroid"
(the exemplar) wanders over the region from image to image. Small parts (eyes,
nostrils, mouth corners) hold few pixels and rarely get a centroid of their own.
Over-clustering (M > K, the idea Mallis et al. use for self-training) gives the
parts their own clusters; what remains is to tell parts from regions.

The rule: a landmark is *one small place in every image*. For each candidate
cluster we measure, from the training pixels already sampled for k-means
(nothing is re-extracted),

- ``presence``: the fraction of training images with at least one member pixel;
- ``spread``: per image, the RMS distance of the member pixels to their mean
  (crop pixels), then the median over the images with >= 2 members.

Among the clusters present in at least ``min_presence`` of the images, the K
with the smallest spread are kept (if fewer qualify, the most present of the
rest fill up). Parts are compact; regions are spread out, whatever their size.

Measured on the synthetic heads (shipped DDPM, validation part of the train
split, K = 10): per-landmark Hungarian accuracy 0.20 -> 0.55 and forward NME
7.19 -> 4.10 with M = 40 (bench/results/zeroshot_selection.md). This is a
project extension of ZeroShot (001, Sec 3.1 uses plain K-means);
``n_candidates=None`` keeps the paper's rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class ClusterSpread:
    """Per-cluster statistics of member pixels over the training images (arrays of length M)."""

    presence: np.ndarray  # fraction of images with >= 1 member
    spread: np.ndarray  # median per-image RMS distance of members to their mean (crop px); inf if never >= 2 members
    members: np.ndarray  # mean number of member pixels per image, over the images where present

    def to_json(self) -> dict[str, list[float]]:
        return {name: [float(v) for v in getattr(self, name)] for name in ("presence", "spread", "members")}


def cluster_spread(labels: np.ndarray, owner: np.ndarray, xy: np.ndarray, n_clusters: int, n_images: int) -> ClusterSpread:
    """Statistics of every cluster from sampled pixels: ``labels`` (P,) cluster, ``owner`` (P,) image
    index in [0, n_images), ``xy`` (P, 2) crop pixels."""
    labels = np.asarray(labels, dtype=np.int64)
    owner = np.asarray(owner, dtype=np.int64)
    xy = np.asarray(xy, dtype=np.float64)
    if not (len(labels) == len(owner) == len(xy)) or xy.ndim != 2 or xy.shape[1:] != (2,):
        raise ConfigError(f"labels {labels.shape}, owner {owner.shape} and xy {xy.shape} must describe the same P points", where="cluster_spread")
    if len(owner) and (owner.min() < 0 or owner.max() >= n_images):
        raise ConfigError(f"owner indices must lie in [0, {n_images})", where="cluster_spread")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_clusters):
        raise ConfigError(f"labels must lie in [0, {n_clusters})", where="cluster_spread")
    # One flat (image, cluster) index: sums per pair with bincount, no Python loop over clusters.
    pair = owner * n_clusters + labels
    size = n_images * n_clusters
    cnt = np.bincount(pair, minlength=size).reshape(n_images, n_clusters).astype(np.float64)
    sx = np.bincount(pair, xy[:, 0], size).reshape(n_images, n_clusters)
    sy = np.bincount(pair, xy[:, 1], size).reshape(n_images, n_clusters)
    sq = np.bincount(pair, (xy**2).sum(1), size).reshape(n_images, n_clusters)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = sq / cnt - (sx / cnt) ** 2 - (sy / cnt) ** 2
        rms = np.where(cnt >= 2, np.sqrt(np.clip(var, 0.0, None)), np.nan)
    present = cnt > 0
    spread = np.full(n_clusters, np.inf)
    members = np.zeros(n_clusters)
    for c in range(n_clusters):
        ok = np.isfinite(rms[:, c])
        if ok.any():
            spread[c] = float(np.median(rms[ok, c]))
        if present[:, c].any():
            members[c] = float(cnt[present[:, c], c].mean())
    return ClusterSpread(presence=present.mean(0) if n_images else np.zeros(n_clusters), spread=spread, members=members)


def select_compact(stats: ClusterSpread, k: int, min_presence: float = 0.8) -> np.ndarray:
    """Indices of the ``k`` clusters to keep, most compact first (see the module docstring)."""
    m = len(stats.spread)
    if not 1 <= k <= m:
        raise ConfigError(f"cannot keep {k} of {m} clusters", where="select_compact", fix="use n_candidates >= k")
    if not 0.0 <= min_presence <= 1.0:
        raise ConfigError(f"min_presence must be in [0, 1], got {min_presence}", where="select_compact")
    idx = np.arange(m)
    eligible = stats.presence >= min_presence
    # stable sorts: ties keep k-means' cluster order, so the choice is deterministic
    first = idx[eligible][np.argsort(stats.spread[eligible], kind="stable")]
    rest = idx[~eligible][np.argsort(-stats.presence[~eligible], kind="stable")]
    return np.concatenate([first, rest])[:k].astype(np.int64)
