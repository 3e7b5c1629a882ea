"""Forward / backward NME: the field's linear-regression protocol (Jakab et al.; Mallis et al.).

Everything here works in *unit crop coordinates*: a point's position inside
its image's square crop box divided by the box side, so (0,0) is the crop's
top-left and (1,1) its bottom-right. Per-image normalising distances are
converted into the same units (divided by the crop side in original pixels),
so an error ratio is the same whichever units it is computed in, while the
regressor sees every face at the same scale (which is what makes a single
linear map across images meaningful).

Protocol ``paper``, the default (001, Table 1; the other named protocols,
``mallis`` and ``lstsq``, are in :mod:`pipeline.evaluation.protocols`):

- ridge regression in closed form on centred data (the means are the bias):
  ``W = Yc^T Xc (Xc^T Xc + lambda I)^-1`` with ``lambda = rel * max(Xc^T Xc)``,
  ``rel = 0.001`` forward and ``0.1`` backward;
- the regressor is fitted on ``n_regressor_images`` (300) training images drawn
  at random (seeded) from the eligible training images, ``repeats`` (5) times;
  the test error is averaged over the repeats;
- per-image error = mean over points of ||pred - target|| / normaliser, in %;
  forward (discovered 2K -> ground truth 2L) averages over the ground-truth
  points that exist in the test image, backward (ground truth -> discovered)
  over the discovered landmarks present in the test image.

Missing discovered landmarks (a cluster absent in an image) follow an explicit
rule: ``missing="impute"`` fills them with that landmark's mean position over
the training images where it was found (counted and reported);
``missing="drop"`` removes every image with a missing landmark (counted).
Images whose ground truth is incomplete are not used to *fit* either
regressor (their targets/inputs would be undefined); at test time forward uses
the existing points, backward needs complete ground truth as input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

from pipeline.errors import ConfigError

# The regressors and the named protocols live in pipeline.evaluation.protocols; Ridge is
# re-exported here because callers import it from this module.
from pipeline.evaluation.protocols import DirectionFit, EvaluationProtocol, Ridge, get_protocol


MissingRule = Literal["impute", "drop"]
# LS3D analysis: 5 equal bins over [-90, 90] degrees of yaw.
YAW_EDGES: tuple[float, ...] = (-90.0, -54.0, -18.0, 18.0, 54.0, 90.0)


# ---------------------------------------------------------------- data in
@dataclass
class EvalData:
    """One split's landmarks in unit crop coordinates.

    ``disc`` (N,K,2) discovered, ``present`` (N,K), ``gt`` (N,L,2) ground truth
    (NaN where a point does not exist), ``norm`` (N,) normalising distance,
    ``yaw`` (N,) degrees or NaN, ``image_ids`` (N,) for reporting.
    """

    disc: np.ndarray
    present: np.ndarray
    gt: np.ndarray
    norm: np.ndarray
    yaw: np.ndarray | None = None
    image_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.disc = np.asarray(self.disc, dtype=np.float64)
        self.present = np.asarray(self.present, dtype=bool) & np.isfinite(self.disc).all(-1)
        self.gt = np.asarray(self.gt, dtype=np.float64)
        self.norm = np.asarray(self.norm, dtype=np.float64)
        n = len(self.disc)
        if self.disc.ndim != 3 or self.gt.ndim != 3 or self.present.shape != self.disc.shape[:2]:
            raise ConfigError(f"expected disc (N,K,2), present (N,K), gt (N,L,2); got {self.disc.shape}, {self.present.shape}, {self.gt.shape}", where="EvalData")
        if len(self.gt) != n or len(self.norm) != n:
            raise ConfigError(f"disc has {n} images, gt {len(self.gt)}, norm {len(self.norm)}", where="EvalData")
        self.yaw = np.full(n, np.nan) if self.yaw is None else np.asarray(self.yaw, dtype=np.float64)
        self.image_ids = np.arange(n).astype(str) if self.image_ids is None else np.asarray(self.image_ids).astype(str)

    @property
    def n(self) -> int:
        return len(self.disc)

    def without(self, drop: np.ndarray) -> "EvalData":
        """The same split with the landmarks where ``drop`` (N, K) is True treated as missing.

        Used to score fallback landmarks (filled in, not detected) as what they
        are: missing, then handled by the usual missing-landmark rule.
        """
        drop = np.asarray(drop, dtype=bool)
        if drop.shape != self.present.shape:
            raise ConfigError(f"drop mask {drop.shape} must be (N, K) = {self.present.shape}", where="EvalData.without")
        return EvalData(self.disc, self.present & ~drop, self.gt, self.norm, self.yaw, self.image_ids)

    @property
    def gt_exists(self) -> np.ndarray:
        return np.isfinite(self.gt).all(-1)

    @classmethod
    def from_pixels(
        cls,
        disc: np.ndarray,
        present: np.ndarray,
        gt: np.ndarray,
        normalisers: np.ndarray,
        crop_boxes: np.ndarray,
        yaw: np.ndarray | None = None,
        image_ids: np.ndarray | None = None,
    ) -> "EvalData":
        """Build from original-pixel coordinates and the (N,4) crop boxes (x0, y0, x1, y1)."""
        boxes = np.asarray(crop_boxes, dtype=np.float64)
        return cls(
            to_unit_crop(disc, boxes),
            present,
            to_unit_crop(gt, boxes),
            normaliser_to_unit(normalisers, boxes),
            yaw,
            image_ids,
        )


def to_unit_crop(points: np.ndarray, crop_boxes: np.ndarray) -> np.ndarray:
    """Original pixels (N,P,2) -> unit crop coordinates with the (N,4) crop boxes."""
    p = np.asarray(points, dtype=np.float64)
    b = np.asarray(crop_boxes, dtype=np.float64)
    origin = b[:, None, 0:2]
    side = (b[:, None, 2:4] - b[:, None, 0:2])
    if (side <= 0).any():
        raise ConfigError("crop boxes must have positive width and height", where="to_unit_crop")
    return (p - origin) / side


def normaliser_to_unit(normalisers: np.ndarray, crop_boxes: np.ndarray) -> np.ndarray:
    """A distance in original pixels -> unit crop units (divide by the crop side; sqrt(w*h) if not square)."""
    b = np.asarray(crop_boxes, dtype=np.float64)
    side = np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    return np.asarray(normalisers, dtype=np.float64) / side


# ---------------------------------------------------------------- results
@dataclass
class NMEResult:
    """One direction's result. Errors are in % of the normalising distance."""

    direction: str
    mean: float
    per_repeat: np.ndarray
    per_image: np.ndarray  # (N_test,) averaged over repeats; NaN where an image was not evaluated
    n_regressor_images: int  # training images per repeat
    n_train_eligible: int
    n_test: int
    rel_lambda: float  # NaN for plain least squares
    n_repeats: int = 1


