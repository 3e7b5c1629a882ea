"""Pose clusters against known poses: paper 001's Fig. 7 analysis ("Effect of TSC-guided Self-Training").

D-ULD++ clusters its images' pose codes into Q pose clusters. Where the images' poses are
known (synthetic heads and LS3D: a yaw angle; MTFL: one of five head-pose classes), the
paper maps each cluster to the pose range the majority of its images belong to and reports,
per range and overall, the share of images whose cluster is mapped to their own range
("clustering accuracy"). Pure functions: cluster ids and pose bins in, arrays / a long
DataFrame out; the flow (``flows.duldpp_stages``) supplies the clusters of each round and
writes the table (kind ``pose_clusters``) and the figure.

The mapping is fitted on the training images only and applied unchanged to the test
images, so the test accuracy does not re-fit anything on the split it scores. A cluster
without training images maps to no bin (-1): its test images count as misses. Yaw is
binned with the evaluator's 5 equal bins over [-90, 90] degrees
(:data:`pipeline.evaluation.nme.YAW_EDGES`, the bins of ``nme_by_yaw``), so the pose
analysis and the per-yaw-bin NME talk about the same ranges; the paper's Fig. 7 uses
LS3D's five ranges (-90/-60/-30/30/60/90), which ``edges`` can be set to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError
from pipeline.evaluation.nme import YAW_EDGES, yaw_bin_labels

OVERALL = "overall"


@dataclass(frozen=True)
class PoseBins:
    """Known pose bin per image: ``bins`` (N,) in [0, len(labels)) or -1 (unknown), their labels, the source."""

    bins: np.ndarray
    labels: list[str]
    source: str  # "yaw" | "pose_class"

    @property
    def known(self) -> np.ndarray:
        return self.bins >= 0


def pose_bins(yaw: np.ndarray | None, pose_class: np.ndarray | None, edges: tuple[float, ...] = YAW_EDGES,
              class_names: list[str] | None = None) -> PoseBins | None:
    """Bin images by yaw where any yaw is known, else by annotated pose class; None when neither is known.

    ``yaw`` (N,) degrees or NaN (bins as :func:`pipeline.evaluation.nme_by_yaw`: right-open,
    the last bin closed; outside ``edges`` = unknown). ``pose_class`` (N,) ints, -1 unknown;
    ``class_names`` labels them (default ``class <c>``).
    """
    if yaw is not None:
        y = np.asarray(yaw, np.float64)
        if np.isfinite(y).any():
            inside = np.isfinite(y) & (y >= edges[0]) & (y <= edges[-1])
            b = np.digitize(np.clip(np.nan_to_num(y), edges[0], np.nextafter(edges[-1], -np.inf)), edges) - 1
            return PoseBins(np.where(inside, b, -1).astype(np.int64), yaw_bin_labels(edges), "yaw")
    if pose_class is not None:
        c = np.asarray(pose_class, np.int64)
        if (c >= 0).any():
            n = int(c.max()) + 1 if class_names is None else len(class_names)
            if int(c.max()) >= n:
                raise ConfigError(f"pose class {int(c.max())} has no name among {len(class_names)} class names", where="pose_bins")
            labels = list(class_names) if class_names is not None else [f"class {i}" for i in range(n)]
            return PoseBins(np.where(c >= 0, c, -1), labels, "pose_class")
    return None


def majority_mapping(clusters: np.ndarray, bins: np.ndarray, q: int, n_bins: int) -> np.ndarray:
    """(Q,) the bin most of each cluster's images (with a known bin) are in; -1 for a cluster without any.

    Ties go to the lower bin (``argmax``), which makes the mapping a function of the counts only.
    """
    clusters, bins = np.asarray(clusters, np.int64), np.asarray(bins, np.int64)
    if clusters.shape != bins.shape:
        raise ConfigError(f"clusters {clusters.shape} and bins {bins.shape} differ", where="majority_mapping")
    if len(clusters) and (clusters.min() < 0 or clusters.max() >= q):
        raise ConfigError(f"pose clusters must lie in [0, {q})", where="majority_mapping")
    ok = bins >= 0
    counts = np.zeros((int(q), int(n_bins)), np.int64)
    np.add.at(counts, (clusters[ok], bins[ok]), 1)
    return np.where(counts.sum(1) > 0, counts.argmax(1), -1)


def clustering_accuracy(clusters: np.ndarray, bins: np.ndarray, mapping: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per bin: (n_images (n_bins,), n_correct (n_bins,)) of the images with a known bin; an image is
    correct when its cluster is mapped to its bin. The overall figures are the sums."""
    clusters, bins = np.asarray(clusters, np.int64), np.asarray(bins, np.int64)
    ok = bins >= 0
    hit = ok & (np.asarray(mapping)[clusters] == bins)
    n = np.bincount(bins[ok], minlength=n_bins)[:n_bins]
    c = np.bincount(bins[hit], minlength=n_bins)[:n_bins]
    return n, c


