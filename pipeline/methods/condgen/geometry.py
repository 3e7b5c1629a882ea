"""The geometry bottleneck and the warps that make training pairs.

Coordinates: normalised crop units ``u in [-1, 1]`` with ``align_corners=False``
(torch's ``affine_grid`` / ``grid_sample`` convention), which is exactly the
project's pixel convention (:mod:`pipeline.datasets.crop`: pixel ``i`` spans
``[i, i+1)``): ``u = 2 x / S - 1`` and ``x = (u + 1) S / 2`` in crop pixels.
Points are ``(x, y)`` pairs.

Warps (Jakab et al.'s training pairs): :func:`random_affine` thetas and
:func:`random_tps` thin-plate-spline deformations, both maps from target to
source coordinates; :func:`tps_grid` composes the two into one dense
``grid_sample`` grid and :func:`sample_grid` applies it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cell_centres(h: int, w: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised centres of a ``h x w`` grid's cells: ``(ys (h,), xs (w,))``."""
    ys = (torch.arange(h, dtype=torch.float32, device=device) * 2 + 1) / h - 1
    xs = (torch.arange(w, dtype=torch.float32, device=device) * 2 + 1) / w - 1
    return ys, xs


def spatial_softmax(heatmaps: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) raw heatmaps -> per-channel probability maps (softmax over the h*w cells).

    Jakab et al. 2018 (seed 003, Sec. III-C): "each heatmap is
    transformed into a probability map by applying softmax spatially".
    """
    b, k, h, w = heatmaps.shape
    return F.softmax(heatmaps.reshape(b, k, h * w), dim=-1).reshape(b, k, h, w)


def expected_coordinates(prob: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) probability maps -> (B, K, 2) expected ``(x, y)`` in normalised units.

    The landmark is the map's centre of mass (seed 003, Sec. III-C, "each heatmap's center of mass, or expected value":
    ``u_k = sum_u u * softmax(Phi_k)(u)``), differentiable in the heatmaps.
    """
    _, _, h, w = prob.shape
    ys, xs = cell_centres(h, w, prob.device)
    x = (prob.sum(dim=2) * xs).sum(dim=-1)  # marginal over rows, then E[x]
    y = (prob.sum(dim=3) * ys).sum(dim=-1)
    return torch.stack([x, y], dim=-1)


def gaussian_maps(points: torch.Tensor, h: int, w: int, sigma: float) -> torch.Tensor:
    """(B, K, 2) normalised points -> (B, K, h, w) isotropic Gaussians ``exp(-|p - u_k|^2 / (2 sigma^2))``.

    The bottleneck of Jakab et al. (seed 003, Sec. III-C, "a 2D Gaussian blob centered on that spot"): only the K coordinates
    pass from the target image to the generator, rendered as fixed-width blobs,
    so the generator cannot read anything but geometry from them.
    """
    ys, xs = cell_centres(h, w, points.device)
    dx = (xs[None, None, None, :] - points[..., 0, None, None]) ** 2
    dy = (ys[None, None, :, None] - points[..., 1, None, None]) ** 2
    return torch.exp(-(dx + dy) / (2.0 * sigma * sigma))