@dataclass
class NMEReport:
    forward: NMEResult
    backward: NMEResult
    counts: dict[str, int] = field(default_factory=dict)
    missing: str = "impute"
    protocol: str = "paper"


def _impute(disc: np.ndarray, present: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, int]:
    out = np.where(present[..., None], disc, means[None])
    return out, int((~present).sum())


def _landmark_means(train: EvalData) -> np.ndarray:
    K = train.disc.shape[1]
    means = np.full((K, 2), 0.5)  # crop centre for a landmark never found in training
    for k in range(K):
        m = train.present[:, k]
        if m.any():
            means[k] = train.disc[m, k].mean(0)
    return means


def _per_image_error(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, norm: np.ndarray) -> np.ndarray:
    d = np.linalg.norm(pred - target, axis=-1)
    d = np.where(mask, d, 0.0)
    cnt = mask.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = d.sum(1) / cnt / norm * 100.0
    e[cnt == 0] = np.nan
    return e


def evaluate_nme(
    train: EvalData,
    test: EvalData,
    *,
    protocol: str | EvaluationProtocol | None = None,
    n_regressor_images: int | None = None,
    repeats: int | None = None,
    seed: int = 0,
    forward_lambda: float | None = None,
    backward_lambda: float | None = None,
    missing: MissingRule = "impute",
) -> NMEReport:
    """Forward and backward NME under ``protocol`` (see the module docstring and
    :mod:`pipeline.evaluation.protocols`; default ``paper``).

    The other settings override the protocol's when given (None keeps it);
    ``n_regressor_images=0`` fits on every eligible training image. Both
    directions of repeat ``r`` draw their subset from the same seeded generator,
    so with equal sizes they are fitted on the same images.
    """
    if missing not in ("impute", "drop"):
        raise ConfigError(f"unknown missing-landmark rule {missing!r}", where="--missing", fix="use 'impute' or 'drop'")
    proto = get_protocol(protocol).with_overrides(n_regressor_images, repeats, forward_lambda, backward_lambda)
    if train.disc.shape[1] != test.disc.shape[1] or train.gt.shape[1] != test.gt.shape[1]:
        raise ConfigError("train and test have different numbers of landmarks", where="evaluate_nme")
    K, L = train.disc.shape[1], train.gt.shape[1]
    counts: dict[str, int] = {"n_train_images": train.n, "n_test_images": test.n}

    means = _landmark_means(train)
    tr_ok = train.gt_exists.all(1)
    te_norm_ok = np.isfinite(test.norm) & (test.norm > 0)
    counts["n_train_incomplete_gt"] = int((~tr_ok).sum())
    counts["n_test_bad_normaliser"] = int((~te_norm_ok).sum())
    if missing == "impute":
        tr_disc, counts["n_imputed_train"] = _impute(train.disc, train.present, means)
        te_disc, counts["n_imputed_test"] = _impute(test.disc, test.present, means)
        te_ok = np.ones(test.n, bool)
        counts["n_dropped_train"] = counts["n_dropped_test"] = 0
    else:
        tr_full = train.present.all(1)
        te_ok = test.present.all(1)
        counts["n_dropped_train"] = int((tr_ok & ~tr_full).sum())
        counts["n_dropped_test"] = int((~te_ok).sum())
        tr_ok = tr_ok & tr_full
        tr_disc, te_disc = train.disc, test.disc
        counts["n_imputed_train"] = counts["n_imputed_test"] = 0
    eligible = np.flatnonzero(tr_ok)
    if len(eligible) < 2:
        raise ConfigError(
            f"only {len(eligible)} training images are usable to fit the regressors",
            where="evaluate_nme",
            fix="use more training images, or missing='impute' if many landmarks are missing",
        )
    fwd_test = te_ok & te_norm_ok & test.gt_exists.any(1)
    bwd_test = te_ok & te_norm_ok & test.gt_exists.all(1) & test.present.any(1)
    Xd_all = tr_disc.reshape(train.n, 2 * K)
    Yg_all = np.nan_to_num(train.gt).reshape(train.n, 2 * L)

    def run(direction: str, fit: DirectionFit, mask: np.ndarray) -> NMEResult:
        n_fit = len(eligible) if not fit.n_images or fit.n_images <= 0 else min(int(fit.n_images), len(eligible))
        # Repeats differ only in the random regressor subset: with the whole pool there is
        # one subset, so one fit (no fake "independent" repeats).
        reps = 1 if n_fit == len(eligible) else int(fit.repeats)
        img = np.full((reps, test.n), np.nan)
        for r in range(reps):
            rng = np.random.default_rng([seed, r])
            sub = np.sort(rng.choice(eligible, size=n_fit, replace=False))
            if not mask.any():
                continue
            if direction == "forward":
                reg = fit.regressor().fit(Xd_all[sub], Yg_all[sub])
                pred = reg.predict(te_disc[mask].reshape(-1, 2 * K)).reshape(-1, L, 2)
                img[r, mask] = _per_image_error(pred, np.nan_to_num(test.gt[mask]), test.gt_exists[mask], test.norm[mask])
            else:
                reg = fit.regressor().fit(Yg_all[sub], Xd_all[sub])
                pred = reg.predict(test.gt[mask].reshape(-1, 2 * L)).reshape(-1, K, 2)
                img[r, mask] = _per_image_error(pred, np.nan_to_num(test.disc[mask]), test.present[mask], test.norm[mask])
        per_repeat = np.array([np.nanmean(row) if np.isfinite(row).any() else np.nan for row in img])
        return NMEResult(
            direction=direction,
            mean=float(np.nanmean(per_repeat)) if np.isfinite(per_repeat).any() else float("nan"),
            per_repeat=per_repeat,
            per_image=np.where(mask, img.mean(0), np.nan),
            n_regressor_images=n_fit,
            n_train_eligible=int(len(eligible)),
            n_test=int(mask.sum()),
            rel_lambda=float("nan") if fit.rel_lambda is None else float(fit.rel_lambda),
            n_repeats=reps,
        )

    fwd = run("forward", proto.fit_for("forward", L), fwd_test)
    bwd = run("backward", proto.fit_for("backward", L), bwd_test)
    counts["n_regressor_images"] = fwd.n_regressor_images
    counts["n_repeats"] = fwd.n_repeats
    counts["n_regressor_images_backward"] = bwd.n_regressor_images
    counts["n_repeats_backward"] = bwd.n_repeats
    counts["n_test_forward"] = int(fwd_test.sum())
    counts["n_test_backward"] = int(bwd_test.sum())
    return NMEReport(forward=fwd, backward=bwd, counts=counts, missing=missing, protocol=proto.name)


