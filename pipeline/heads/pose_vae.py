"""Pose-guided proxy task of D-ULD++ (paper 001, Sec 3.3.1): a VAE on the detector heatmap.

The VAE ``Psi_V`` reads the detector's single-channel heatmap ``H_j`` (B, 1, R, R),
encodes it into a 64-d latent *pose code* ``phi_j`` (mean and log-variance of a
diagonal Gaussian posterior), and decodes a sample of it into a single-channel
map ``G_j``. The decoder's target is not ``H_j`` itself but a clean rendering of
``K`` 2-D Gaussians at the image's landmark positions (:func:`gaussian_pose_map`):
squeezing the noisy heatmap through a low-dimensional code and asking for a
clean landmark configuration back is what "removes the localisation noise" and
makes the code describe the collective configuration (the pose), not local
appearance. The paper trains it with an ELBO (:func:`pipeline.heads.pose_losses.elbo_loss`)
and, in D-ULD++'s second step, drops the decoder and trains the encoder with the
latent contrastive loss of Eq. 3 (:func:`pipeline.heads.pose_losses.latent_contrastive_loss`).

The paper fixes only the latent size (64); the layer layout here (stride-2
3x3 convolutions down to ``R / 2**len(widths)``, a linear layer to the code, and
the mirror image with nearest-neighbour upsampling in the decoder) is ours.
Upsample + conv rather than transposed convolutions: the target is a few
smooth blobs, and transposed convolutions print checkerboard patterns on it.
No batch normalisation: codes of single images must not depend on the batch
they were computed in (TSC clusters them across the whole training set).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.heads.losses import heatmap_targets


@dataclass(frozen=True)
class PoseVAEConfig:
    """Shape of :class:`PoseVAE`.

    ``size``: heatmap resolution R (the detector's ``out_size``), divisible by
    ``2 ** len(widths)``. ``k``: landmarks per target map. ``latent``: code size
    (paper: 64). ``widths``: channels of the encoder's stride-2 stages (the
    decoder mirrors them). ``sigma``: target Gaussians' standard deviation in
    map cells (the D-ULD pseudo-label heatmaps use 1.0 as well).
    """

    size: int
    k: int
    latent: int = 64
    widths: tuple[int, ...] = (16, 32, 64)
    sigma: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        for name in ("size", "k", "latent"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}", where=f"PoseVAEConfig.{name}")
        if not self.widths or min(self.widths) < 1:
            raise ConfigError(f"widths must be positive channel counts, got {self.widths}", where="PoseVAEConfig.widths")
        if self.size % (2 ** len(self.widths)):
            raise ConfigError(
                f"heatmap size {self.size} is not divisible by 2**{len(self.widths)} (one halving per width)",
                where="PoseVAEConfig(size, widths)",
                fix="use fewer widths or a heatmap size that is a multiple of 2**len(widths)",
            )
        if not self.sigma > 0:
            raise ConfigError(f"sigma must be > 0, got {self.sigma}", where="PoseVAEConfig.sigma")

    @property
    def bottom(self) -> int:
        """Spatial size of the deepest feature map."""
        return self.size // (2 ** len(self.widths))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "PoseVAEConfig":
        return cls(**dict(d))


class PoseVAEOutput(NamedTuple):
    logits: torch.Tensor  # (B, 1, R, R) decoder logits; G = sigmoid(logits)
    mu: torch.Tensor  # (B, latent) posterior mean: the pose code phi
    logvar: torch.Tensor  # (B, latent) posterior log-variance
    z: torch.Tensor  # (B, latent) the code the decoder read (a sample in training, mu otherwise)


def gaussian_pose_map(points: torch.Tensor, present: torch.Tensor, size: int, sigma: float = 1.0) -> torch.Tensor:
    """The VAE's target ``G``: K 2-D Gaussians (peak 1) on one channel (paper 001, Sec 3.3.1).

    ``points`` (B, K, 2) normalised coordinates (x, y) in [-1, 1] (the
    ``pipeline.heads`` convention, ``n = 2 x / S - 1`` for crop pixels ``x``);
    ``present`` (B, K) bool, absent landmarks draw nothing; ``size`` R;
    ``sigma`` in map cells. Returns (B, 1, R, R) float in [0, 1].

    Overlapping Gaussians combine by their maximum, not their sum: the map stays
    in [0, 1], which the Bernoulli reconstruction term of the ELBO needs, and two
    nearby landmarks do not make one brighter blob. This is the same rendering as
    the detector's pseudo-label heatmaps (:func:`pipeline.heads.losses.heatmap_targets`),
    so the VAE's target and the detector's MSE target agree cell for cell.
    """
    points = torch.as_tensor(points)
    present = torch.as_tensor(present)
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ConfigError(f"points must be (B, K, 2), got {tuple(points.shape)}", where="gaussian_pose_map")
    if present.shape != points.shape[:2]:
        raise ConfigError(
            f"present {tuple(present.shape)} does not match points {tuple(points.shape[:2])}", where="gaussian_pose_map"
        )
    if int(size) < 1 or not sigma > 0:
        raise ConfigError(f"size must be >= 1 and sigma > 0, got {size}, {sigma}", where="gaussian_pose_map")
    points = points.float()
    # absent points may carry NaN coordinates (PseudoLabels store NaN); park them anywhere finite
    points = torch.where(present[..., None].bool(), points, torch.zeros_like(points))
    return heatmap_targets(points, present.bool(), int(size), float(sigma))


class PoseVAE(nn.Module):
    """Encoder ``H -> (mu, logvar)`` of the pose code, reparameterised sample, decoder ``z -> G`` logits."""

    def __init__(self, config: PoseVAEConfig) -> None:
        super().__init__()
        self.config = config
        w = config.widths
        enc: list[nn.Module] = []
        c_in = 1
        for c in w:
            enc += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        flat = w[-1] * config.bottom**2
        self.to_stats = nn.Linear(flat, 2 * config.latent)
        self.from_code = nn.Linear(config.latent, flat)
        dec: list[nn.Module] = []
        outs = list(reversed(w))[1:] + [w[0]]
        for c_in, c_out in zip(reversed(w), outs):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        self.decoder = nn.Sequential(*dec, nn.Conv2d(w[0], 1, 3, padding=1))

    def _check(self, heatmap: torch.Tensor) -> None:
        R = self.config.size
        if heatmap.dim() != 4 or tuple(heatmap.shape[1:]) != (1, R, R):
            raise ConfigError(
                f"the pose VAE reads (B, 1, {R}, {R}) heatmaps, got {tuple(heatmap.shape)}",
                where="PoseVAE.encode",
                fix="build PoseVAEConfig(size=...) with the detector's out_size",
            )

    def encode(self, heatmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, R, R) heatmap in [0, 1] -> posterior mean and log-variance, each (B, latent)."""
        self._check(heatmap)
        mu, logvar = self.to_stats(self.encoder(heatmap)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent) code -> (B, 1, R, R) logits of ``G``."""
        b = self.config.bottom
        h = self.from_code(z).reshape(z.shape[0], self.config.widths[-1], b, b)
        return self.decoder(h)

    @staticmethod
    def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``z = mu + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` (Kingma & Welling 2014), seeded by ``generator``."""
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return mu + torch.exp(0.5 * logvar) * eps

    def forward(
        self, heatmap: torch.Tensor, sample: bool | None = None, generator: torch.Generator | None = None
    ) -> PoseVAEOutput:
        """Encode, sample (``sample=None``: in training mode only), decode.

        Outside training the decoder reads the mean, so the same heatmap always
        gives the same reconstruction and the same pose code.
        """
        mu, logvar = self.encode(heatmap)
        if sample is None:
            sample = self.training
        z = self.reparameterise(mu, logvar, generator) if sample else mu
        return PoseVAEOutput(self.decode(z), mu, logvar, z)

    def target(self, points: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """The decoder's target for normalised ``points`` (B, L, 2) / ``present`` (B, L): :func:`gaussian_pose_map`.

        ``L`` may exceed K (TSC's Q * K label columns, of which an image fills at
        most K); more than K present points in one image is refused.
        """
        n_present = torch.as_tensor(present).sum(1)
        if len(n_present) and int(n_present.max()) > self.config.k:
            raise ConfigError(
                f"an image has {int(n_present.max())} present landmarks, more than k={self.config.k}",
                where="PoseVAE.target",
                fix="pass one image's K landmarks (TSC fills only its pose cluster's columns)",
            )
        return gaussian_pose_map(points, present, self.config.size, self.config.sigma)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """``H -> (mu, logvar)``: what D-ULD++'s second step trains with Eq. 3."""
        return [*self.encoder.parameters(), *self.to_stats.parameters()]

    def decoder_parameters(self) -> list[nn.Parameter]:
        """``z -> G``: used only by the ELBO of the first step, dropped afterwards."""
        return [*self.from_code.parameters(), *self.decoder.parameters()]

    @torch.no_grad()
    def codes(self, heatmap: torch.Tensor) -> torch.Tensor:
        """Deterministic pose codes (the posterior means) for TSC's stage-1 clustering, (B, latent)."""
        return self.encode(heatmap)[0]
