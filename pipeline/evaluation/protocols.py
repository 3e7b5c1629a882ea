"""Named evaluation protocols: how the forward / backward regressors are fitted.

Results of unsupervised landmark discovery are only comparable under the same
regressor protocol, and papers and codebases differ. Each protocol is a named
:class:`EvaluationProtocol`, looked up with :func:`get_protocol`, and its name
is recorded in every metrics row.

- ``paper`` (seed 001, Table 1; the method brief's "Evaluation protocol"):
  closed-form ridge on centred data (the means are the bias),
  ``lambda = 0.001 x max(Xc^T Xc)`` forward and ``0.1 x`` backward, fitted on
  300 training images drawn at random, 5 repeats averaged.
- ``mallis`` (Mallis et al.'s released evaluation code): the same ridge with
  ``lambda = 0.1 x max(Xc^T Xc)`` both ways, 10 repeats; the forward regressor
  of a 5-point layout (MAFL / AFLW / MTFL) is fitted on *all* training images
  (one fit), otherwise on 300 images per repeat.
- ``lstsq`` (StableKeypoints / Jakab et al. / AutoLink code): plain least
  squares without an intercept on all training images, both directions.

The object box that normalises box-normalised datasets is the other half of
the protocol: :data:`BOX_RULES` (see ``pipeline.datasets.base.Manifest.normalisers``).

Linear systems are solved, never inverted: Cholesky for the ridge normal
equations (positive definite once ``lambda > 0``), an SVD least-squares solve
for ``lstsq``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import scipy.linalg

from pipeline.errors import ConfigError

BoxRule = Literal["landmarks", "image"]
# landmarks: the dataset's own box rule (today's: the ground-truth landmark box, or the
# manifest's object box); image: the whole image, as StableKeypoints / Jakab / AutoLink do.
BOX_RULES: tuple[str, ...] = ("landmarks", "image")


# ---------------------------------------------------------------- regressors
@dataclass
class Ridge:
    """Closed-form ridge regression with bias, lambda relative to max(Xc^T Xc) (method brief, eq. for W).

    ``W = Yc^T Xc (Xc^T Xc + lambda I)^-1`` on centred data; computed as the
    Cholesky solve of ``(Xc^T Xc + lambda I) W^T = Xc^T Yc``.
    """

    rel_lambda: float

    def fit(self, X: np.ndarray, Y: np.ndarray) -> "Ridge":
        X = np.asarray(X, dtype=np.float64)
        Y = np.asarray(Y, dtype=np.float64)
        self.x_mean_ = X.mean(0)
        self.y_mean_ = Y.mean(0)
        Xc, Yc = X - self.x_mean_, Y - self.y_mean_
        xtx = Xc.T @ Xc
        scale = float(np.abs(xtx).max()) if xtx.size else 0.0
        # All inputs equal (scale 0): a tiny absolute lambda keeps the system solvable.
        self.lambda_ = self.rel_lambda * scale if scale > 0 else max(self.rel_lambda, 1e-12)
        A = xtx + self.lambda_ * np.eye(X.shape[1])
        B = Xc.T @ Yc
        try:
            self.coef_ = scipy.linalg.cho_solve(scipy.linalg.cho_factor(A), B).T
        except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
            # Not positive definite in floating point (lambda tiny against a huge scale).
            self.coef_ = np.linalg.lstsq(A, B, rcond=None)[0].T
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.x_mean_) @ self.coef_.T + self.y_mean_


@dataclass
class LeastSquares:
    """Plain least squares ``Y ~ X W^T`` without an intercept (StableKeypoints / Jakab / AutoLink).

    Solved with ``np.linalg.lstsq`` (SVD): the minimum-norm solution when X is rank deficient.
    """

    def fit(self, X: np.ndarray, Y: np.ndarray) -> "LeastSquares":
        X = np.asarray(X, dtype=np.float64)
        Y = np.asarray(Y, dtype=np.float64)
        self.coef_ = np.linalg.lstsq(X, Y, rcond=None)[0].T
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float64) @ self.coef_.T


# ---------------------------------------------------------------- protocols
@dataclass(frozen=True)
class DirectionFit:
    """How one direction's regressor is fitted.

    ``rel_lambda`` None means plain least squares without intercept; otherwise
    ridge with bias. ``n_images`` None means every eligible training image
    (one fit, ``repeats`` ignored).
    """

    rel_lambda: float | None
    n_images: int | None
    repeats: int

    def regressor(self) -> Ridge | LeastSquares:
        return LeastSquares() if self.rel_lambda is None else Ridge(self.rel_lambda)


@dataclass(frozen=True)
class EvaluationProtocol:
    """A named way of fitting the forward and backward regressors (see the module docstring).

    ``forward_all_up_to_points``: the forward regressor uses every training
    image when the ground truth has at most this many points (Mallis et al.'s
    5-point rule); 0 = never.
    """

    name: str
    forward: DirectionFit
    backward: DirectionFit
    description: str
    forward_all_up_to_points: int = 0

    def fit_for(self, direction: str, n_points: int) -> DirectionFit:
        """The fit of ``direction`` ("forward" / "backward") for ground truth with ``n_points`` points."""
        if direction == "backward":
            return self.backward
        if direction != "forward":
            raise ConfigError(f"unknown direction {direction!r}", where="EvaluationProtocol.fit_for", fix="forward or backward")
        if 0 < n_points <= self.forward_all_up_to_points:
            return replace(self.forward, n_images=None)
        return self.forward

    def with_overrides(
        self,
        n_regressor_images: int | None = None,
        repeats: int | None = None,
        forward_lambda: float | None = None,
        backward_lambda: float | None = None,
    ) -> "EvaluationProtocol":
        """The protocol with explicitly given settings replaced (None = keep the protocol's).

        ``n_regressor_images=0`` means every eligible image in both directions.
        A lambda override on ``lstsq`` is refused: it has no lambda.
        """
        if repeats is not None and repeats < 1:
            raise ConfigError("repeats must be >= 1", where="--repeats", fix="e.g. --repeats 5")
        if n_regressor_images is not None and n_regressor_images < 0:
            raise ConfigError("--n-regressor-images must be >= 0 (0 = all training images)", where="--n-regressor-images")
        out = self
        for direction, lam in (("forward", forward_lambda), ("backward", backward_lambda)):
            fit = getattr(out, direction)
            if lam is not None:
                if fit.rel_lambda is None:
                    raise ConfigError(
                        f"protocol {self.name!r} fits plain least squares and has no {direction} lambda",
                        where=f"--{direction}-lambda", fix="drop the option, or use --protocol paper / mallis",
                    )
                fit = replace(fit, rel_lambda=float(lam))
            if n_regressor_images is not None:
                fit = replace(fit, n_images=int(n_regressor_images) or None)
            if repeats is not None:
                fit = replace(fit, repeats=int(repeats))
            out = replace(out, **{direction: fit})
        if n_regressor_images is not None:
            out = replace(out, forward_all_up_to_points=0)  # an explicit size wins over the 5-point rule
        return out


PROTOCOLS: dict[str, EvaluationProtocol] = {
    p.name: p
    for p in (
        EvaluationProtocol(
            "paper",
            DirectionFit(rel_lambda=1e-3, n_images=300, repeats=5),
            DirectionFit(rel_lambda=0.1, n_images=300, repeats=5),
            "ridge on centred data, lambda 0.001 / 0.1 x max(XtX) fwd / bwd, 300 training images, 5 repeats (001 Table 1)",
        ),
        EvaluationProtocol(
            "mallis",
            DirectionFit(rel_lambda=0.1, n_images=300, repeats=10),
            DirectionFit(rel_lambda=0.1, n_images=300, repeats=10),
            "ridge on centred data, lambda 0.1 x max(XtX) both ways, 10 repeats; forward on all training images for 5-point sets (Mallis et al. code)",
            forward_all_up_to_points=5,
        ),
        EvaluationProtocol(
            "lstsq",
            DirectionFit(rel_lambda=None, n_images=None, repeats=1),
            DirectionFit(rel_lambda=None, n_images=None, repeats=1),
            "plain least squares without intercept on all training images (StableKeypoints / Jakab / AutoLink code)",
        ),
    )
}
DEFAULT_PROTOCOL = "paper"


def get_protocol(protocol: "str | EvaluationProtocol | None" = None) -> EvaluationProtocol:
    """The protocol named ``protocol`` (None = ``paper``); an EvaluationProtocol is returned as is."""
    if isinstance(protocol, EvaluationProtocol):
        return protocol
    name = DEFAULT_PROTOCOL if protocol is None else str(protocol)
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown evaluation protocol {name!r}", where="--protocol", fix=f"use one of: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def check_box(box: str | None) -> str:
    """Validate a box rule name (None = ``landmarks``)."""
    box = "landmarks" if box is None else str(box)
    if box not in BOX_RULES:
        raise ConfigError(f"unknown box rule {box!r}", where="--box", fix=f"use one of: {', '.join(BOX_RULES)}")
    return box