# ---------------------------------------------------------------- analyses
def yaw_bin_labels(edges: tuple[float, ...] = YAW_EDGES) -> list[str]:
    labels = [f"[{edges[i]:g},{edges[i + 1]:g})" for i in range(len(edges) - 1)]
    labels[-1] = labels[-1][:-1] + "]"  # last bin is closed
    return labels


def nme_by_yaw(per_image: np.ndarray, yaw: np.ndarray, edges: tuple[float, ...] = YAW_EDGES) -> list[tuple[str, float, int]]:
    """Mean per-image NME in each yaw bin: ``[(label, mean %, n_images), ...]`` (NaN mean for an empty bin)."""
    e = np.asarray(per_image, dtype=np.float64)
    y = np.asarray(yaw, dtype=np.float64)
    ok = np.isfinite(e) & np.isfinite(y)
    # right-closed last bin: clip 90 into it.
    b = np.digitize(np.clip(y, edges[0], np.nextafter(edges[-1], -np.inf)), edges) - 1
    out = []
    for i, lab in enumerate(yaw_bin_labels(edges)):
        m = ok & (b == i) & (y >= edges[0]) & (y <= edges[-1])
        out.append((lab, float(e[m].mean()) if m.any() else float("nan"), int(m.sum())))
    return out


def ced_curve(per_image: np.ndarray, max_error: float = 10.0, n_points: int = 201) -> tuple[np.ndarray, np.ndarray, float]:
    """Cumulative error distribution: thresholds (%), fraction of images with NME <= t, and the
    area under the curve up to ``max_error`` divided by ``max_error`` (1 = every image perfect).
    Images that were not evaluated (NaN) are left out."""
    e = np.asarray(per_image, dtype=np.float64)
    e = np.sort(e[np.isfinite(e)])
    t = np.linspace(0.0, max_error, n_points)
    if len(e) == 0:
        return t, np.zeros_like(t), float("nan")
    frac = np.searchsorted(e, t, side="right") / len(e)
    auc = float(np.trapezoid(frac, t) / max_error) if hasattr(np, "trapezoid") else float(np.trapz(frac, t) / max_error)
    return t, frac, auc


