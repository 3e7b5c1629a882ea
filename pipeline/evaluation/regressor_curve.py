"""NME against the number of images the regressors are fitted on.

The forward / backward protocol (method brief, "Evaluation protocol"; 001
Table 1 fits on 300 images) hides how much of a score comes from the linear
regressor having many images to fit: landmarks that are consistent across
images need few. This curve refits the protocol's regressors on subsets of
10 / 30 / 100 / 300 training images (seeded, repeats averaged) and scores the
same test images each time.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from pipeline.errors import ConfigError
from pipeline.evaluation.nme import EvalData, MissingRule, evaluate_nme
from pipeline.evaluation.protocols import EvaluationProtocol

DEFAULT_SIZES: tuple[int, ...] = (10, 30, 100, 300)


def nme_by_regressor_size(
    train: EvalData,
    test: EvalData,
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    protocol: str | EvaluationProtocol | None = None,
    repeats: int | None = None,
    seed: int = 0,
    missing: MissingRule = "impute",
) -> pd.DataFrame:
    """Forward / backward NME (%) with the regressors fitted on each of ``sizes`` training images.

    Returns one row per (size, direction): ``n_images`` (asked), ``n_fit``
    (used: at most the eligible training images), ``direction``, ``nme``,
    ``n_repeats``. Sizes beyond the training pool are fitted on the whole pool
    once (the row says so through ``n_fit``); a size below 2 is an error.
    """
    if not sizes or min(int(s) for s in sizes) < 2:
        raise ConfigError(f"regressor sizes must be >= 2 images, got {list(sizes)}", where="nme_by_regressor_size", fix="e.g. 10,30,100,300")
    rows = []
    for size in sorted({int(s) for s in sizes}):
        rep = evaluate_nme(train, test, protocol=protocol, n_regressor_images=size, repeats=repeats, seed=seed, missing=missing)
        for res in (rep.forward, rep.backward):
            rows.append({"n_images": size, "n_fit": res.n_regressor_images, "direction": res.direction, "nme": res.mean, "n_repeats": res.n_repeats})
    return pd.DataFrame(rows, columns=["n_images", "n_fit", "direction", "nme", "n_repeats"])
