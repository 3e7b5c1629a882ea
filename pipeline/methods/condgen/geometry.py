"""The geometry bottleneck and the warps that make training pairs.

Coordinates: normalised crop units ``u in [-1, 1]`` with ``align_corners=False``
(torch's ``affine_grid`` / ``grid_sample`` convention), which is exactly the
project's pixel convention (:mod:`pipeline.datasets.crop`: pixel ``i`` spans
``[i, i+1)``): ``u = 2 x / S - 1`` and ``x = (u + 1) S / 2`` in crop pixels.
Points are ``(x, y)`` pairs.
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
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ones = torch.ones_like(images[:, :1])
    valid = F.grid_sample(ones, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped, valid


def warp_points(points: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Where source points (B, K, 2) (normalised) land in the image warped by :func:`warp_images`.

    ``warp_images`` samples the source at ``A p + t`` for target pixel ``p``, so a
    source point ``q`` appears at ``p = A^-1 (q - t)``.
    """
    a, t = theta[:, :, :2], theta[:, :, 2]
    return torch.linalg.solve(a[:, None], (points - t[:, None, :])[..., None])[..., 0]