@dataclass
class HungarianResult:
    matched: np.ndarray  # (L,) discovered landmark matched to each GT landmark, -1 if none
    accuracy: np.ndarray  # (L,) fraction of test images with error < threshold * normaliser
    threshold: float

    @property
    def mean(self) -> float:
        ok = np.isfinite(self.accuracy)
        return float(self.accuracy[ok].mean()) if ok.any() else float("nan")


def hungarian_accuracy(train: EvalData, test: EvalData, threshold: float = 0.2) -> HungarianResult:
    """Per-GT-landmark accuracy at ``threshold`` x normaliser after one-to-one matching.

    The matching is fitted on the *training* split (cost = mean normalised distance
    between discovered k and ground truth l over the images where both exist) with
    :func:`scipy.optimize.linear_sum_assignment`, then scored on the test split:
    a test image counts as a hit for GT landmark l when its matched discovered
    landmark is present and within ``threshold * normaliser``. GT landmarks left
    unmatched (K < L) score 0.
    """
    L = train.gt.shape[1]
    ok_norm = np.isfinite(train.norm) & (train.norm > 0)
    d = np.linalg.norm(train.disc[:, :, None, :] - train.gt[:, None, :, :], axis=-1) / np.where(ok_norm, train.norm, np.nan)[:, None, None]
    valid = train.present[:, :, None] & train.gt_exists[:, None, :] & ok_norm[:, None, None]
    cnt = valid.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cost = np.where(valid, d, 0.0).sum(0) / cnt
    cost = np.where(cnt > 0, cost, 1e6)
    rows, cols = linear_sum_assignment(cost)  # rows: discovered, cols: GT
    matched = np.full(L, -1, np.int64)
    matched[cols] = rows
    acc = np.zeros(L)
    te_ok = np.isfinite(test.norm) & (test.norm > 0)
    for l in range(L):
        m = test.gt_exists[:, l] & te_ok
        if matched[l] < 0 or not m.any():
            acc[l] = 0.0 if matched[l] < 0 else np.nan
            continue
        k = matched[l]
        dist = np.linalg.norm(test.disc[m, k] - test.gt[m, l], axis=-1) / test.norm[m]
        hit = test.present[m, k] & (np.nan_to_num(dist, nan=np.inf) < threshold)
        acc[l] = hit.mean()
    return HungarianResult(matched=matched, accuracy=acc, threshold=threshold)
