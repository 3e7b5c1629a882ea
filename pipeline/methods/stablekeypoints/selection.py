"""Choosing K of the N optimised tokens (seed 002; method brief item 5).

Per image: the ``top`` best-localised tokens (lowest localisation loss of
their map), thinned to K by furthest-point sampling over their argmax
positions, so the K tokens of one image cover K different places. Over a sample
of images: the K tokens chosen most often are the landmarks (ties: the lower
mean localisation loss wins), so a token that localises well on only a few
images is not picked.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import ConfigError


def furthest_point_sampling(points: np.ndarray, k: int, first: int = 0) -> np.ndarray:
    """Indices of ``k`` of ``points`` (M, 2): start at ``first``, then repeatedly the point furthest from those chosen."""
    points = np.asarray(points, dtype=np.float64)
    m = len(points)
    if not 1 <= k <= m:
        raise ConfigError(f"cannot pick {k} of {m} points", where="furthest_point_sampling", fix="k must be in [1, number of points]")
    chosen = [int(first)]
    dist = np.linalg.norm(points - points[first], axis=1)
    for _ in range(k - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(points - points[nxt], axis=1))
    return np.asarray(chosen, dtype=np.int64)


def tokens_per_image(loss: np.ndarray, points: np.ndarray, k: int, top: int, inside: np.ndarray | None = None) -> np.ndarray:
    """(n_images, K) token ids: for each image the ``top`` lowest-loss tokens, then FPS to ``k`` (best token first).

    ``inside`` (n_images, N) bool: whether the token's peak lies in the image's object box.
    Tokens peaking outside are candidates only after every inside one (so an image still gets
    ``k``): a map that is compact on the crop's border or the background is well localised
    but marks no part of the object.
    """
    loss, points = np.asarray(loss), np.asarray(points)
    n_img, n_tok = loss.shape
    top = min(max(top, k), n_tok)
    out = np.empty((n_img, k), dtype=np.int64)
    for i in range(n_img):
        outside = np.zeros(n_tok, bool) if inside is None else ~np.asarray(inside[i], bool)
        best = np.lexsort((loss[i], outside))[:top]  # inside first, then by loss
        out[i] = best[furthest_point_sampling(points[i, best], k, first=0)]
    return out


def most_frequent_tokens(per_image: np.ndarray, loss: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` tokens chosen most often in ``per_image`` (ties: lower mean loss), in that order."""
    n_tok = loss.shape[1]
    counts = np.bincount(np.asarray(per_image).reshape(-1), minlength=n_tok)
    mean_loss = np.asarray(loss).mean(axis=0)
    order = np.lexsort((mean_loss, -counts))  # primary: count (descending), secondary: mean loss
    return order[:k].astype(np.int64)
