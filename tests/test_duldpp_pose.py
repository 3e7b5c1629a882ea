"""Fig. 7's pose analysis (pipeline.evaluation.pose_clusters): majority mapping, per-bin accuracy, the table and plot."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.evaluation import nme_by_yaw, yaw_bin_labels
from pipeline.evaluation.pose_clusters import (
    OVERALL,
    PoseBins,
    clustering_accuracy,
    majority_mapping,
    plot_pose_clusters,
    pose_bins,
    pose_cluster_frame,
)


def test_yaw_bins_are_the_evaluators_bins():
    yaw = np.array([-90.0, -60.0, -54.0, -17.9, 0.0, 18.0, 53.9, 90.0, np.nan, 95.0])
    pb = pose_bins(yaw, None)
    assert pb.source == "yaw" and pb.labels == yaw_bin_labels()
    assert pb.bins.tolist() == [0, 0, 1, 2, 2, 3, 3, 4, -1, -1]
    # the same bins nme_by_yaw counts (its per-bin image counts, with every image's error 1)
    counts = [n for _, _, n in nme_by_yaw(np.ones(len(yaw)), yaw)]
    assert counts == np.bincount(pb.bins[pb.bins >= 0], minlength=5).tolist()


def test_pose_classes_when_yaw_is_unknown_and_none_without_either():
    pb = pose_bins(np.full(4, np.nan), np.array([0, 4, -1, 2]), class_names=["lp", "l", "f", "r", "rp"])
    assert pb.source == "pose_class" and pb.labels == ["lp", "l", "f", "r", "rp"] and pb.bins.tolist() == [0, 4, -1, 2]
    assert pose_bins(np.full(3, np.nan), np.full(3, -1)) is None
    assert pose_bins(None, None) is None
    with pytest.raises(ConfigError):
        pose_bins(None, np.array([0, 6]), class_names=["a", "b"])


def test_majority_mapping_and_accuracy_by_hand():
    # 3 clusters over 3 bins: cluster 0 mostly bin 2, cluster 1 mostly bin 0, cluster 2 only unknown-bin images
    clusters = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2])
    bins = np.array([2, 2, 1, 0, 0, 0, 1, -1, -1])
    mapping = majority_mapping(clusters, bins, q=4, n_bins=3)
    assert mapping.tolist() == [2, 0, -1, -1]  # clusters without known images map to nothing
    n, c = clustering_accuracy(clusters, bins, mapping, 3)
    assert n.tolist() == [3, 2, 2] and c.tolist() == [3, 0, 2]
    with pytest.raises(ConfigError):
        majority_mapping(np.array([5]), np.array([0]), q=4, n_bins=3)


def test_frame_maps_on_train_and_scores_test_with_that_mapping(tmp_path):
    labels = ["a", "b"]
    train = PoseBins(np.array([0, 0, 1, 1, 1]), labels, "yaw")
    train_clusters = np.array([1, 1, 0, 0, 1])  # cluster 1 -> bin 0 (2 of 3), cluster 0 -> bin 1
    test = PoseBins(np.array([0, 1, 1, 0]), labels, "yaw")
    test_clusters = np.array([0, 0, 0, 1])  # scored with the train mapping: bin 0 1/2, bin 1 2/2
    f = pose_cluster_frame(train_clusters, train, test_clusters, test, q=2)
    assert len(f) == 2 * (len(labels) + 1)
    tr = f[f["split"] == "train"].set_index("bin")
    assert tr.loc["a", "accuracy"] == 1.0 and tr.loc["b", "accuracy"] == pytest.approx(2 / 3)
    assert tr.loc[OVERALL, ["n_images", "n_correct"]].tolist() == [5, 4] and tr.loc["a", "clusters"] == [1]
    te = f[f["split"] == "test"].set_index("bin")
    assert te.loc["a", "accuracy"] == 0.5 and te.loc["b", "accuracy"] == 1.0 and te.loc[OVERALL, "accuracy"] == 0.75
    # a perfect clustering scores 1 everywhere, a single cluster the majority bin's share
    perfect = pose_cluster_frame(train.bins, train, None, None, q=2)
    assert (perfect["accuracy"] == 1.0).all()
    one = pose_cluster_frame(np.zeros(5, int), train, None, None, q=1).set_index("bin")
    assert one.loc[OVERALL, "accuracy"] == pytest.approx(3 / 5)

    import pandas as pd

    from storage.tables import read_table, write_table

    table = pd.concat([f.assign(run_id="r", method="duld++", stage=s, round=r, dataset="synthetic") for s, r in (("proxy", 2), ("duldpp", 3))])
    path = write_table(table, tmp_path / "pose-clusters.parquet", "pose_clusters")
    back = read_table(path, "pose_clusters")
    assert back["clusters"].map(list).tolist() == table["clusters"].tolist()
    png = plot_pose_clusters(back, tmp_path / "fig" / "pose.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
