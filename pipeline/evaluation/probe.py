"""Feature probe: does a backbone's hyperfeature carry *correspondence*? (transfer PCK)

The fast figure of merit for choosing layers and timesteps, and for tracking a
backbone while it trains: no clustering, no regressor, no training, only
nearest-neighbour matching of ground-truth landmarks between two images.

Protocol (the keypoint-transfer PCK of DIFT, Tang et al., "Emergent
Correspondence from Image Diffusion", NeurIPS 2023, and of the diffusion
hyperfeatures paper, Luo et al., "Diffusion Hyperfeatures", NeurIPS 2023, both
following the SPair-71k / PF-PASCAL evaluation): for a pair of images (A, B) of
the same category, describe every annotated landmark of A with the features,
find the pixel of B whose descriptor is most similar (cosine), and count the
transfer correct when that pixel lies within ``alpha * size(B)`` of B's
annotation of the same landmark. PCK is the fraction of correct transfers over
all (pair, landmark) points; only landmarks visible in *both* images count.

Choices made here (documented, not inherited):

- **descriptors** are exactly ZeroShot's (:func:`pipeline.methods.zeroshot.describe_points`):
  bilinear sampling at continuous crop coordinates, per-key L2 normalisation,
  concatenation over keys scaled by ``1/sqrt(n_keys)``. The cosine of two such
  descriptors is the mean over keys of the per-key cosines, which is what
  ZeroShot's k-means sees, so the probe ranks feature sets for ZeroShot;
- **search space**: every pixel centre of B's crop (``stride=1``) or the centres
  of ``stride x stride`` blocks; the whole crop, not only the object box, so a
  feature that confuses object and background is penalised;
- **object size** (``object_size``): ``"max_side"`` (default) = the longer side
  of the box around B's visible ground-truth landmarks in crop pixels (the
  SPair/DIFT convention uses the longer side of the object box; the landmark
  box is the object box the annotations define, independent of how a dataset
  draws its boxes); ``"sqrt_area"`` = sqrt(w * h) of that box. Optionally PCK
  is also reported against a per-image normaliser (e.g. inter-ocular distance,
  the NME normaliser of the manifest) given in crop pixels (``pck_norm``);
- **chance level** (``chance``): the expected PCK of a predictor that picks a
  uniformly random candidate pixel of B, computed exactly per point as the
  fraction of candidates within the threshold, so a PCK can be read against it.

Pairs are ordered (A -> B), distinct (A != B), drawn without replacement with a
seeded generator (:func:`sample_pairs`). The images should be a validation
subset of the *training* split (:func:`validation_subset`): choosing layers on
test images would leak the test set into the method.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.backbones.base import feature_key, parse_feature_key
from pipeline.errors import ConfigError
from pipeline.methods.zeroshot import describe_points

ObjectSize = Literal["max_side", "sqrt_area"]
FeatureMaps = Mapping[str, Any]  # key "layer@tT" -> (N, C, h, w) numpy (float16 is fine) or torch


# ------------------------------------------------------------ images and pairs
def validation_subset(image_ids: Sequence[str], splits: Sequence[str], n: int, seed: int = 0, split: str = "train") -> np.ndarray:
    """Positions (ascending) of a fixed, seeded subset of ``n`` images of ``split`` (default: train).

    Each candidate image is ranked by BLAKE2b(``"<seed>:<image_id>"``) and the
    ``n`` lowest hashes are kept: the choice depends only on the ids and the
    seed (not on row order or on other splits) and never includes an image of
    another split, so the test split cannot leak into layer selection. When
    fewer than ``n`` images exist, all of them are returned.
    """
    ids = np.asarray(image_ids).astype(str)
    sp = np.asarray(splits).astype(str)
    if ids.shape != sp.shape:
        raise ConfigError(f"{len(ids)} image ids but {len(sp)} split labels", where="validation_subset")
    if n < 1:
        raise ConfigError(f"the validation subset needs at least 1 image, got n={n}", where="--n-images", fix="use e.g. 100")
    pos = np.flatnonzero(sp == split)
    if len(pos) == 0:
        raise ConfigError(f"no {split!r} images to draw the validation subset from", where="validation_subset",
                          fix="build the dataset's train manifest (and features) first")
    rank = [hashlib.blake2b(f"{int(seed)}:{ids[p]}".encode(), digest_size=8).digest() for p in pos]
    keep = pos[np.argsort(np.array(rank, dtype=object), kind="stable")[: int(n)]]
    return np.sort(keep)


def sample_pairs(n_images: int, n_pairs: int, seed: int = 0) -> np.ndarray:
    """(P, 2) ordered pairs (source, target) of distinct images, seeded, without repeats.

    ``P = min(n_pairs, n_images * (n_images - 1))``; sorted for reproducible output.
    """
    n = int(n_images)
    if n < 2:
        raise ConfigError(f"pairs need at least 2 images, got {n}", where="--n-images", fix="use e.g. 100")
    if n_pairs < 1:
        raise ConfigError(f"n_pairs must be >= 1, got {n_pairs}", where="--n-pairs", fix="use e.g. 200")
    total = n * (n - 1)
    code = np.sort(np.random.default_rng([int(seed), 31]).choice(total, size=min(int(n_pairs), total), replace=False))
    a, r = code // (n - 1), code % (n - 1)
    b = r + (r >= a)  # skip the diagonal: r-th other image
    return np.stack([a, b], 1).astype(np.int64)


def landmark_box_size(landmarks: np.ndarray, visible: np.ndarray, mode: ObjectSize = "max_side") -> np.ndarray:
    """(N,) size of the box around each image's visible landmarks (same units as ``landmarks``).

    NaN when an image has fewer than two visible landmarks (no box).
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    ok = np.asarray(visible, dtype=bool) & np.isfinite(lm).all(-1)
    masked = np.where(ok[..., None], lm, np.nan)
    with warnings.catch_warnings():  # images without visible landmarks are expected: NaN, no warning
        warnings.simplefilter("ignore", RuntimeWarning)
        wh = np.nanmax(masked, 1) - np.nanmin(masked, 1)
    if mode == "max_side":
        size = wh.max(-1)
    elif mode == "sqrt_area":
        size = np.sqrt(wh[:, 0] * wh[:, 1])
    else:
        raise ConfigError(f"unknown object size {mode!r}", where="--object-size", fix="use max_side or sqrt_area")
    size[ok.sum(1) < 2] = np.nan
    return size


