"""Contact sheets: a grid of crops with their landmarks, for eyeballing data and results.

Drawn with matplotlib's object API on an Agg canvas (no global backend switch,
no display needed). Landmark ``k`` always gets the same colour across the sheet
and in the legend, so a wrong point order or a drifting discovered landmark is
visible at a glance. Invisible landmarks (``visible`` False) are drawn as
hollow circles; NaN points are not drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError
from storage.atomic import atomic_path


def landmark_colours(n: int) -> np.ndarray:
    """(n, 4) RGBA colours, distinct for up to 20 landmarks, cycling hues beyond."""
    from matplotlib import colormaps

    if n <= 10:
        return colormaps["tab10"](np.arange(n) % 10)
    if n <= 20:
        return colormaps["tab20"](np.arange(n) % 20)
    return colormaps["hsv"](np.linspace(0.0, 1.0, n, endpoint=False))


def contact_sheet(
    images: np.ndarray,
    landmarks: np.ndarray | None,
    visible: np.ndarray | None,
    names: Sequence[str],
    path: str | Path,
    title: str,
    cols: int = 8,
) -> Path:
    """Write a PNG grid of ``images`` (n, S, S, 3) uint8 with coloured landmark dots.

    ``landmarks`` (n, L, 2) are in crop pixels (pixel-centre convention of
    :mod:`pipeline.datasets.crop`: pixel j spans [j, j+1)); ``visible`` (n, L)
    marks occluded points; ``names`` labels the L landmarks in the legend (empty
    for unlabelled data). Returns ``path``; the file is written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    imgs = np.asarray(images)
    if imgs.ndim != 4 or imgs.shape[-1] != 3 or imgs.dtype != np.uint8:
        raise ConfigError(f"contact_sheet expects uint8 images (n, S, S, 3), got {imgs.dtype} {imgs.shape}", where="images")
    n = imgs.shape[0]
    if n == 0:
        raise ConfigError("contact_sheet got no images", where="images", fix="pass at least one image")
    lm = None if landmarks is None else np.asarray(landmarks, dtype=np.float64)
    if lm is not None and (lm.ndim != 3 or lm.shape[0] != n or lm.shape[2] != 2):
        raise ConfigError(f"landmarks must be (n={n}, L, 2), got {lm.shape}", where="landmarks")
    n_points = 0 if lm is None else lm.shape[1]
    if n_points and len(names) not in (0, n_points):
        raise ConfigError(f"{len(names)} names for {n_points} landmarks", where="names")
    vis = np.ones((n, n_points), bool) if visible is None or lm is None else np.asarray(visible, dtype=bool)
    if vis.shape != (n, n_points):
        raise ConfigError(f"visible must be (n={n}, L={n_points}), got {vis.shape}", where="visible")
    labels = list(names) if len(names) else [f"landmark {k}" for k in range(n_points)]

    cols = max(1, min(int(cols), n))
    rows = math.ceil(n / cols)
    cell = 1.6  # inches per crop; large enough to see a 2 px dot on a 64 px crop
    legend_rows = math.ceil(n_points / 5) if n_points else 0
    fig = Figure(figsize=(cols * cell, rows * cell + 0.5 + 0.3 * legend_rows), dpi=100)
    FigureCanvasAgg(fig)
    top = 1.0 - 0.5 / (rows * cell + 0.5 + 0.3 * legend_rows)
    bottom = (0.3 * legend_rows + 0.05) / (rows * cell + 0.5 + 0.3 * legend_rows) if n_points else 0.01
    grid = fig.add_gridspec(rows, cols, left=0.01, right=0.99, top=top, bottom=bottom, wspace=0.03, hspace=0.03)
    colours = landmark_colours(n_points)
    size = imgs.shape[1]
    dot = max(6.0, 40.0 / max(1, n_points) ** 0.5)
    for i in range(n):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        # extent puts pixel j's centre at j + 0.5, matching the crop coordinates.
        ax.imshow(imgs[i], extent=(0, imgs.shape[2], imgs.shape[1], 0), interpolation="nearest")
        if n_points:
            pts = lm[i]
            ok = ~np.isnan(pts).any(axis=1)
            on = ok & vis[i]
            off = ok & ~vis[i]
            ax.scatter(pts[on, 0], pts[on, 1], s=dot, c=colours[on], edgecolors="white", linewidths=0.4)
            ax.scatter(pts[off, 0], pts[off, 1], s=dot, facecolors="none", edgecolors=colours[off], linewidths=0.8)
        ax.set_xlim(0, imgs.shape[2])
        ax.set_ylim(size, 0)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    if n_points:
        handles = [Line2D([], [], marker="o", linestyle="", color=colours[k], label=labels[k]) for k in range(n_points)]
        fig.legend(handles=handles, loc="lower center", ncol=min(5, n_points), fontsize=7, frameon=False)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def landmark_overlay(image: np.ndarray, points: np.ndarray, detected: np.ndarray | None, path: str | Path, title: str, max_side: float = 6.0) -> Path:
    """Write a PNG of one image (H, W, 3) uint8 with its K landmarks (K, 2) in its own pixels.

    The colours are :func:`contact_sheet`'s (landmark ``k`` has the same colour
    on every overlay and sheet); ``detected`` False draws a hollow circle (a
    filled-in, not detected, landmark); NaN points are not drawn.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ConfigError(f"landmark_overlay expects a uint8 image (H, W, 3), got {img.dtype} {img.shape}", where="image")
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    det = np.ones(len(pts), bool) if detected is None else np.asarray(detected, dtype=bool).reshape(-1)
    h, w = img.shape[:2]
    scale = max_side / max(h, w)
    fig = Figure(figsize=(max(1.5, w * scale), max(1.5, h * scale) + 0.3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - 0.3 / (max(1.5, h * scale) + 0.3)))
    ax.imshow(img, extent=(0, w, h, 0), interpolation="nearest")  # pixel j's centre at j + 0.5
    colours = landmark_colours(len(pts))
    ok = ~np.isnan(pts).any(axis=1)
    dot = max(30.0, 120.0 / max(1, len(pts)) ** 0.5)  # points^2: readable on a 6-inch figure
    ax.scatter(pts[ok & det, 0], pts[ok & det, 1], s=dot, c=colours[ok & det], edgecolors="white", linewidths=0.5)
    ax.scatter(pts[ok & ~det, 0], pts[ok & ~det, 1], s=dot, facecolors="none", edgecolors=colours[ok & ~det], linewidths=1.0)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
