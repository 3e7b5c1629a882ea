"""Pseudo-labellers of the self-training engine (one module each; see ``base`` for the contract).

``KMeansLabeller`` (D-ULD), ``OverClusterLabeller`` (Mallis (D)). A new labeller
registers itself with ``@register_labeller(name)`` in its module; import that
module here so ``make_labeller({"name": name, ...})`` finds it.
"""

from pipeline.labelling.base import KeypointSet, PseudoLabeller, PseudoLabels, exemplar_labels
from pipeline.labelling.kmeans import KMeansLabeller
from pipeline.labelling.overcluster import OverClusterLabeller, allocate_subclusters
from pipeline.labelling.registry import LABELLERS, make_labeller, register_labeller

__all__ = [
    "LABELLERS",
    "KMeansLabeller",
    "KeypointSet",
    "OverClusterLabeller",
    "PseudoLabeller",
    "PseudoLabels",
    "allocate_subclusters",
    "exemplar_labels",
    "make_labeller",
    "register_labeller",
]
