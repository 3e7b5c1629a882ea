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
    coherence: np.ndarray | None = None  # see motion_coherence; None when not computed

    def to_json(self) -> dict[str, list[float]]:
        names = ("presence", "spread", "members") + (("coherence",) if self.coherence is not None else ())
        return {name: [float(v) for v in getattr(self, name)] for name in names}


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
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_xy = np.stack([sx / cnt, sy / cnt], -1)  # (N, M, 2), NaN where absent
    return ClusterSpread(
        presence=present.mean(0) if n_images else np.zeros(n_clusters), spread=spread, members=members,
        coherence=motion_coherence(mean_xy, present),
    )


def motion_coherence(mean_xy: np.ndarray, present: np.ndarray, n_components: int = 2) -> np.ndarray:
    """Per cluster, the fraction of its position variance across images explained by the motion of the others.

    Why: a cluster can be compact and present everywhere yet sit at the same crop position
    whatever the object does (a background corner, the top of the crop): it says nothing the
    object box does not, and it lands on no part. Parts move *together* with the object's pose.
    So the per-image mean positions of all clusters form a shape (N images x 2M coordinates);
    its first ``n_components`` principal components, computed without the cluster itself
    (standardised columns, so no single wandering cluster defines a component), are the
    object's shared motion; a cluster's coherence is the R^2 of regressing its own x and y
    (pooled) on them over the images where it is present. Parts of a turning head score
    ~0.9; static blobs ~0-0.3 (bench/results/zeroshot_selection.md).

    ``mean_xy`` (N, M, 2) mean member position per image (NaN where absent), ``present`` (N, M).
    Returns (M,) values in [0, 1]; 1.0 where it cannot be measured (fewer than
    ``n_components + 3`` images, or a single cluster), so that nothing is filtered then.
    """
    mean_xy = np.asarray(mean_xy, dtype=np.float64)
    present = np.asarray(present, dtype=bool)
    n, m = present.shape
    out = np.ones(m)
    if m < 2 or n < n_components + 3:
        return out
    cols = np.concatenate([mean_xy[..., 0], mean_xy[..., 1]], 1)  # (N, 2M)
    ok = np.concatenate([present, present], 1)
    with np.errstate(invalid="ignore"):
        col_mean = np.array([cols[ok[:, j], j].mean() if ok[:, j].any() else 0.0 for j in range(2 * m)])
    filled = np.where(ok, cols, col_mean) - col_mean
    std = filled.std(0)
    z = filled / np.where(std > 1e-9, std, 1.0)
    for c in range(m):
        rows = present[:, c]
        if rows.sum() < n_components + 3:
            continue
        others = np.delete(z, [c, c + m], axis=1)
        u, sv, _ = np.linalg.svd(others, full_matrices=False)
        basis = np.c_[u[rows, :n_components], np.ones(rows.sum())]
        y = np.stack([cols[rows, c], cols[rows, c + m]], 1)
        coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
        total = ((y - y.mean(0)) ** 2).sum()
        if total <= 1e-12:  # never moves at all: nothing of it is object motion
            out[c] = 0.0
            continue
        out[c] = float(np.clip(1.0 - ((y - basis @ coef) ** 2).sum() / total, 0.0, 1.0))
    return out


def select_compact(stats: ClusterSpread, k: int, min_presence: float = 0.8, min_coherence: float = 0.0) -> np.ndarray:
    """Indices of the ``k`` clusters to keep, most compact first (see the module docstring).

    Order of preference: clusters present in >= ``min_presence`` of the images whose
    :func:`motion_coherence` is >= ``min_coherence``, by spread; then the other
    present-enough clusters, by spread; then the rest, most present first.
    """
    m = len(stats.spread)
    if not 1 <= k <= m:
        raise ConfigError(f"cannot keep {k} of {m} clusters", where="select_compact", fix="use n_candidates >= k")
    if not 0.0 <= min_presence <= 1.0:
        raise ConfigError(f"min_presence must be in [0, 1], got {min_presence}", where="select_compact")
    if not 0.0 <= min_coherence <= 1.0:
        raise ConfigError(f"min_coherence must be in [0, 1], got {min_coherence}", where="select_compact")
    idx = np.arange(m)
    eligible = stats.presence >= min_presence
    coherent = np.ones(m, bool) if stats.coherence is None or min_coherence <= 0 else stats.coherence >= min_coherence
    # stable sorts: ties keep k-means' cluster order, so the choice is deterministic
    groups = [eligible & coherent, eligible & ~coherent]
    ordered = [idx[g][np.argsort(stats.spread[g], kind="stable")] for g in groups]
    ordered.append(idx[~eligible][np.argsort(-stats.presence[~eligible], kind="stable")])
    return np.concatenate(ordered)[:k].astype(np.int64)
