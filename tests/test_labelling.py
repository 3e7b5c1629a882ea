"""Pseudo-labellers: K-means (D-ULD) bit-identical to the code it replaced; over-clustering (Mallis (D))."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.labelling import KeypointSet, KMeansLabeller, OverClusterLabeller, allocate_subclusters, make_labeller

REFERENCE = Path(__file__).parent / "data" / "duld_kmeans_labels_reference.npz"


def constructed_keypoints(seed: int = 0, n_images: int = 30, per_image: int = 12, d: int = 8, k: int = 5) -> KeypointSet:
    """Unit descriptors around ``k`` random part directions, 12 keypoints on each of images 3..32."""
    rng = np.random.default_rng(seed)
    parts = rng.normal(size=(k, d)).astype(np.float32)
    rows = np.repeat(np.arange(3, 3 + n_images), per_image)
    which = rng.integers(0, k, size=len(rows))
    desc = parts[which] + 0.3 * rng.normal(size=(len(rows), d)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    xy = rng.uniform(0, 32, size=(len(rows), 2)).astype(np.float32)
    score = rng.uniform(size=len(rows)).astype(np.float32)
    return KeypointSet(rows.astype(np.int64), xy, score, desc.astype(np.float32))


def test_kmeans_labeller_is_bit_identical_to_the_former_duld_code_path():
    # The reference was written by the code this labeller replaced (commit 9d7dec0):
    #   km = pipeline.methods.duld.cluster_keypoints(kp, DULDConfig(k=5), seed=1234)   # FaissKMeans
    #   labels, sq = nearest_centroid(kp.desc, km.cluster_centers_, use_gpu=False)
    #   pl = pipeline.methods.duld.pseudo_labels(kp, km.cluster_centers_, np.arange(2, 34), labels=labels, sq_dist=sq)
    # on constructed_keypoints(); images 2 and 33 have no keypoints.
    ref = np.load(REFERENCE)
    kp, image_rows = constructed_keypoints(), np.arange(2, 34)
    lab = KMeansLabeller(k=5, n_init=3, max_iter=50).fit(kp, image_rows, seed=1234)
    assert np.array_equal(lab.landmark_centers_, ref["centers"]) and lab.n_train_labels == 5 and lab.k == 5
    labels, sq = lab.assign(kp)
    assert np.array_equal(labels, ref["labels"]) and np.array_equal(sq, ref["sq"])
    pl = lab.predict(kp, image_rows)
    assert np.array_equal(pl.rows, ref["rows"]) and np.array_equal(pl.present, ref["present"])
    assert np.array_equal(pl.coords, ref["coords"], equal_nan=True) and np.array_equal(pl.distance, ref["distance"], equal_nan=True)
    assert pl.landmark_of is None and pl.landmarks().tolist() == [0, 1, 2, 3, 4]
    # a labeller restored from its checkpoint state (or from a pre-labeller centroids.npy) labels the same
    for state in (lab.get_state(), {"landmark_centers": ref["centers"]}):
        again = make_labeller(lab.to_json()).set_state(state).predict(kp, image_rows)
        assert np.array_equal(again.coords, pl.coords, equal_nan=True) and np.array_equal(again.present, pl.present)


def test_keypoint_peaks_restrict_the_fit_and_survive_the_checkpoint_arrays():
    from pipeline.methods.duld import DULDConfig, cluster_keypoints

    kp = constructed_keypoints()
    # mark only the keypoints near part 0's descriptors as maxima: a 1-means fitted on them
    # must equal their mean direction, not that of every keypoint
    peak = kp.desc @ kp.desc[0] > 0.8
    marked = KeypointSet(kp.rows, kp.xy, kp.score, kp.desc, peak)
    assert len(marked.peaks()) == int(peak.sum()) < len(kp) and marked.peaks().peak.all()
    assert kp.peaks() is kp  # no flags recorded: every keypoint counts
    c = cluster_keypoints(marked, DULDConfig(k=1), seed=0).cluster_centers_[0]
    assert np.allclose(c, marked.desc[peak].mean(0), atol=1e-4)
    assert not np.allclose(c, kp.desc.mean(0), atol=1e-2)
    # the exemplar assignment still reads every keypoint
    lab = KMeansLabeller(k=1).fit(marked.peaks(), np.arange(3, 33), seed=0)
    assert lab.predict(marked, np.arange(3, 33)).present.all()
    again = KeypointSet.from_arrays(marked.arrays())
    assert np.array_equal(again.peak, peak) and np.array_equal(again.desc, kp.desc)
    assert KeypointSet.from_arrays(kp.arrays()).peak is None


def test_duld_module_keeps_the_old_names_as_thin_delegates():
    from pipeline.methods.duld import DULDConfig, cluster_keypoints, pseudo_labels

    ref = np.load(REFERENCE)
    kp = constructed_keypoints()
    assert np.array_equal(cluster_keypoints(kp, DULDConfig(k=5), seed=1234).cluster_centers_, ref["centers"])
    assert np.array_equal(pseudo_labels(kp, ref["centers"], np.arange(2, 34)).coords, ref["coords"], equal_nan=True)


def test_too_few_keypoints_and_unfitted_are_user_errors():
    kp = constructed_keypoints(n_images=1, per_image=3)
    with pytest.raises(ConfigError, match="fewer than k=5"):
        KMeansLabeller(k=5).fit(kp, np.array([3]), seed=0)
    with pytest.raises(ConfigError, match="not fitted"):
        OverClusterLabeller(k=2, m=4).predict(kp, np.array([3]))
    with pytest.raises(ConfigError, match="M >= K"):
        OverClusterLabeller(k=10, m=5)
    with pytest.raises(ConfigError, match="unknown pseudo-labeller"):
        make_labeller({"name": "nope"})


def test_allocate_subclusters_is_proportional_and_capped():
    assert allocate_subclusters(np.array([50, 30, 20]), 10).tolist() == [5, 3, 2]
    assert allocate_subclusters(np.array([97, 2, 1]), 10).tolist() == [8, 1, 1]  # everyone gets one
    assert allocate_subclusters(np.array([3, 100]), 50).tolist() == [1, 49]  # largest remainder
    assert allocate_subclusters(np.array([2, 10]), 10).tolist() == [2, 8]
    assert allocate_subclusters(np.array([2, 1]), 10).tolist() == [2, 1]  # fewer points than M
    assert allocate_subclusters(np.array([0, 5]), 3).tolist() == [0, 3]


def blobs_with_subblobs(seed: int = 0):
    """3 well-separated blobs (directions far apart), each made of 4 tight sub-blobs; 40 images."""
    rng = np.random.default_rng(seed)
    d = 6
    blob = np.eye(d, dtype=np.float32)[:3] * 10.0  # blob centres 10 apart
    sub = blob[:, None, :] + rng.normal(size=(3, 4, d)).astype(np.float32) * 1.5  # sub-blobs ~2 apart
    rows, desc, truth, truth_sub = [], [], [], []
    for img in range(40):
        for b in range(3):
            for s in range(4):
                rows.append(img)
                desc.append(sub[b, s] + rng.normal(size=d).astype(np.float32) * 0.1)
                truth.append(b)
                truth_sub.append(4 * b + s)
    n = len(rows)
    kp = KeypointSet(np.asarray(rows, np.int64), rng.uniform(0, 32, (n, 2)).astype(np.float32), np.ones(n, np.float32), np.asarray(desc, np.float32))
    return kp, np.asarray(truth), np.asarray(truth_sub)


def test_overcluster_labels_are_pure_and_k_readout_recovers_the_blobs():
    kp, truth, truth_sub = blobs_with_subblobs()
    image_rows = np.arange(40)
    lab = OverClusterLabeller(k=3, m=12, n_init=2).fit(kp, image_rows, seed=0)
    assert lab.k == 3 and lab.n_train_labels == 12
    assert lab.landmark_of_label_.tolist() == sorted(lab.landmark_of_label_.tolist())
    # the K read-out recovers the 3 blobs: one landmark centroid per blob
    from pipeline.clustering import nearest_centroid

    landmark, _ = nearest_centroid(kp.desc, lab.landmark_centers_, use_gpu=False)
    for b in range(3):
        assert len(set(landmark[truth == b])) == 1
    assert len(set(landmark)) == 3
    # each of the M training labels is pure (one blob), and every blob gets 4 labels (its sub-blobs)
    labels, _ = lab.assign(kp)
    for c in range(12):
        assert len(set(truth[labels == c])) == 1
        assert set(landmark[labels == c]) == {lab.landmark_of_label_[c]}  # the label's landmark is its blob's
    assert np.bincount(lab.landmark_of_label_, minlength=3).tolist() == [4, 4, 4]
    # over-clustering recovers the sub-blobs themselves (well separated at this scale)
    assert all(len(set(labels[truth_sub == s])) == 1 for s in range(12))
    # pseudo-labels: M columns, each image has all 12 sub-blob keypoints, landmark ids ride along
    pl = lab.predict(kp, image_rows)
    assert pl.n_labels == 12 and pl.present.all()
    assert pl.landmarks().tolist() == lab.landmark_of_label_.tolist()
    coords, present = pl.lookup(torch.tensor([5, 0]))
    assert coords.shape == (2, 12, 2) and present.all()
    # checkpoint state round trip
    again = make_labeller(lab.to_json()).set_state(lab.get_state())
    assert np.array_equal(again.predict(kp, image_rows).coords, pl.coords) and again.k == 3


def test_self_training_step_accepts_m_label_columns():
    from pipeline.heads import ULDHeadsConfig
    from pipeline.methods.duld import DULDConfig, build_model, seeded_generator, self_training_step

    shapes = {"a@t50": (8, 4, 4), "b@t50": (6, 8, 8)}
    g = torch.Generator().manual_seed(0)
    batch = {"index": torch.arange(3), "features": {k: torch.randn(3, *s, generator=g) for k, s in shapes.items()}}
    model = build_model(ULDHeadsConfig.from_feature_shapes(shapes, crop_size=16, channels=8, hidden=8, descriptor_dim=4), 0)
    coords = torch.rand(3, 20, 2, generator=g) * 16  # 20 training labels for K = 4 landmarks
    present = torch.rand(3, 20, generator=g) > 0.3
    out = self_training_step(model, batch, coords, present, DULDConfig(k=4, views=None), seeded_generator(0, "round", 1))
    assert torch.isfinite(out["loss"]) and out["contrastive"].item() > 0
    out["loss"].backward()
