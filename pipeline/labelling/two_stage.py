"""Two-stage clustering (TSC) of D-ULD++ (paper 001, Sec 3.3.2) and the K landmark identities.

Stage 1 clusters the per-image latent pose codes ``phi_j`` into Q pose clusters
(labels ``u_j``). Stage 2 clusters, inside each pose cluster, the keypoint
descriptors of its images into K clusters. That gives Q x K labels
``r = u * K + c`` ("[R] = [Q] x [K]"); per image and label the keypoint whose
descriptor is nearest its centroid is kept (exemplar assignment, Sec 3.1), so an
image carries at most K labelled keypoints, all from its own pose cluster.

Under-populated pose clusters
-----------------------------
A pose cluster with fewer than ``min_points_per_landmark * K`` keypoints (a
handful of images in an unusual pose, or a cluster FAISS left empty) cannot
estimate K pose-specific centroids: k-means on so few points returns centroids
that are single keypoints. Such a cluster keeps its images (their pose label
is still informative for Eq. 3) but uses the *global* K-means centroids for
stage 2, i.e. it falls back to D-ULD's single-stage clustering; it is flagged
in ``fallback_``. Merging its images into the nearest populated pose cluster
was the alternative; it would give them a pose label they do not have and
would silently change Q.

Landmark identities (``match_identities``)
------------------------------------------
Stage 2 numbers the K clusters of every pose cluster independently: landmark
``c = 3`` of the frontal cluster and ``c = 3`` of the left-profile cluster are
unrelated parts. Training D-ULD++ needs only the Q x K labels, but the
evaluator (and anyone using the landmarks) needs K outputs that mean the same
part in every pose. The paper does not say how its K evaluated landmarks are
obtained from the Q x K clusters; we match them through one reference: the
global K-means of all descriptors (D-ULD's clustering, which groups each part
across poses). For every pose cluster, the K x K squared distances between its
stage-2 centroids and the global centroids are the cost of a linear assignment
(Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``), which yields
a (Q, K) table ``label -> global landmark id``. Why this way:

- descriptors, not positions: where a part sits in the crop moves with pose
  (that is why TSC exists), while its descriptor is trained to stay the same;
- one-to-one per pose cluster: nearest-centroid voting can send two local
  clusters to the same identity and leave another identity empty, which the
  evaluator would see as a missing landmark in every image of that pose;
- a single shared reference instead of chaining pose clusters pairwise, so an
  error in one match does not propagate to the next cluster.

The other read-out needs no identities: the global K-means itself
(``landmark_centers_``), as ``pipeline.methods.duld.predict_landmarks`` uses it
for D-ULD. On the demo's D-ULD heads it gave the better landmarks
(bench/results/duldpp_tsc.md, duldpp_finetune.md).

With the self-training engine
-----------------------------
:meth:`TwoStageLabels.to_pseudo_labels` gives the engine's
:class:`pipeline.labelling.base.PseudoLabels` with Q * K label columns and
``landmark_of`` = the identity table; the labeller carries the engine's
``landmark_centers_`` / ``label_centers_`` / ``landmark_of_label_`` and
``get_state`` / ``set_state``. Unlike a ``PseudoLabeller``, ``fit`` and
``predict`` also take the images' pose codes, and ``predict`` labels each
keypoint only among its own pose cluster's K centroids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from pipeline.clustering import FaissKMeans, nearest_centroid
from pipeline.errors import ConfigError
from pipeline.labelling.base import KeypointSet, PseudoLabels
from pipeline.methods.exemplar import exemplar_assign


def match_identities(pose_centers: np.ndarray, global_centers: np.ndarray) -> np.ndarray:
    """(Q, K) int64 table: entry ``[u, c]`` is the global landmark id of pose cluster ``u``'s landmark ``c``.

    ``pose_centers`` (Q, K, D): stage-2 centroids per pose cluster;
    ``global_centers`` (K, D): a K-means of all descriptors. Per pose cluster a
    minimum-cost one-to-one assignment on squared Euclidean distances, so every
    row of the table is a permutation of ``0..K-1`` (see the module docstring).
    """
    P = np.asarray(pose_centers, dtype=np.float64)
    G = np.asarray(global_centers, dtype=np.float64)
    if P.ndim != 3 or G.ndim != 2 or P.shape[1:] != G.shape:
        raise ConfigError(
            f"pose centres must be (Q, K, D) and global centres (K, D), got {P.shape} and {G.shape}",
            where="match_identities",
        )
    if not (np.isfinite(P).all() and np.isfinite(G).all()):
        raise ConfigError("centroids contain NaN or inf", where="match_identities")
    Q, K, _ = P.shape
    table = np.empty((Q, K), np.int64)
    for u in range(Q):
        cost = ((P[u][:, None, :] - G[None, :, :]) ** 2).sum(-1)  # (K local, K global)
        local, glob = linear_sum_assignment(cost)
        table[u, local] = glob
    return table


@dataclass
class TwoStageLabels:
    """TSC pseudo-labels of N images: at most K keypoints per image, all from its pose cluster.

    ``rows`` (N,) store rows; ``pose`` (N,) stage-1 cluster ``u``; column ``c``
    of ``coords`` (N, K, 2, crop px, NaN where absent), ``present`` (N, K),
    ``distance`` (N, K, squared descriptor distance to the centroid, NaN where
    absent) and ``keypoint`` (N, K, index into the KeypointSet, -1 where
    absent) is local landmark ``c`` of the image's pose cluster. ``table``
    (Q, K): the labeller's identity table (:func:`match_identities`).
    """

    rows: np.ndarray
    pose: np.ndarray
    coords: np.ndarray
    present: np.ndarray
    distance: np.ndarray
    keypoint: np.ndarray
    table: np.ndarray
    # built on the first lookup (once per round, not once per training step)
    _pseudo: PseudoLabels | None = field(default=None, init=False, repr=False, compare=False)
    _pos: dict[int, int] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def k(self) -> int:
        return int(self.present.shape[1])

    @property
    def q(self) -> int:
        return int(self.table.shape[0])

    @property
    def labels(self) -> np.ndarray:
        """(N, K) TSC label ``r = u * K + c`` of each column (the descriptor loss's classes)."""
        return self.pose[:, None] * self.k + np.arange(self.k)[None, :]

    @property
    def identity(self) -> np.ndarray:
        """(N, K) global landmark id of each column."""
        return self.table[self.pose]

    def to_pseudo_labels(self) -> PseudoLabels:
        """The engine's container: Q * K label columns, column ``u * K + c`` = TSC label ``r``.

        Each image fills the K columns of its own pose cluster; ``landmark_of``
        (Q * K,) is the identity table, so every training label names its landmark.
        """
        n, k = len(self.rows), self.k
        cols = self.labels  # (N, K)
        img = np.arange(n)[:, None]
        coords = np.full((n, self.q * k, 2), np.nan, np.float32)
        present = np.zeros((n, self.q * k), bool)
        dist = np.full((n, self.q * k), np.nan, np.float32)
        coords[img, cols] = self.coords
        present[img, cols] = self.present
        dist[img, cols] = self.distance
        return PseudoLabels(self.rows, coords, present, dist, landmark_of=self.table.reshape(-1).copy())

    def lookup(self, rows: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a training batch of store ``rows``: ``(coords (B, Q*K, 2) crop px, 0 where absent;
        present (B, Q*K); pose (B,))``, the inputs of ``pipeline.methods.duldpp``'s steps."""
        if self._pseudo is None:
            self._pseudo = self.to_pseudo_labels()
        rows_t = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        coords, present = self._pseudo.lookup(rows_t)  # raises a ConfigError for rows it has no labels of
        pos = {int(r): i for i, r in enumerate(self.rows)} if self._pos is None else self._pos
        self._pos = pos
        pose = self.pose[np.asarray([pos[int(r)] for r in rows_t], dtype=np.int64)]
        return coords, present, torch.from_numpy(pose.astype(np.int64))

    def by_identity(self) -> tuple[np.ndarray, np.ndarray]:
        """``(coords (N, K, 2), present (N, K))`` with column = global landmark id, for the evaluator."""
        n = len(self.rows)
        coords = np.full_like(self.coords, np.nan)
        present = np.zeros_like(self.present)
        img = np.arange(n)[:, None]
        ident = self.identity
        coords[img, ident] = self.coords
        present[img, ident] = self.present
        return coords, present


_STATE = ("pose_centers", "centers", "global_centers", "identities", "fallback", "pose_images", "pose_keypoints")


def _seed(seed: int, stage: int, part: int = 0) -> int:
    """Independent FAISS seeds per stage and pose cluster (restarts add 0..n_init-1 to it)."""
    return int(np.random.SeedSequence([int(seed), stage, part]).generate_state(1)[0] % (2**31 - 1024))


class TwoStageLabeller:
    """TSC (paper 001, Sec 3.3.2): Q pose clusters of the codes, then K descriptor clusters per pose.

    Parameters: ``q`` pose clusters, ``k`` landmarks; ``n_init``/``max_iter``
    of every FAISS k-means; ``min_points_per_landmark``: a pose cluster needs at
    least this many keypoints per landmark (``* k``) for its own stage-2
    centroids, otherwise it uses the global ones (module docstring).

    Fitted attributes: ``pose_centers_`` (Q, L), ``centers_`` (Q, K, D) stage-2
    centroids, ``global_centers_`` (K, D), ``identities_`` (Q, K) (see
    :func:`match_identities`), ``fallback_`` (Q,) bool, ``pose_images_`` (Q,)
    images and ``pose_keypoints_`` (Q,) keypoints per pose cluster in the
    training set.
    """

    def __init__(self, q: int, k: int, n_init: int = 3, max_iter: int = 50, min_points_per_landmark: int = 5) -> None:
        self.q = q
        self.k = k
        self.n_init = n_init
        self.max_iter = max_iter
        self.min_points_per_landmark = min_points_per_landmark

    # ------------------------------------------------------------------ helpers
    def _kmeans(self, n_clusters: int, seed: int) -> FaissKMeans:
        # use_gpu=False: FAISS's GPU k-means is not bit-reproducible; these sets are small.
        return FaissKMeans(n_clusters=n_clusters, n_init=self.n_init, max_iter=self.max_iter, seed=seed, use_gpu=False)

    def _check_fitted(self) -> None:
        if not hasattr(self, "centers_"):
            raise ConfigError("the two-stage labeller is not fitted", where="TwoStageLabeller.predict", fix="call fit(...) first")

    @staticmethod
    def _image_index(keypoints: KeypointSet, codes: np.ndarray, image_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Validate the inputs; return (codes float32 (N, L), image position of every keypoint (M,))."""
        image_rows = np.asarray(image_rows, dtype=np.int64).ravel()
        codes = np.asarray(codes, dtype=np.float32)
        if codes.ndim != 2 or len(codes) != len(image_rows):
            raise ConfigError(
                f"codes must be (n_images, L) with one row per image row, got {codes.shape} for {len(image_rows)} images",
                where="TwoStageLabeller",
                fix="encode every image of image_rows with the pose VAE (PoseVAE.codes)",
            )
        if len(np.unique(image_rows)) != len(image_rows):
            raise ConfigError("image_rows contains duplicates", where="TwoStageLabeller")
        order = np.argsort(image_rows, kind="stable")
        kp_rows = np.asarray(keypoints.rows, dtype=np.int64)
        at = np.searchsorted(image_rows[order], kp_rows)
        at = np.minimum(at, max(len(image_rows) - 1, 0))
        if len(kp_rows) and (len(image_rows) == 0 or (image_rows[order][at] != kp_rows).any()):
            raise ConfigError("keypoints belong to images outside image_rows", where="TwoStageLabeller")
        return codes, order[at] if len(kp_rows) else np.zeros(0, np.int64)

    # ---------------------------------------------------------------------- fit
    def fit(self, keypoints: KeypointSet, codes: np.ndarray, image_rows: np.ndarray, seed: int = 0) -> "TwoStageLabeller":
        """Fit stage 1 on ``codes`` (one per image of ``image_rows``), stage 2 per pose cluster, identities."""
        q, k = int(self.q), int(self.k)
        if q < 1 or k < 1 or int(self.min_points_per_landmark) < 1:
            raise ConfigError(f"q, k and min_points_per_landmark must be >= 1, got {q}, {k}, {self.min_points_per_landmark}", where="TwoStageLabeller")
        codes, img = self._image_index(keypoints, codes, image_rows)
        if len(codes) < q:
            raise ConfigError(f"{len(codes)} images cannot form {q} pose clusters", where="TwoStageLabeller.fit", fix="lower q")
        if len(keypoints) < k:
            raise ConfigError(
                f"only {len(keypoints)} keypoints for k={k} landmarks", where="TwoStageLabeller.fit", fix="detect more keypoints per image or lower k"
            )
        desc = np.asarray(keypoints.desc, dtype=np.float32)
        pose_km = self._kmeans(q, _seed(seed, 1)).fit(codes)
        pose = pose_km.labels_
        self.pose_centers_ = pose_km.cluster_centers_
        self.global_centers_ = self._kmeans(k, _seed(seed, 2)).fit(desc).cluster_centers_
        kp_pose = pose[img]
        centers = np.empty((q, k, desc.shape[1]), np.float32)
        fallback = np.zeros(q, bool)
        need = int(self.min_points_per_landmark) * k
        for u in range(q):
            sel = kp_pose == u
            if int(sel.sum()) < need:
                centers[u] = self.global_centers_
                fallback[u] = True
            else:
                centers[u] = self._kmeans(k, _seed(seed, 3, u)).fit(desc[sel]).cluster_centers_
        self.centers_ = centers
        self.fallback_ = fallback
        self.identities_ = match_identities(centers, self.global_centers_)
        # a fallback cluster uses the global centroids themselves: its identities are exact
        self.identities_[fallback] = np.arange(k)
        self.pose_images_ = np.bincount(pose, minlength=q)
        self.pose_keypoints_ = np.bincount(kp_pose, minlength=q)
        return self

    # ------------------------------------------------- the engine's attribute names
    @property
    def landmark_centers_(self) -> np.ndarray:
        """(K, D) the global K-means: what ``predict_landmarks`` reads K landmarks out with."""
        self._check_fitted()
        return self.global_centers_

    @property
    def label_centers_(self) -> np.ndarray:
        """(Q * K, D) the stage-2 centroids, row ``u * K + c`` = TSC label ``r``."""
        self._check_fitted()
        return self.centers_.reshape(-1, self.centers_.shape[-1])

    @property
    def landmark_of_label_(self) -> np.ndarray:
        """(Q * K,) global landmark id of every TSC label (the identity table, flattened)."""
        self._check_fitted()
        return self.identities_.reshape(-1)

    def get_state(self) -> dict[str, np.ndarray]:
        """The fitted arrays, for a checkpoint (``set_state`` restores them without re-fitting)."""
        self._check_fitted()
        return {name: np.asarray(getattr(self, name + "_")) for name in _STATE}

    def set_state(self, state: dict[str, np.ndarray]) -> "TwoStageLabeller":
        missing = [name for name in _STATE if name not in state]
        if missing:
            raise ConfigError(f"a two-stage labeller state lacks {missing}", where="TwoStageLabeller.set_state",
                              fix="load the state TwoStageLabeller.get_state wrote")
        centers = np.asarray(state["centers"], np.float32)
        if centers.shape[:2] != (int(self.q), int(self.k)):
            raise ConfigError(f"state has {centers.shape[:2]} (Q, K) centroids, the labeller is ({self.q}, {self.k})",
                              where="TwoStageLabeller.set_state", fix="build the labeller with the q and k of the checkpoint")
        for name in _STATE:
            setattr(self, name + "_", np.asarray(state[name]))
        return self

    # ------------------------------------------------------------------ predict
    def predict_pose(self, codes: np.ndarray) -> np.ndarray:
        """Stage-1 label ``u`` (n,) of each code."""
        self._check_fitted()
        return nearest_centroid(np.asarray(codes, np.float32), self.pose_centers_, use_gpu=False)[0]

    def assign(self, keypoints: KeypointSet, codes: np.ndarray, image_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per keypoint its TSC label ``r = u * K + c`` (nearest of its image's pose cluster's K centroids)
        and the squared distance to it (the engine's ``round-NNN-keypoints.parquet`` columns)."""
        self._check_fitted()
        codes, img = self._image_index(keypoints, codes, image_rows)
        pose = self.predict_pose(codes) if len(codes) else np.zeros(0, np.int64)
        kp_pose = pose[img]
        local = np.zeros(len(keypoints), np.int64)
        sq = np.zeros(len(keypoints), np.float32)
        desc = np.asarray(keypoints.desc, dtype=np.float32)
        for u in np.unique(kp_pose):
            sel = np.flatnonzero(kp_pose == u)
            local[sel], sq[sel] = nearest_centroid(desc[sel], self.centers_[u], use_gpu=False)
        return kp_pose * int(self.k) + local, sq

    def identity_centers(self, codes: np.ndarray) -> np.ndarray:
        """(n, K, D) per image its pose cluster's stage-2 centroids, row ``g`` = global landmark ``g``.

        The read-out with identities: exemplar assignment against these centroids gives, per
        image, K landmarks that mean the same part in every pose (``identities_[u, c] = g``
        puts local centroid ``c`` at row ``g``).
        """
        self._check_fitted()
        pose = self.predict_pose(codes)
        inverse = np.argsort(self.identities_, axis=1)  # [u, g] = local c with identity g
        by_identity = np.take_along_axis(self.centers_, inverse[:, :, None], axis=1)  # (Q, K, D)
        return by_identity[pose]

    def predict(self, keypoints: KeypointSet, codes: np.ndarray, image_rows: np.ndarray) -> TwoStageLabels:
        """TSC labels: pose cluster per image, then per image and landmark the keypoint nearest its centroid."""
        self._check_fitted()
        codes, img = self._image_index(keypoints, codes, image_rows)
        image_rows = np.asarray(image_rows, dtype=np.int64).ravel()
        n, k = len(image_rows), int(self.k)
        pose = self.predict_pose(codes) if n else np.zeros(0, np.int64)
        kp_pose = pose[img]
        local = np.zeros(len(keypoints), np.int64)
        sq = np.zeros(len(keypoints), np.float32)
        desc = np.asarray(keypoints.desc, dtype=np.float32)
        for u in np.unique(kp_pose):
            sel = np.flatnonzero(kp_pose == u)
            local[sel], sq[sel] = nearest_centroid(desc[sel], self.centers_[u], use_gpu=False)
        assign = exemplar_assign(img, local, sq, n, k)
        present = assign >= 0
        safe = np.where(present, assign, 0)
        xy = np.asarray(keypoints.xy, dtype=np.float32)
        coords = np.where(present[..., None], xy[safe] if len(xy) else np.zeros((n, k, 2), np.float32), np.nan)
        dist = np.where(present, sq[safe] if len(sq) else np.zeros((n, k), np.float32), np.nan)
        return TwoStageLabels(
            rows=image_rows,
            pose=pose.astype(np.int64),
            coords=coords.astype(np.float32),
            present=present,
            distance=dist.astype(np.float32),
            keypoint=assign,
            table=self.identities_,
        )

    def fit_predict(self, keypoints: KeypointSet, codes: np.ndarray, image_rows: np.ndarray, seed: int = 0) -> TwoStageLabels:
        """``fit`` then ``predict`` on the same images (one TSC round of D-ULD++)."""
        return self.fit(keypoints, codes, image_rows, seed).predict(keypoints, codes, image_rows)
