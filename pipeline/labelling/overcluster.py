"""Mallis (D)'s pseudo-labeller: K landmark clusters, each over-clustered, M >> K training labels.

Sources
-------
* Paper 001 (Sec 4, "Mallis (D)" and Table 1) retrains Mallis et al. on the
  diffusion features with "K = 10 and M = 100 as in the original method" and
  describes it as: it "simply oversegments the initial clusters into more
  fine-grained clusters (the initial K clusters are segmented into M >> K
  clusters)".
* Mallis et al., "Unsupervised learning of object landmarks via
  self-training correspondence" (NeurIPS 2020; TPAMI 2023 version = ref. [32]
  of paper 001): self-training on clustered keypoint descriptors, with many
  more clusters than landmarks so that each training cluster is *pure* (one
  object part, at the price of one part being spread over several clusters);
  the detector is trained on the keypoints kept as pseudo-labels regardless of
  their cluster, the descriptor with the contrastive loss on the cluster ids,
  and landmarks are read out with K clusters.

Decision (what this labeller does, and why)
-------------------------------------------
1. **K first**: FAISS k-means of all keypoint descriptors into K clusters.
   Their centroids are ``landmark_centers_``, the K landmarks the evaluation
   reads out (exemplar assignment in ``predict_landmarks``, exactly as D-ULD),
   so Mallis (D) and D-ULD differ only in the training labels, which is the
   comparison Table 1 makes.
2. **Then over-segment each of the K clusters** (paper 001's wording) with
   k-means inside it, into ``m_c`` sub-clusters with ``sum m_c = M``. ``m_c`` is
   proportional to the cluster's size (largest remainder, at least 1 each,
   never more than its points): a big cluster is the one most likely to mix
   parts, so it gets more sub-clusters; an equal split would leave it mixed.
   Nesting the sub-clusters inside the K clusters (instead of a second,
   independent k-means into M) gives every training label one landmark,
   ``landmark_of_label_``, so the tables can name it.
3. **Training labels**: the M sub-clusters. Keypoints are assigned to the
   nearest of the M sub-centroids and, per image and sub-cluster, the keypoint
   nearest it is kept (the exemplar rule of D-ULD with M columns). With
   M >> K most of an image's keypoints survive, which is the "detector on all
   kept keypoints" of Mallis et al.; the contrastive loss gets M classes, so
   two sub-clusters of one landmark are pushed apart too (that is what
   over-clustering trades for purity; the K read-out re-groups them).
4. **Not done**: Mallis et al.'s second stage (a separate landmark head and
   their correspondence-based grouping of clusters). The engine trains one
   descriptor head; the K read-out of step 1 is re-fitted on the trained
   descriptors at every evaluation, which plays the same role.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.clustering import FaissKMeans, nearest_centroid
from pipeline.errors import ConfigError
from pipeline.labelling.base import KeypointSet, PseudoLabeller
from pipeline.labelling.kmeans import check_enough_keypoints
from pipeline.labelling.registry import register_labeller


def allocate_subclusters(sizes: np.ndarray, m: int) -> np.ndarray:
    """Split ``m`` sub-clusters over clusters of ``sizes`` (K,) proportionally to size.

    Largest-remainder rounding; every cluster with points gets at least one and at
    most its number of points, so the total is ``min(m, sizes.sum())`` (ties: the
    lower cluster index first).
    """
    sizes = np.asarray(sizes, np.int64)
    total = int(min(int(m), int(sizes.sum())))
    ideal = sizes / max(int(sizes.sum()), 1) * total
    alloc = np.clip(np.floor(ideal).astype(np.int64), np.minimum(1, sizes), sizes)
    while alloc.sum() < total:
        room = np.where(alloc < sizes, ideal - alloc, -np.inf)
        alloc[int(np.argmax(room))] += 1
    while alloc.sum() > total:
        spare = np.where(alloc > 1, alloc - ideal, -np.inf)
        alloc[int(np.argmax(spare))] -= 1
    return alloc


@register_labeller("overcluster")
class OverClusterLabeller(PseudoLabeller):
    """K landmark clusters, each split into sub-clusters: M training labels (see the module docstring).

    Parameters: ``k`` landmarks, ``m`` training clusters (M >= K; Mallis et al. and
    paper 001 use M = 100 for K = 10), ``n_init`` / ``max_iter`` of every k-means.
    Fitted: ``landmark_centers_`` (K, D), ``label_centers_`` (M', D) with M' =
    min(M, number of keypoints), ``landmark_of_label_`` (M',) sorted by landmark.
    """

    def __init__(self, k: int = 10, m: int = 100, n_init: int = 3, max_iter: int = 50) -> None:
        if int(k) < 1:
            raise ConfigError(f"k must be >= 1, got {k}", where="--k")
        if int(m) < int(k):
            raise ConfigError(f"over-clustering needs M >= K, got M={m} < K={k}", where="--m", fix="use M >> K (Mallis et al.: M=100 for K=10)")
        self.k_clusters = int(k)
        self.m = int(m)
        self.n_init = int(n_init)
        self.max_iter = int(max_iter)

    def get_params(self) -> dict[str, Any]:
        return {"k": self.k_clusters, "m": self.m, "n_init": self.n_init, "max_iter": self.max_iter}

    def _kmeans(self, X: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
        if n_clusters == 1:
            return X.mean(0, keepdims=True).astype(np.float32)
        km = FaissKMeans(n_clusters=n_clusters, n_init=self.n_init, max_iter=self.max_iter, seed=int(seed), use_gpu=False)
        return km.fit(X).cluster_centers_

    def fit(self, keypoints: KeypointSet, image_rows: np.ndarray, seed: int) -> "OverClusterLabeller":
        check_enough_keypoints(keypoints, self.k_clusters, f"k={self.k_clusters} clusters")
        X = np.ascontiguousarray(keypoints.desc, np.float32)
        landmark_centers = self._kmeans(X, self.k_clusters, seed)
        parent, _ = nearest_centroid(X, landmark_centers, use_gpu=False)
        alloc = allocate_subclusters(np.bincount(parent, minlength=self.k_clusters), self.m)
        centers, owner = [], []
        for c in range(self.k_clusters):
            if alloc[c] == 0:  # an empty landmark cluster has no keypoints to split
                continue
            # seeds distinct from the K-means' and from each other's
            centers.append(self._kmeans(X[parent == c], int(alloc[c]), seed + 1 + 7919 * (c + 1)))
            owner.append(np.full(int(alloc[c]), c, np.int64))
        self.landmark_centers_ = landmark_centers
        self.label_centers_ = np.concatenate(centers).astype(np.float32)
        self.landmark_of_label_ = np.concatenate(owner)
        return self
