"""Landmarks through conditional image generation: Jakab et al. 2018 (seed 003) and C3 (seed 004).

One model (:class:`CondGenNet`: keypoint encoder -> Gaussian bottleneck,
appearance encoder, generator), two trainers (:class:`JakabLandmarks`,
:class:`C3Landmarks`), a perceptual loss on the project's own diffusion UNet.
"""

from pipeline.methods.condgen.estimators import (
    METHODS,
    C3Landmarks,
    CondGenConfig,
    CondGenLandmarks,
    CondGenNet,
    JakabLandmarks,
    make_estimator,
)
from pipeline.methods.condgen.perceptual import DiffusionPerceptualLoss

__all__ = [
    "METHODS", "C3Landmarks", "CondGenConfig", "CondGenLandmarks", "CondGenNet", "DiffusionPerceptualLoss", "JakabLandmarks", "make_estimator",
]
