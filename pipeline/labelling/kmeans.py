"""D-ULD's pseudo-labeller (paper 001, Sec 3.2): K-means of the keypoint descriptors.

FAISS k-means (k-means++ restarts) into K clusters over every detected keypoint
of the training images; the training labels *are* the K landmarks, and the
exemplar assignment keeps, per image and cluster, the keypoint nearest the
centroid (Sec 3.1).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.clustering import FaissKMeans
from pipeline.errors import ConfigError
from pipeline.labelling.base import KeypointSet, PseudoLabeller
from pipeline.labelling.registry import register_labeller


def check_enough_keypoints(keypoints: KeypointSet, n_clusters: int, what: str) -> None:
    """A clear error when fewer keypoints were detected than clusters are asked for."""
    if len(keypoints) < n_clusters:
        raise ConfigError(
            f"only {len(keypoints)} keypoints were detected, fewer than {what}",
            where="pseudo-label clustering",
            fix="lower --threshold or raise top_k, or train the bootstrap longer",
        )


@register_labeller("kmeans")
class KMeansLabeller(PseudoLabeller):
    """K clusters = K landmarks = K training labels.

    Parameters: ``k`` clusters, ``n_init`` k-means++ restarts, ``max_iter`` Lloyd
    iterations (``DULDConfig.kmeans_n_init`` / ``kmeans_max_iter``).
    Fitted: ``landmark_centers_`` = ``label_centers_`` (K, D), ``inertia_``.
    """

    def __init__(self, k: int = 10, n_init: int = 3, max_iter: int = 50) -> None:
        if int(k) < 1:
            raise ConfigError(f"k must be >= 1, got {k}", where="--k")
        self.k_clusters = int(k)
        self.n_init = int(n_init)
        self.max_iter = int(max_iter)

    def get_params(self) -> dict[str, Any]:
        return {"k": self.k_clusters, "n_init": self.n_init, "max_iter": self.max_iter}

    def fit(self, keypoints: KeypointSet, image_rows: np.ndarray, seed: int) -> "KMeansLabeller":
        check_enough_keypoints(keypoints, self.k_clusters, f"k={self.k_clusters} clusters")
        km = FaissKMeans(n_clusters=self.k_clusters, n_init=self.n_init, max_iter=self.max_iter, seed=int(seed), use_gpu=False).fit(keypoints.desc)
        self.landmark_centers_ = km.cluster_centers_
        self.label_centers_ = km.cluster_centers_
        self.landmark_of_label_ = np.arange(self.k_clusters, dtype=np.int64)
        self.inertia_ = float(km.inertia_)
        return self

    @property
    def cluster_centers_(self) -> np.ndarray:
        """The K centroids, under FaissKMeans's name (callers that used k-means directly)."""
        self._check_fitted()
        return self.landmark_centers_
