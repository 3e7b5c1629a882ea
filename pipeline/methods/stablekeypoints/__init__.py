"""StableKeypoints (Hedlin et al., seed 002): landmarks from tokens optimised against a UNet's cross-attention.

``attention`` (reading the maps through diffusers attention processors),
``losses`` (localisation + equivariance), ``selection`` (K of N tokens),
``model`` (Stable Diffusion or the pixel context-DDPM behind one interface),
``estimator`` (:class:`StableKeypoints`: fit / select / predict).
"""

from pipeline.methods.stablekeypoints.estimator import StableKeypoints, StableKeypointsConfig
from pipeline.methods.stablekeypoints.model import ConditionedUNet, load_conditioned_unet

__all__ = ["ConditionedUNet", "StableKeypoints", "StableKeypointsConfig", "load_conditioned_unet"]
