"""Choosing K landmark-like clusters among M candidates (pipeline.clustering.selection) and its use in ZeroShot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.clustering import FaissKMeans
from pipeline.clustering.selection import ClusterSpread, cluster_spread, select_compact
from pipeline.errors import ConfigError
from pipeline.methods.zeroshot import ZeroShot


def test_cluster_spread_by_hand() -> None:
    # image 0: cluster 0 at (0,0) and (2,0) -> rms 1; cluster 1 at (0,0), (0,8) -> rms 4
    # image 1: cluster 0 at (5,5) and (5,7) -> rms 1; cluster 1 one point (rms undefined); cluster 2 absent
    labels = np.array([0, 0, 1, 1, 0, 0, 1])
    owner = np.array([0, 0, 0, 0, 1, 1, 1])
    xy = np.array([[0, 0], [2, 0], [0, 0], [0, 8], [5, 5], [5, 7], [9, 9]], float)
    st = cluster_spread(labels, owner, xy, n_clusters=3, n_images=2)
    np.testing.assert_allclose(st.presence, [1.0, 1.0, 0.0])
    np.testing.assert_allclose(st.spread[:2], [1.0, 4.0])
    assert st.spread[2] == np.inf
    np.testing.assert_allclose(st.members, [2.0, 1.5, 0.0])


def test_cluster_spread_rejects_inconsistent_input() -> None:
    with pytest.raises(ConfigError):
        cluster_spread(np.array([0, 1]), np.array([0]), np.zeros((2, 2)), 2, 1)
    with pytest.raises(ConfigError):
        cluster_spread(np.array([0, 5]), np.array([0, 0]), np.zeros((2, 2)), 2, 1)


def test_select_compact_prefers_present_compact_clusters_and_fills_up() -> None:
    st = ClusterSpread(
        presence=np.array([1.0, 0.9, 0.3, 1.0, 0.5]),
        spread=np.array([5.0, 1.0, 0.5, 2.0, 3.0]),
        members=np.ones(5),
    )
    # eligible (presence >= 0.8): 1 (1.0), 3 (2.0), 0 (5.0); cluster 2 is compact but rare
    np.testing.assert_array_equal(select_compact(st, 2, 0.8), [1, 3])
    np.testing.assert_array_equal(select_compact(st, 3, 0.8), [1, 3, 0])
    # more than the eligible ones: the most present of the rest fill up
    np.testing.assert_array_equal(select_compact(st, 4, 0.8), [1, 3, 0, 4])
    np.testing.assert_array_equal(select_compact(st, 2, 0.0), [2, 1])
    with pytest.raises(ConfigError):
        select_compact(st, 6, 0.8)


def _parts_and_regions(n_images: int = 40, seed: int = 0):
    """Descriptors of 4 kinds of pixel: kinds 0, 1 sit at one place per image (parts), kinds 2, 3
    anywhere in the crop (regions, and more of them)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(4, 8) * 3.0
    desc, owner, xy, kind = [], [], [], []
    for i in range(n_images):
        for k, n in ((0, 5), (1, 5), (2, 40), (3, 40)):
            where = np.array([[10.0, 10.0], [40.0, 20.0]])[k] + rng.normal(0, 1.0, (n, 2)) if k < 2 else rng.uniform(0, 64, (n, 2))
            desc.append(centres[k] + rng.normal(0, 0.1, (n, 8)))
            owner.append(np.full(n, i))
            xy.append(where)
            kind.append(np.full(n, k))
    return (np.concatenate(desc).astype(np.float32), np.concatenate(owner), np.concatenate(xy), np.concatenate(kind), centres)