def pose_cluster_frame(train_clusters: np.ndarray, train: PoseBins, test_clusters: np.ndarray | None, test: PoseBins | None,
                       q: int) -> pd.DataFrame:
    """The long table of one evaluation (no run columns): per split, one row per bin and one ``overall`` row.

    ``*_clusters`` (N,) pose cluster of each image of the split, aligned with that split's
    ``PoseBins``; the mapping comes from the train split (:func:`majority_mapping`).
    """
    nb = len(train.labels)
    mapping = majority_mapping(train_clusters, train.bins, q, nb)
    rows = []
    splits = [("train", train_clusters, train)] + ([("test", test_clusters, test)] if test is not None and test_clusters is not None else [])
    for split, clusters, pb in splits:
        if pb.labels != train.labels:
            raise ConfigError(f"the {split} split's pose bins {pb.labels} are not the train split's {train.labels}", where="pose_cluster_frame")
        n, c = clustering_accuracy(clusters, pb.bins, mapping, nb)
        for b in range(nb):
            rows.append({"split": split, "pose_source": train.source, "q": int(q), "bin_index": b, "bin": train.labels[b], "n_images": int(n[b]),
                         "n_correct": int(c[b]), "accuracy": float(c[b] / n[b]) if n[b] else float("nan"),
                         "clusters": [int(u) for u in np.flatnonzero(mapping == b)]})
        total = int(n.sum())
        rows.append({"split": split, "pose_source": train.source, "q": int(q), "bin_index": -1, "bin": OVERALL, "n_images": total,
                     "n_correct": int(c.sum()), "accuracy": float(c.sum() / total) if total else float("nan"),
                     "clusters": [int(u) for u in np.flatnonzero(mapping >= 0)]})
    return pd.DataFrame.from_records(rows)


def plot_pose_clusters(table: pd.DataFrame, path: str | Path, title: str = "pose clusters vs pose bins") -> Path:
    """Fig. 7 of paper 001 from a ``pose_clusters`` table: clustering accuracy (%) per bin and overall,
    one line per evaluated stage / round, one panel per split. Written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from storage.atomic import atomic_path

    if table.empty:
        raise ConfigError("no pose-cluster rows to plot", where="plot_pose_clusters")
    splits = [s for s in ("train", "test") if s in set(table["split"])]
    bins = table.loc[table["bin_index"] >= 0].sort_values("bin_index")["bin"].drop_duplicates().tolist() + [OVERALL]
    evals = table[["stage", "round"]].drop_duplicates().sort_values("round")
    fig, axes = plt.subplots(1, len(splits), figsize=(4.6 * len(splits), 3.6), dpi=110, squeeze=False)
    x = np.arange(len(bins))
    for ax, split in zip(axes[0], splits):
        part = table[table["split"] == split]
        for _, ev in evals.iterrows():
            sub = part[(part["stage"] == ev["stage"]) & (part["round"] == ev["round"])].set_index("bin")["accuracy"]
            y = [100 * sub.get(b, np.nan) for b in bins]
            # the bins as a line, "overall" as a point of its own (it is not a further pose range)
            line, = ax.plot(x[:-1], y[:-1], marker="o", label=f"{ev['stage']} {int(ev['round'])}")
            ax.plot(x[-1:], y[-1:], marker="s", color=line.get_color())
        ax.axvline(len(bins) - 1.5, color="0.6", lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(bins, fontsize=7, rotation=20)
        ax.set_ylim(0, 102)
        ax.set_ylabel("clustering accuracy (%)")
        ax.set_title(f"{split} split", fontsize=9)
        ax.grid(alpha=0.3)
    src = str(table["pose_source"].iloc[0])
    axes[0][0].set_xlabel("yaw bin (degrees)" if src == "yaw" else "pose class")
    axes[0][-1].legend(fontsize=7, title="stage round", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{title} (Q = {int(table['q'].iloc[0])}; majority bin per cluster, mapped on train)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
