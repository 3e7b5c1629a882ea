"""Clustering: FAISS k-means (k-means++ seeded), cluster quality indices, and the choice of K landmark-like clusters among M."""

from pipeline.clustering.kmeans import FaissKMeans, centroid_index, flat_index, kmeans_plusplus, nearest_centroid
from pipeline.clustering.quality import cluster_quality
from pipeline.clustering.selection import ClusterSpread, cluster_spread, select_compact

__all__ = [
    "ClusterSpread", "FaissKMeans", "centroid_index", "cluster_quality", "cluster_spread", "flat_index", "kmeans_plusplus",
    "nearest_centroid", "select_compact",
]