# ------------------------------------------------------------ combinations
def combo_name(keys: Sequence[str]) -> str:
    """The table's name for a key combination: sorted keys joined by '+'."""
    return "+".join(sorted(keys))


def is_grid(keys: Sequence[str]) -> bool:
    """True when ``keys`` is a full product layers x timesteps (expressible as one FeatureSpec)."""
    parsed = {parse_feature_key(k) for k in keys}
    layers = {l for l, _ in parsed}
    ts = {t for _, t in parsed}
    return len(parsed) == len(layers) * len(ts)


def grid_of(keys: Sequence[str]) -> tuple[list[str], list[int]]:
    """(layers, timesteps) spanned by ``keys``, layers in first-seen order of the sorted keys, timesteps ascending."""
    parsed = [parse_feature_key(k) for k in sorted(keys)]
    layers = list(dict.fromkeys(l for l, _ in parsed))
    return layers, sorted({t for _, t in parsed})


def standard_combinations(keys: Sequence[str], single_pck: Mapping[str, float] | None = None, top: Sequence[int] = (2, 3)) -> list[tuple[str, tuple[str, ...]]]:
    """``[(kind, keys), ...]``: the combinations a sweep evaluates after the single keys.

    kinds: ``layer`` (one layer, all its timesteps), ``timestep`` (one timestep,
    all layers), ``all`` (every key), ``best<n>`` (the n best single keys by
    ``single_pck``) and ``grid<n>`` (the layers x timesteps spanned by
    ``best<n>``, when that differs: a FeatureSpec can only express products).
    A combination equal to a single key is left out.
    """
    keys = sorted(keys)
    parsed = {k: parse_feature_key(k) for k in keys}
    layers = list(dict.fromkeys(parsed[k][0] for k in keys))
    ts = sorted({parsed[k][1] for k in keys})
    out: list[tuple[str, tuple[str, ...]]] = []

    def add(kind: str, combo: Sequence[str]) -> None:
        combo = tuple(sorted(combo))
        if len(combo) > 1:
            out.append((kind, combo))

    for layer in layers:
        add("layer", [k for k in keys if parsed[k][0] == layer])
    for t in ts:
        add("timestep", [k for k in keys if parsed[k][1] == t])
    add("all", keys)
    if single_pck:
        ranked = sorted((k for k in keys if k in single_pck), key=lambda k: (-float(single_pck[k]), k))
        for n in top:
            if len(ranked) >= n:
                best = ranked[:n]
                add(f"best{n}", best)
                ls, tt = grid_of(best)
                grid = [feature_key(l, t) for l in ls for t in tt]
                if set(grid) != set(best) and set(grid) <= set(keys):
                    add(f"grid{n}", grid)
    return out


