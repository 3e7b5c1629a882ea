"""What every pseudo-labeller shares: the keypoint and pseudo-label containers and the protocol.

The self-training engine (``pipeline.methods.duld``, driven by ``flows/duld.py``)
runs the same round for every method (paper 001, Sec 3.2 and Fig. 2):
keypoints of all training images -> **pseudo-labels** -> training -> evaluation.
Only the pseudo-labeller differs between D-ULD (K-means, Sec 3.2), Mallis (D)
(over-clustering, Table 1) and D-ULD++ (two-stage clustering, Sec 3.3.1), so
it is a small scikit-learn-style estimator:

* ``fit(keypoints, image_rows, seed)`` clusters the keypoint descriptors;
* ``predict(keypoints, image_rows)`` -> :class:`PseudoLabels`, one column per
  *training label* (``n_train_labels`` of them: the classes of the contrastive
  loss), at most one keypoint per image and label;
* ``landmark_centers_`` (K, D): the K landmark centroids that
  ``predict_landmarks`` reads out for evaluation (exemplar assignment);
* ``landmark_of_label_`` (n_train_labels,): the landmark each training label
  belongs to (identity when training labels are the landmarks);
* ``get_state`` / ``set_state``: the fitted arrays, saved with each checkpoint
  so that a resumed round starts from the same labeller without re-fitting.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.clustering import nearest_centroid
from pipeline.errors import ConfigError
from pipeline.methods.exemplar import exemplar_assign


@dataclass
class KeypointSet:
    """Detected keypoints of many images, flat: one row per keypoint.

    ``rows`` (n,) store row of the image; ``xy`` (n, 2) crop pixels (cell
    centres); ``score`` (n,) heatmap value; ``desc`` (n, D) unit descriptors;
    ``peak`` (n,) bool or None: whether the keypoint is a local maximum of the
    heatmap at ``DULDConfig.cluster_nms_radius`` (None: not recorded, i.e. every
    keypoint counts as one).
    """

    rows: np.ndarray
    xy: np.ndarray
    score: np.ndarray
    desc: np.ndarray
    peak: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, mask: np.ndarray) -> "KeypointSet":
        """The keypoints where ``mask`` (n,) bool is True."""
        m = np.asarray(mask, bool)
        return KeypointSet(self.rows[m], self.xy[m], self.score[m], self.desc[m], None if self.peak is None else self.peak[m])

    def peaks(self) -> "KeypointSet":
        """The local maxima only (every keypoint when ``peak`` was not recorded)."""
        return self if self.peak is None else self.subset(self.peak)

    def arrays(self) -> dict[str, np.ndarray]:
        """The fields as named arrays (``np.savez``); :meth:`from_arrays` reads them back."""
        out = {"rows": self.rows, "xy": self.xy, "score": self.score, "desc": self.desc}
        if self.peak is not None:
            out["peak"] = self.peak
        return out

    @classmethod
    def from_arrays(cls, z: Any) -> "KeypointSet":
        """From a mapping of :meth:`arrays`' names (an ``np.load`` archive; ``peak`` optional)."""
        names = set(getattr(z, "files", z))
        return cls(z["rows"], z["xy"], z["score"], z["desc"], z["peak"] if "peak" in names else None)


