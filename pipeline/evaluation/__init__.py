"""Evaluation core: forward/backward NME (ridge protocol), yaw bins, CED, Hungarian accuracy."""

from pipeline.evaluation.nme import (
    YAW_EDGES,
    EvalData,
    HungarianResult,
    NMEReport,
    NMEResult,
    Ridge,
    ced_curve,
    evaluate_nme,
    hungarian_accuracy,
    nme_by_yaw,
    normaliser_to_unit,
    to_unit_crop,
    yaw_bin_labels,
)
from pipeline.evaluation.protocols import BOX_RULES, PROTOCOLS, EvaluationProtocol, LeastSquares, get_protocol

__all__ = [
    "BOX_RULES",
    "PROTOCOLS",
    "EvaluationProtocol",
    "LeastSquares",
    "get_protocol",
    "YAW_EDGES",
    "EvalData",
    "HungarianResult",
    "NMEReport",
    "NMEResult",
    "Ridge",
    "ced_curve",
    "evaluate_nme",
    "hungarian_accuracy",
    "nme_by_yaw",
    "normaliser_to_unit",
    "to_unit_crop",
    "yaw_bin_labels",
]