def test_zeroshot_candidates_keep_the_part_clusters() -> None:
    desc, owner, xy, _, centres = _parts_and_regions()
    model = ZeroShot(n_clusters=2, n_candidates=4, min_presence=0.8, seed=0, use_gpu=False).fit_descriptors(desc, owner, xy)
    # the kept centroids are the two part centres (in spread order), not the bigger regions
    d = np.linalg.norm(model.cluster_centers_[:, None] - centres[None], axis=-1)
    assert sorted(d.argmin(1).tolist()) == [0, 1]
    assert model.cluster_centers_.shape == (2, 8)
    assert set(model.train_labels_.tolist()) <= {0, 1}
    # the paper's rule (no candidates) is plain K-means with K clusters, as before
    paper = ZeroShot(n_clusters=2, seed=0, use_gpu=False).fit_descriptors(desc)
    ref = FaissKMeans(2, n_init=3, max_iter=50, seed=0, use_gpu=False).fit(desc)
    np.testing.assert_array_equal(paper.cluster_centers_, ref.cluster_centers_)


def test_zeroshot_candidates_need_sample_positions() -> None:
    desc, *_ = _parts_and_regions(n_images=4)
    with pytest.raises(ConfigError, match="position"):
        ZeroShot(n_clusters=2, n_candidates=4, use_gpu=False).fit_descriptors(desc)
    with pytest.raises(ConfigError):
        ZeroShot(n_clusters=5, n_candidates=4)


def test_zeroshot_candidates_round_trip(tmp_path) -> None:
    desc, owner, xy, _, _ = _parts_and_regions(n_images=10)
    model = ZeroShot(n_clusters=2, n_candidates=4, min_presence=0.7, seed=0, use_gpu=False).fit_descriptors(desc, owner, xy)
    model.save_pretrained(tmp_path)
    back = ZeroShot.from_pretrained(tmp_path)
    assert (back.n_candidates, back.min_presence) == (4, 0.7)
    np.testing.assert_array_equal(back.cluster_centers_, model.cluster_centers_)
    chosen = json.loads((tmp_path / ZeroShot.selection_name).read_text())
    assert chosen["selected"] == model.selected_.tolist() and len(chosen["spread"]) == 4


def _moving_and_static_clusters(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Member pixels of 5 clusters over ``n`` images: 4 move with a shared per-image pose (parts of a
    turning object), cluster 4 stays at one crop position with small jitter (a background blob)."""
    rng = np.random.default_rng(seed)
    pose = rng.uniform(-1, 1, n)
    base = np.array([[20.0, 20.0], [40.0, 20.0], [30.0, 30.0], [30.0, 42.0], [5.0, 5.0]])
    gain = np.array([8.0, 8.0, 10.0, 6.0, 0.0])  # px of horizontal travel per unit pose
    labels, owner, xy = [], [], []
    for i in range(n):
        for c in range(5):
            centre = base[c] + [gain[c] * pose[i], 0.0] + rng.normal(0, 1.0, 2)
            pts = centre + rng.normal(0, 0.5 if c == 4 else 1.5, (4, 2))  # the static blob is the most compact
            labels += [c] * 4
            owner += [i] * 4
            xy.append(pts)
    return np.array(labels), np.array(owner), np.concatenate(xy)


def test_motion_coherence_separates_moving_parts_from_a_static_blob() -> None:
    labels, owner, xy = _moving_and_static_clusters()
    stats = cluster_spread(labels, owner, xy, 5, 60)
    assert stats.coherence is not None
    assert (stats.coherence[:4] > 0.7).all(), stats.coherence  # x travel 6-10 px against ~1.5 px of noise per axis
    assert stats.coherence[4] < 0.3, stats.coherence
    # the static blob is the most compact cluster: spread alone keeps it ...
    assert 4 in select_compact(stats, 3, min_presence=0.8)
    # ... coherence drops it, and it only fills up when too few coherent clusters remain
    keep = select_compact(stats, 3, min_presence=0.8, min_coherence=0.5)
    assert 4 not in keep and len(set(keep.tolist())) == 3
    assert select_compact(stats, 5, min_presence=0.8, min_coherence=0.5)[-1] == 4
    assert "coherence" in stats.to_json()


def test_motion_coherence_is_not_measured_on_too_few_images() -> None:
    from pipeline.clustering.selection import motion_coherence

    xy = np.zeros((3, 4, 2))
    assert (motion_coherence(xy, np.ones((3, 4), bool)) == 1.0).all()
    with pytest.raises(ConfigError):
        select_compact(ClusterSpread(np.ones(3), np.ones(3), np.ones(3)), 2, min_coherence=1.5)