@dataclass
class PseudoLabels:
    """Per training image (store row) at most one keypoint per training label.

    ``rows`` (N,) store rows; ``coords`` (N, L, 2) crop pixels (NaN where
    absent); ``present`` (N, L); ``distance`` (N, L) squared distance of the
    kept descriptor to its label's centroid. Column ``c`` holds training label
    ``c`` (L = ``n_labels``: K for D-ULD, M >> K for Mallis (D)).
    ``landmark_of`` (L,): the landmark (0..K-1) of each label; ``None`` means
    label ``c`` is landmark ``c``.
    """

    rows: np.ndarray
    coords: np.ndarray
    present: np.ndarray
    distance: np.ndarray
    landmark_of: np.ndarray | None = None
    _pos: dict[int, int] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def n_labels(self) -> int:
        return int(self.present.shape[1])

    def landmarks(self) -> np.ndarray:
        """(L,) landmark id of every label column."""
        return np.arange(self.n_labels) if self.landmark_of is None else np.asarray(self.landmark_of)

    def _positions(self) -> dict[int, int]:
        # Built once per round, not once per training step.
        if self._pos is None or len(self._pos) != len(self.rows):
            self._pos = {int(r): i for i, r in enumerate(self.rows)}
        return self._pos

    def lookup(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, 2) crop coords (0 where absent) and (B, L) presence for a batch."""
        pos = self._positions()
        missing = [int(r) for r in rows if int(r) not in pos]
        if missing:
            raise ConfigError(
                f"no pseudo-labels for store rows {missing[:5]}",
                where="PseudoLabels.lookup",
                fix="cluster the same images the round trains on",
            )
        idx = np.asarray([pos[int(r)] for r in rows])
        coords = np.nan_to_num(self.coords[idx], nan=0.0)
        return torch.from_numpy(coords).float(), torch.from_numpy(self.present[idx])


def exemplar_labels(
    keypoints: KeypointSet,
    centers: np.ndarray,
    image_rows: np.ndarray,
    labels: np.ndarray | None = None,
    sq_dist: np.ndarray | None = None,
    landmark_of: np.ndarray | None = None,
) -> PseudoLabels:
    """Exemplar assignment (paper 001, Sec 3.1): per image and label the keypoint nearest the centroid.

    ``centers`` (L, D) the training-label centroids; ``image_rows``: the store rows of
    the images (every image gets a row, possibly with no present label);
    ``labels``/``sq_dist``: the keypoints' nearest-centroid assignment when the
    caller already has it.
    """
    n_labels = len(centers)
    image_rows = np.asarray(image_rows, dtype=np.int64)
    pos = np.full(int(max(image_rows.max(initial=-1), keypoints.rows.max(initial=-1))) + 1, -1, np.int64)
    pos[image_rows] = np.arange(len(image_rows))
    img = pos[keypoints.rows]
    if (img < 0).any():
        raise ConfigError("keypoints belong to images outside image_rows", where="pseudo-labelling")
    if labels is None or sq_dist is None:
        labels, sq_dist = nearest_centroid(keypoints.desc, centers, use_gpu=False)
    assign = exemplar_assign(img, labels, sq_dist, len(image_rows), n_labels)  # (N, L) index into keypoints or -1
    present = assign >= 0
    safe = np.where(present, assign, 0)
    coords = np.where(present[..., None], keypoints.xy[safe], np.nan).astype(np.float32)
    dist = np.where(present, sq_dist[safe], np.nan).astype(np.float32)
    return PseudoLabels(image_rows, coords, present, dist, landmark_of=landmark_of)


class PseudoLabeller(ABC):
    """Base of the pseudo-labellers (see the module docstring for the contract).

    Subclasses set, in :meth:`fit` (or :meth:`set_state`), ``landmark_centers_`` (K, D),
    ``label_centers_`` (L, D) and ``landmark_of_label_`` (L,); everything else follows.
    """

    name: str = ""
    landmark_centers_: np.ndarray
    label_centers_: np.ndarray
    landmark_of_label_: np.ndarray

    @abstractmethod
    def fit(self, keypoints: KeypointSet, image_rows: np.ndarray, seed: int) -> "PseudoLabeller":
        """Cluster the descriptors of ``keypoints`` (of the images ``image_rows``)."""

    @abstractmethod
    def get_params(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able): ``type(self)(**get_params())`` is an unfitted copy."""

    def _check_fitted(self) -> None:
        if getattr(self, "label_centers_", None) is None:
            raise ConfigError(f"{type(self).__name__} is not fitted", where=f"{type(self).__name__}.predict",
                              fix="call fit (or set_state with a checkpoint's state) first")

    @property
    def n_train_labels(self) -> int:
        """Number of training labels L (classes of the contrastive loss)."""
        self._check_fitted()
        return int(len(self.label_centers_))

    @property
    def k(self) -> int:
        """Number of landmarks K read out for evaluation."""
        self._check_fitted()
        return int(len(self.landmark_centers_))

    def assign(self, keypoints: KeypointSet) -> tuple[np.ndarray, np.ndarray]:
        """Per keypoint its training label (nearest label centroid) and squared distance to it."""
        self._check_fitted()
        return nearest_centroid(keypoints.desc, self.label_centers_, use_gpu=False)

    def predict(self, keypoints: KeypointSet, image_rows: np.ndarray) -> PseudoLabels:
        """Pseudo-labels: per image and training label the keypoint nearest the label's centroid."""
        labels, sq = self.assign(keypoints)
        landmark_of = None if self._labels_are_landmarks() else self.landmark_of_label_
        return exemplar_labels(keypoints, self.label_centers_, image_rows, labels=labels, sq_dist=sq, landmark_of=landmark_of)

    def fit_predict(self, keypoints: KeypointSet, image_rows: np.ndarray, seed: int) -> PseudoLabels:
        return self.fit(keypoints, image_rows, seed).predict(keypoints, image_rows)

    def _labels_are_landmarks(self) -> bool:
        return len(self.landmark_of_label_) == len(self.landmark_centers_) and bool(
            np.array_equal(self.landmark_of_label_, np.arange(len(self.landmark_centers_)))
        )

    # --------------------------------------------------------------- checkpoints
    def get_state(self) -> dict[str, np.ndarray]:
        """The fitted arrays (saved with a checkpoint)."""
        self._check_fitted()
        return {
            "landmark_centers": np.asarray(self.landmark_centers_, np.float32),
            "label_centers": np.asarray(self.label_centers_, np.float32),
            "landmark_of_label": np.asarray(self.landmark_of_label_, np.int64),
        }

    def set_state(self, state: dict[str, np.ndarray]) -> "PseudoLabeller":
        """Restore :meth:`get_state`'s arrays. A state with only ``landmark_centers``
        (checkpoints written before labellers existed) means labels = landmarks."""
        if "landmark_centers" not in state:
            raise ConfigError("a labeller state needs 'landmark_centers'", where=f"{type(self).__name__}.set_state",
                              fix="load the state a checkpoint's labeller.npz (or centroids.npy) holds")
        centers = np.asarray(state["landmark_centers"], np.float32)
        self.landmark_centers_ = centers
        self.label_centers_ = np.asarray(state.get("label_centers", centers), np.float32)
        self.landmark_of_label_ = np.asarray(state.get("landmark_of_label", np.arange(len(centers))), np.int64)
        return self

    def to_json(self) -> dict[str, Any]:
        """``{"name": ..., **params}`` (recorded in the run's config.json; see ``make_labeller``)."""
        return {"name": self.name, **self.get_params()}
