"""Figures for the evaluation: CED curves and the feature-probe heatmap (PNG, written atomically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.evaluation.nme import ced_curve
from storage.atomic import atomic_path


def plot_ced(curves: dict[str, np.ndarray], path: str | Path, max_error: float = 10.0, title: str = "CED") -> Path:
    """Plot one CED curve per entry of ``curves`` (label -> per-image NME in %) to a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    # The x-range covers at least max_error, and 95% of the images when errors are larger
    # (a curve flat at 0 over [0, 10] says nothing); the legend's AUC stays at max_error.
    finite = np.concatenate([np.asarray(e, dtype=float)[np.isfinite(np.asarray(e, dtype=float))] for e in curves.values()] or [np.zeros(0)])
    x_max = max_error if finite.size == 0 else max(max_error, float(np.ceil(np.percentile(finite, 95) / 5.0) * 5.0))
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for label, errors in curves.items():
        _, _, auc = ced_curve(errors, max_error=max_error)
        t, frac, _ = ced_curve(errors, max_error=x_max, n_points=401)
        n = int(np.isfinite(np.asarray(errors, dtype=float)).sum())
        ax.plot(t, frac, label=f"{label} (AUC@{max_error:g}={auc:.3f}, n={n})")
    if x_max > max_error:
        ax.axvline(max_error, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("NME (% of normaliser)")
    ax.set_ylabel("fraction of test images")
    ax.set_xlim(0, x_max)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_probe_heatmap(
    pck: np.ndarray,
    layers: list[str],
    timesteps: list[int],
    path: str | Path,
    *,
    layer_rows: np.ndarray | None = None,
    timestep_cols: np.ndarray | None = None,
    all_keys: float | None = None,
    chance: float | None = None,
    title: str = "transfer PCK",
) -> Path:
    """Annotated heatmap of transfer PCK, layers (rows) x timesteps (columns), to a PNG at ``path``.

    Optional margins: ``layer_rows`` (n_layers,) = PCK of each layer over all its
    timesteps (an extra column "all t"), ``timestep_cols`` (n_timesteps,) = PCK
    of each timestep over all layers (an extra row "all layers"), ``all_keys``
    in the corner. One colour scale from 0 to the best value for every cell, so
    margins and singles compare directly.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    grid = np.asarray(pck, dtype=float)
    n_l, n_t = grid.shape
    extra_c, extra_r = layer_rows is not None, timestep_cols is not None
    full = np.full((n_l + extra_r, n_t + extra_c), np.nan)
    full[:n_l, :n_t] = grid
    if extra_c:
        full[:n_l, n_t] = np.asarray(layer_rows, dtype=float)
    if extra_r:
        full[n_l, :n_t] = np.asarray(timestep_cols, dtype=float)
    if extra_c and extra_r and all_keys is not None:
        full[n_l, n_t] = float(all_keys)
    vmax = float(np.nanmax(full)) if np.isfinite(full).any() else 1.0
    fig, ax = plt.subplots(figsize=(1.1 + 0.75 * full.shape[1], 1.0 + 0.45 * full.shape[0]), dpi=120)
    im = ax.imshow(np.ma.masked_invalid(full), cmap="viridis", vmin=0.0, vmax=max(vmax, 1e-6), aspect="auto")
    best = np.unravel_index(np.nanargmax(np.where(np.isfinite(grid), grid, -np.inf)), grid.shape) if np.isfinite(grid).any() else None
    for i in range(full.shape[0]):
        for j in range(full.shape[1]):
            v = full[i, j]
            if np.isfinite(v):
                bold = best is not None and (i, j) == tuple(best)
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, fontweight="bold" if bold else "normal",
                        color="black" if v > 0.6 * vmax else "white")
    if extra_c:
        ax.axvline(n_t - 0.5, color="white", lw=2)
    if extra_r:
        ax.axhline(n_l - 0.5, color="white", lw=2)
    ax.set_xticks(range(full.shape[1]), [f"t={t}" for t in timesteps] + (["all t"] if extra_c else []), fontsize=7)
    ax.set_yticks(range(full.shape[0]), list(layers) + (["all layers"] if extra_r else []), fontsize=7)
    ax.set_xlabel("timestep")
    ax.set_ylabel("layer")
    ax.set_title(title + (f" (chance {chance:.3f})" if chance is not None else ""), fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