def to_crop_pixels(points: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised ``[-1, 1]`` points -> crop pixels of an ``size`` px crop."""
    return (points + 1.0) * (size / 2.0)


def to_normalised(points: torch.Tensor, size: int) -> torch.Tensor:
    """Crop pixels -> normalised ``[-1, 1]`` units (inverse of :func:`to_crop_pixels`)."""
    return points * (2.0 / size) - 1.0


# ---------------------------------------------------------------- warps (Jakab's synthetic pairs)
def random_affine(
    n: int,
    generator: torch.Generator,
    rotation_deg: float = 15.0,
    log_scale: float = 0.1,
    translation: float = 0.1,
    shear: float = 0.05,
) -> torch.Tensor:
    """``n`` random affine maps as ``affine_grid`` thetas (n, 2, 3): target coords -> source coords.

    Rotation uniform in +-``rotation_deg``, isotropic scale ``exp(U(+-log_scale))``,
    translation uniform in +-``translation`` (normalised units, i.e. a share of
    the half-side), shear uniform in +-``shear``. Drawn on the CPU from
    ``generator`` so a training step's warps depend only on its seed.
    """

    def uniform(scale: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * scale

    ang = uniform(math.radians(rotation_deg))
    sc = torch.exp(uniform(log_scale))
    sh = uniform(shear)
    t = torch.stack([uniform(translation), uniform(translation)], dim=1)
    cos, sin = torch.cos(ang), torch.sin(ang)
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (n, 2, 2)
    shear_m = torch.stack([torch.stack([torch.ones(n), sh], 1), torch.stack([torch.zeros(n), torch.ones(n)], 1)], 1)
    a = sc[:, None, None] * rot @ shear_m
    return torch.cat([a, t[:, :, None]], dim=2)


def warp_images(images: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp (B, C, S, S) images with ``theta`` (B, 2, 3); returns ``(warped, valid)``.

    ``warped[b](p) = images[b](A p + t)`` (bilinear, zeros outside). ``valid``
    (B, 1, S, S) is the share of each target pixel that came from inside the
    source: Jakab et al. mask the area a warp brings in from outside the image
    (seed 003, Sec. III-B) so the loss never asks the generator to draw it.
    """
    return sample_grid(images, F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False))


def warp_points(points: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Where source points (B, K, 2) (normalised) land in the image warped by :func:`warp_images`.

    ``warp_images`` samples the source at ``A p + t`` for target pixel ``p``, so a
    source point ``q`` appears at ``p = A^-1 (q - t)``.
    """
    a, t = theta[:, :, :2], theta[:, :, 2]
    return torch.linalg.solve(a[:, None], (points - t[:, None, :])[..., None])[..., 0]


def sample_grid(images: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (B, C, S, S) images at ``grid`` (B, S, S, 2) source ``(x, y)``; returns ``(warped, valid)`` as :func:`warp_images`."""
    grid = grid.to(images.dtype)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ones = torch.ones_like(images[:, :1])
    valid = F.grid_sample(ones, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped, valid


def pixel_centre_grid(size: int, device: torch.device | None = None) -> torch.Tensor:
    """(S*S, 2) normalised ``(x, y)`` of an ``S x S`` image's pixel centres, row-major (``grid_sample``'s order)."""
    ys, xs = cell_centres(size, size, device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)


# ---------------------------------------------------------------- thin-plate-spline warps
# A TPS map f: R^2 -> R^2 through M control points c_i is
#     f(p) = a_0 + a_x x + a_y y + sum_i w_i U(|p - c_i|),   U(r) = r^2 log r^2  (U(0) = 0),
# the interpolant of f(c_i) = d_i with the least bending energy; its coefficients solve
#     [ K   P ] [ w ]   [ d ]      K_ij = U(|c_i - c_j|),  P_i = (1, x_i, y_i),
#     [ P^T 0 ] [ a ] = [ 0 ],     (the P^T w = 0 rows make the affine part carry all the affine motion).
# As with the affine thetas, f maps *target* coordinates to *source* coordinates: the warped
# image at p shows the source at f(p), so the content at d_i appears at c_i.
def _tps_kernel(r2: torch.Tensor) -> torch.Tensor:
    """``U`` from squared distances: ``r^2 log r^2``, continued by 0 at r = 0 (its limit)."""
    return torch.where(r2 > 0, r2 * torch.log(r2.clamp_min(1e-30)), torch.zeros_like(r2))


def tps_control_points(grid_size: int = 5, device: torch.device | None = None) -> torch.Tensor:
    """(grid_size^2, 2) control points on a regular grid spanning the crop, ``[-1, 1]`` edge to edge, row-major."""
    if grid_size < 2:
        raise ValueError(f"a TPS control grid needs at least 2 points a side, got {grid_size}")
    t = torch.linspace(-1.0, 1.0, grid_size, device=device)
    gy, gx = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)


def solve_tps(ctrl: torch.Tensor, displaced: torch.Tensor) -> torch.Tensor:
    """TPS coefficients (n, M + 3, 2) (``w`` then ``a_0, a_x, a_y``) of the maps with ``f(ctrl_i) = displaced[:, i]``.

    ``ctrl`` (M, 2) is shared by the batch, so the system matrix is built and
    factorised once; solved in float64 because ``K`` is badly conditioned for
    close points and the interpolation should be exact to float32 precision.
    """
    m = ctrl.shape[0]
    c = ctrl.double()
    k = _tps_kernel(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))
    p = torch.cat([torch.ones(m, 1, dtype=c.dtype, device=c.device), c], dim=1)
    system = torch.zeros(m + 3, m + 3, dtype=c.dtype, device=c.device)
    system[:m, :m], system[:m, m:], system[m:, :m] = k, p, p.T
    rhs = torch.zeros(displaced.shape[0], m + 3, 2, dtype=c.dtype, device=c.device)
    rhs[:, :m] = displaced.double()
    return torch.linalg.solve(system, rhs).to(displaced.dtype)


