"""StableKeypoints' two losses on token attention maps (Hedlin et al., seed 002).

Seed 002, Fig. 2: "We then optimize the text embedding to have localized
attention maps, by supervising them to become a single-mode Gaussian
distribution, drawn at the location of their maxima. We also enforce attention
maps to be transformation equivariant to small affine transformations on
images." Method brief (item 5): MSE to a Gaussian with sigma ~2 map cells,
centred at the argmax.

Maps are (B, n, R, R); each is divided by its spatial maximum before it is
compared with a unit-height Gaussian, so the localisation loss measures the
*shape* of a map (one compact bump, nothing elsewhere), not its mass: the
softmax over tokens gives the maps very different totals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.methods.condgen.geometry import cell_centres, gaussian_maps, warp_images


def peak_normalised(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each (R, R) map divided by its maximum (values in [0, 1])."""
    return maps / (maps.flatten(2).amax(dim=-1)[..., None, None] + eps)


def argmax_points(maps: torch.Tensor) -> torch.Tensor:
    """(B, n, R, R) maps -> (B, n, 2) normalised ``(x, y)`` cell centres of each map's maximum (no gradient)."""
    b, n, h, w = maps.shape
    flat = maps.detach().flatten(2).argmax(dim=-1)
    ys, xs = cell_centres(h, w, maps.device)
    return torch.stack([xs[flat % w], ys[flat // w]], dim=-1)


def localisation_loss(maps: torch.Tensor, sigma_cells: float = 2.0, reduce: bool = True) -> torch.Tensor:
    """Seed 002's localisation term: ``mean || M / max M - G(argmax M, sigma) ||^2``.

    The Gaussian is drawn at the (detached) argmax with a width of
    ``sigma_cells`` map cells. ``reduce=False`` returns the loss per map
    (B, n), which the token selection reads as "how well localised".
    """
    _, _, h, w = maps.shape
    target = gaussian_maps(argmax_points(maps), h, w, 2.0 * sigma_cells / h)  # cells -> normalised units
    per = (peak_normalised(maps) - target).pow(2).flatten(2).mean(dim=-1)
    return per.mean() if reduce else per


def equivariance_loss(maps: torch.Tensor, maps_of_warped: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Seed 002's equivariance term: ``|| T(M(x)) - M(T(x)) ||^2`` over the warp's valid area.

    ``maps``: (B, n, R, R) of the images; ``maps_of_warped``: of the images
    warped by ``theta`` (:func:`warp_images`' convention). The maps of the
    images are warped the same way and compared (peak-normalised) where the
    warp did not bring in area from outside.
    """
    warped, valid = warp_images(peak_normalised(maps), theta)
    diff = (warped - peak_normalised(maps_of_warped)).pow(2) * valid
    return diff.sum() / (valid.sum() * maps.shape[1]).clamp_min(1.0)


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """The inverse of (B, 2, 3) affine maps ``p -> A p + t``: ``q -> A^-1 q - A^-1 t``."""
    a_inv = torch.linalg.inv(theta[:, :, :2])
    return torch.cat([a_inv, -(a_inv @ theta[:, :, 2:])], dim=-1)


def unwarp_maps(maps_of_warped: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring maps of images warped by ``theta`` back to the original frame; returns ``(maps, valid)``."""
    return warp_images(maps_of_warped, invert_affine(theta))


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    return maps if maps.shape[-1] == size else F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
