"""Algorithms of unsupervised landmark discovery with diffusion features.

Sub-packages, one job each:

- ``datasets``: loaders for real on-disk layouts -> canonical manifests; the
  synthetic 3-D head renderer; the shared crop step.
- ``backbones``: frozen diffusion UNets that return named hyperfeature maps.
- ``clustering``: FAISS k-means (GPU when present) and cluster quality.
- ``methods``: ZeroShot and friends, as functions of cached features.
- ``heads``: aggregator, detector and descriptor heads, losses.
- ``evaluation``: forward/backward NME and the field's other figures.
- ``predictor``: :class:`LandmarkPredictor`, a trained method as a folder a user
  can copy, run on new images (``from pipeline import LandmarkPredictor``).

Nothing here knows about Prefect or the workspace layout: orchestration lives in
``flows``, persistence in ``storage``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import pipeline` stays cheap (no torch) for the modules that need none of it.
    if name == "LandmarkPredictor":
        from pipeline.predictor import LandmarkPredictor

        return LandmarkPredictor
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