def tps_map(points: torch.Tensor, ctrl: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Evaluate the TPS maps ``coeffs`` (n, M + 3, 2) (from :func:`solve_tps`) at ``points`` (n, P, 2) or (P, 2) -> (n, P, 2)."""
    m = ctrl.shape[0]
    pts = points.expand(coeffs.shape[0], -1, -1) if points.ndim == 2 else points
    u = _tps_kernel(((pts[:, :, None, :] - ctrl[None, None].to(pts)) ** 2).sum(-1))  # (n, P, M)
    basis = torch.cat([u, torch.ones_like(pts[..., :1]), pts], dim=-1)  # (n, P, M + 3)
    return basis @ coeffs.to(pts)


def random_tps(n: int, generator: torch.Generator, grid_size: int = 5, scale: float = 0.1) -> torch.Tensor:
    """``n`` random TPS deformations as displaced control points (n, grid_size^2, 2): where each grid point samples from.

    Each control point of :func:`tps_control_points` is moved by an offset
    uniform in +-``scale`` per axis (normalised units). Drawn on the CPU from
    ``generator`` (resumable, like :func:`random_affine`). Bounded offsets with
    ``scale`` well under half the grid spacing (``1 / (grid_size - 1)``) keep
    neighbouring control points in order, so the warp does not fold.
    """
    ctrl = tps_control_points(grid_size)
    offsets = (torch.rand(n, ctrl.shape[0], 2, generator=generator) * 2 - 1) * scale
    return ctrl[None] + offsets


def tps_grid(displaced: torch.Tensor, size: int, theta: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``grid_sample`` grid (n, S, S, 2) of the TPS through ``displaced`` (n, M, 2), then ``theta`` (n, 2, 3) if given.

    The grid holds, for each target pixel centre ``p`` (``align_corners=False``
    convention), the source point ``A f(p) + t``: the TPS deforms first, the
    affine map then moves the deformed sampling positions. With zero offsets the
    TPS is the identity and the grid is ``affine_grid(theta)``'s.
    """
    n, m, _ = displaced.shape
    grid_size = int(round(math.sqrt(m)))
    if grid_size * grid_size != m:
        raise ValueError(f"displaced control points must form a square grid, got {m} points")
    ctrl = tps_control_points(grid_size, displaced.device).to(displaced.dtype)
    coeffs = solve_tps(ctrl, displaced)
    src = tps_map(pixel_centre_grid(size, displaced.device).to(displaced.dtype), ctrl, coeffs)  # (n, S*S, 2)
    if theta is not None:
        th = theta.to(src)
        src = src @ th[:, :, :2].transpose(1, 2) + th[:, None, :, 2]
    return src.reshape(n, size, size, 2)