# ------------------------------------------------------------ results
@dataclass
class ProbeResult:
    """Transfer PCK of one key combination.

    ``pck`` over all points; ``per_landmark`` (L,) (NaN where a landmark never
    counted); ``pck_norm`` / ``per_landmark_norm`` against the per-image
    normaliser (NaN without one); ``chance`` the uniform-random-pixel PCK;
    ``errors`` (Q,) transfer errors in crop pixels with ``point_landmark`` /
    ``point_pair`` (Q,) saying which landmark and pair each point is.
    """

    keys: tuple[str, ...]
    pck: float
    per_landmark: np.ndarray
    n_points_per_landmark: np.ndarray
    pck_norm: float
    per_landmark_norm: np.ndarray
    chance: float
    n_pairs: int
    n_points: int
    alpha: float
    errors: np.ndarray = field(repr=False)
    point_landmark: np.ndarray = field(repr=False)
    point_pair: np.ndarray = field(repr=False)
    kind: str = "custom"

    @property
    def name(self) -> str:
        return combo_name(self.keys)

    @property
    def n_keys(self) -> int:
        return len(self.keys)


# ------------------------------------------------------------ the probe
class TransferProbe:
    """Keypoint-transfer PCK of hyperfeatures (see the module docstring for the protocol).

    Estimator-style: ``fit`` takes the ground truth of the N probe images and
    draws the pairs; ``score(features, keys)`` returns the :class:`ProbeResult`
    of one key combination; ``sweep(features)`` scores every single key and the
    :func:`standard_combinations`.

    Example::

        probe = TransferProbe(alpha=0.1, n_pairs=200, seed=0).fit(landmarks_crop, visible, crop_size=64)
        results = probe.sweep(features)            # features: {"up1.res1@t50": (N, C, h, w), ...}
        best = max(results, key=lambda r: r.pck)

    ``features[key][i]`` must be image ``i`` of the ground truth given to ``fit``.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        object_size: ObjectSize = "max_side",
        stride: int = 1,
        n_pairs: int = 200,
        seed: int = 0,
        batch_size: int = 16,
        proj_dim: int | None = None,
    ) -> None:
        if not alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {alpha}", where="--alpha", fix="use e.g. 0.1")
        if stride < 1:
            raise ConfigError(f"stride must be >= 1, got {stride}", where="--stride")
        if object_size not in ("max_side", "sqrt_area"):
            raise ConfigError(f"unknown object size {object_size!r}", where="--object-size", fix="use max_side or sqrt_area")
        self.alpha = float(alpha)
        self.object_size = object_size
        self.stride = int(stride)
        self.n_pairs = int(n_pairs)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.proj_dim = proj_dim

    # ---------------------------------------------------------- ground truth
    def fit(
        self,
        landmarks: np.ndarray,
        visible: np.ndarray,
        crop_size: int,
        normalisers: np.ndarray | None = None,
        pairs: np.ndarray | None = None,
    ) -> "TransferProbe":
        """Ground truth of the probe images: ``landmarks`` (N, L, 2) in crop pixels, ``visible`` (N, L),
        optional per-image ``normalisers`` (N,) in crop pixels, optional explicit ``pairs`` (P, 2)
        (default: :func:`sample_pairs` with ``n_pairs`` and ``seed``)."""
        lm = np.asarray(landmarks, dtype=np.float64)
        vis = np.asarray(visible, dtype=bool)
        if lm.ndim != 3 or lm.shape[-1] != 2 or vis.shape != lm.shape[:2]:
            raise ConfigError(f"expected landmarks (N, L, 2) and visible (N, L), got {lm.shape} and {vis.shape}", where="TransferProbe.fit")
        n = len(lm)
        self.crop_size_ = int(crop_size)
        self.landmarks_ = lm
        self.visible_ = vis & np.isfinite(lm).all(-1)
        self.size_ = landmark_box_size(lm, self.visible_, self.object_size)
        self.norm_ = None if normalisers is None else np.asarray(normalisers, dtype=np.float64).reshape(n)
        if pairs is None:
            pairs = sample_pairs(n, self.n_pairs, self.seed)
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if len(pairs) and (pairs.min() < 0 or pairs.max() >= n or (pairs[:, 0] == pairs[:, 1]).any()):
            raise ConfigError("pairs must index distinct images in [0, N)", where="TransferProbe.fit")
        self.pairs_ = pairs
        c = np.arange(self.stride / 2.0, self.crop_size_, self.stride, dtype=np.float32)
        yy, xx = np.meshgrid(c, c, indexing="ij")
        self.grid_ = np.stack([xx.ravel(), yy.ravel()], -1)  # candidate pixel centres of B
        # The (pair, landmark) points that count: visible in both, B has a size.
        a, b = pairs[:, 0], pairs[:, 1]
        both = self.visible_[a] & self.visible_[b] & np.isfinite(self.size_[b])[:, None]
        self.point_pair_, self.point_landmark_ = np.nonzero(both)
        if len(self.point_pair_) == 0:
            raise ConfigError("no landmark is visible in both images of any pair", where="TransferProbe.fit",
                              fix="use more images / pairs, or check the manifest's visibility flags")
        # Chance (independent of the features): fraction of candidate pixels within the threshold
        # of each target point, i.e. the expected hit rate of a uniformly random candidate.
        dst = pairs[self.point_pair_, 1]
        gt = self.landmarks_[dst, self.point_landmark_].astype(np.float32)
        thr = (self.alpha * self.size_[dst]).astype(np.float32)
        self.chance_ = float(np.mean([(np.linalg.norm(self.grid_ - g, axis=-1) <= t).mean() for g, t in zip(gt, thr)]))
        return self

    def _check_fitted(self) -> None:
        if getattr(self, "pairs_", None) is None:
            raise ConfigError("TransferProbe is not fitted", where="TransferProbe.score", fix="call fit(landmarks, visible, crop_size) first")

    # ---------------------------------------------------------- scoring
    def _describe(self, feature: Any, rows: np.ndarray, points: np.ndarray, key: str) -> np.ndarray:
        """Unit descriptors (len(rows), P, C) of one key at ``points`` (len(rows), P, 2), in batches of images."""
        out = []
        for s in range(0, len(rows), self.batch_size):
            r = rows[s : s + self.batch_size]
            out.append(describe_points({key: feature[r]}, points[s : s + self.batch_size], self.crop_size_, self.proj_dim, self.seed))
        return np.concatenate(out)

    def _match(self, features: FeatureMaps, combos: Sequence[tuple[str, ...]], progress: bool = False, desc: str = "probe") -> dict[tuple[str, ...], np.ndarray]:
        """Predicted target pixels (Q, 2) of every point for each key combination in ``combos``.

        The ZeroShot descriptor of a combination is the per-key unit descriptors
        concatenated and scaled by 1/sqrt(n_keys), so its cosine is the *mean of
        the per-key cosines*. The similarity maps are therefore computed once
        per (target image, key) and summed into every combination holding the
        key: one pass over the keys scores all combinations, with memory of one
        target image's maps per combination (argmax is unchanged by the 1/n).
        """
        self._check_fitted()
        keys = sorted({k for c in combos for k in c})
        missing = [k for k in keys if k not in features]
        if not keys or missing:
            raise ConfigError(f"feature keys {missing or '(none)'} not available", where="TransferProbe.score", fix=f"choose from {sorted(features)}")
        n = len(self.landmarks_)
        for k in keys:
            if features[k].shape[0] != n:
                raise ConfigError(f"feature {k!r} holds {features[k].shape[0]} images, the ground truth {n}", where="TransferProbe.score")
        pp, pl = self.point_pair_, self.point_landmark_
        src, dst = self.pairs_[pp, 0], self.pairs_[pp, 1]
        sources = np.unique(src)
        q_of = np.searchsorted(sources, src)
        pts = np.nan_to_num(self.landmarks_[sources]).astype(np.float32)  # NaN (invisible) -> 0: never queried
        query = {k: self._describe(features[k], sources, pts, k) for k in keys}  # (n_src, L, C_k) per key
        grid = torch.from_numpy(self.grid_)
        pred = {c: np.empty((len(pp), 2), np.float32) for c in combos}
        for b in tqdm(np.unique(dst), desc=desc, unit="img", disable=not progress, leave=False):
            sel = np.flatnonzero(dst == b)
            acc: dict[tuple[str, ...], torch.Tensor] = {}
            for k in keys:
                cand = torch.from_numpy(self._describe(features[k], np.array([b]), self.grid_[None], k)[0])  # (G, C)
                sim = torch.from_numpy(query[k][q_of[sel], pl[sel]]) @ cand.T  # (q, G) cosines: unit vectors
                for c in combos:
                    if k in c:
                        acc[c] = sim if c not in acc else acc[c] + sim
            for c in combos:
                pred[c][sel] = grid[acc[c].argmax(1)].numpy()  # ties: the first pixel in row-major order
        return pred

    def _result(self, keys: tuple[str, ...], pred: np.ndarray) -> ProbeResult:
        pp, pl = self.point_pair_, self.point_landmark_
        dst = self.pairs_[pp, 1]
        err = np.linalg.norm(pred - self.landmarks_[dst, pl], axis=-1)
        hit = err <= self.alpha * self.size_[dst]
        L = self.landmarks_.shape[1]
        cnt = np.bincount(pl, minlength=L)
        with np.errstate(invalid="ignore", divide="ignore"):
            per = np.bincount(pl, weights=hit, minlength=L) / cnt
        pck_norm, per_norm = float("nan"), np.full(L, np.nan)
        if self.norm_ is not None:
            norm = self.norm_[dst]
            ok = np.isfinite(norm) & (norm > 0)
            hit_n = (err <= self.alpha * np.where(ok, norm, 0.0)) & ok
            if ok.any():
                pck_norm = float(hit_n[ok].mean())
            with np.errstate(invalid="ignore", divide="ignore"):
                per_norm = np.bincount(pl[ok], weights=hit_n[ok], minlength=L) / np.bincount(pl[ok], minlength=L)
        return ProbeResult(
            keys=keys,
            pck=float(hit.mean()),
            per_landmark=per,
            n_points_per_landmark=cnt,
            pck_norm=pck_norm,
            per_landmark_norm=per_norm,
            chance=self.chance_,
            n_pairs=int(len(np.unique(pp))),
            n_points=int(len(pp)),
            alpha=self.alpha,
            errors=err.astype(np.float32),
            point_landmark=pl.astype(np.int32),
            point_pair=pp.astype(np.int32),
        )

    def score(self, features: FeatureMaps, keys: Sequence[str] | None = None, progress: bool = False) -> ProbeResult:
        """Transfer PCK of the combination ``keys`` (default: every key of ``features``)."""
        combo = tuple(sorted(keys if keys is not None else features))
        return self._result(combo, self._match(features, [combo], progress)[combo])

    def sweep(self, features: FeatureMaps, keys: Sequence[str] | None = None, top: Sequence[int] = (2, 3), progress: bool = True) -> list[ProbeResult]:
        """Score every single key and :func:`standard_combinations`; one result per (kind, combination).

        Two passes over the target images: the single keys with the per-layer,
        per-timestep and all-key combinations, then the best-n combinations
        (which need the single results). A combination reached by two kinds
        (e.g. ``best2`` equal to a ``layer`` combination) is scored once and
        reported under both kinds.
        """
        keys = sorted(keys if keys is not None else features)
        first = [(k,) for k in keys] + [c for kind, c in standard_combinations(keys) if kind in ("layer", "timestep", "all")]
        first = list(dict.fromkeys(first))
        done = {c: self._result(c, p) for c, p in self._match(features, first, progress, "probe pass 1").items()}
        single = {k: done[(k,)].pck for k in keys}
        combos = standard_combinations(keys, single, top)
        todo = list(dict.fromkeys(c for _, c in combos if c not in done))
        if todo:
            done.update({c: self._result(c, p) for c, p in self._match(features, todo, progress, "probe pass 2").items()})
        return [replace(done[(k,)], kind="single") for k in keys] + [replace(done[c], kind=kind) for kind, c in combos]


def top_combinations(results: Sequence[ProbeResult], n: int = 3, grid_only: bool = False) -> list[ProbeResult]:
    """The ``n`` best distinct key sets by PCK (ties: fewer keys, then name); ``grid_only`` keeps
    combinations a FeatureSpec can express (layers x timesteps)."""
    seen: dict[tuple[str, ...], ProbeResult] = {}
    for r in results:
        if (not grid_only or is_grid(r.keys)) and r.keys not in seen:
            seen[r.keys] = r
    return sorted(seen.values(), key=lambda r: (-r.pck, r.n_keys, r.name))[: int(n)]


def pck_grid(results: Sequence[ProbeResult]) -> tuple[np.ndarray, list[str], list[int]]:
    """(n_layers, n_timesteps) PCK of the single keys with the layer and timestep labels (NaN where not probed)."""
    singles = {r.keys[0]: r.pck for r in results if r.n_keys == 1}
    if not singles:
        raise ConfigError("no single-key results to arrange in a grid", where="pck_grid")
    layers, ts = grid_of(list(singles))
    grid = np.full((len(layers), len(ts)), np.nan)
    for k, v in singles.items():
        layer, t = parse_feature_key(k)
        grid[layers.index(layer), ts.index(t)] = v
    return grid, layers, ts
