"""``pixels``: fixed image descriptors behind the backbone contract (no diffusion model).

The image-only reference for every method: the same crops, store, sampling,
k-means and exemplar assignment as with a diffusion backbone, on features a
few convolutions compute from the crop's pixels. Whatever a method does better
with a diffusion backbone than with ``pixels`` is what the diffusion features
add. Deterministic, no weights, no noise; image by image (batch-independent).

Layers (all of them are the default; ZeroShot weighs layers equally):

- ``rgb`` (13 ch, S/2): CIE Lab colour after Gaussian blurs of sigma 1, 2, 4
  and 8 px. Lab rather than RGB or normalised rgb because k-means measures
  Euclidean distance and Lab distances approximate perceived colour
  differences; it also keeps lightness apart from chroma (normalised rgb drops
  lightness, and eyes, brows and mouths differ from skin mostly in lightness).
  The blurs add the colour of the surroundings at growing scales.
- ``grad`` (73 ch, S/4): a dense HOG-like descriptor. Gradients of the
  lightness (blurred, sigma 1 px), magnitude-weighted histograms of 8 signed
  orientations (signed: dark-to-light and light-to-dark differ, an eye is
  darker than the skin around it) averaged over 4x4 px cells, square-rooted,
  and the 3x3 neighbouring cells stacked (12x12 px of layout per descriptor).
  The square root makes ZeroShot's per-layer L2 normalisation the Hellinger
  (RootSIFT) comparison of histograms.
- ``patch2`` / ``patch4`` (76 ch, S/2 and S/4): raw RGB patches, 5x5
  neighbourhoods of the crop average-pooled by 2 and by 4 (10x10 and 20x20 px
  of the crop), stacked as channels.

Every layer ends with one constant channel. ZeroShot L2-normalises each
layer's vector per pixel, which alone would keep only its direction: a dark
grey and a black pixel, or a flat and a low-contrast patch, would look the
same. The constant (a homogeneous coordinate) makes the normalised vectors
differ with the magnitude as well: for differences small against the
constant, cosine distance is Euclidean distance; large ones saturate. For
``grad`` it is also the epsilon of HOG's block normalisation, so flat, noisy
areas do not get amplified into strong histograms.

Timesteps mean nothing here: every requested timestep gives the one
placeholder ``t0`` (keys ``rgb@t0``, ...), and :meth:`canonical_spec` drops
the timesteps and noise seed from the store's name (``uld backbone info
pixels`` says so).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.backbones.base import DiffusionBackbone, FeatureSpec, feature_key
from pipeline.backbones.common import check_images, check_layers
from pipeline.errors import ConfigError

NAME = "pixels"
#: Bump when any definition below changes: it is in identity(), hence in store names.
VERSION = 1
PLACEHOLDER_T = 0

LAYERS: tuple[str, ...] = ("rgb", "grad", "patch2", "patch4")
RGB_SIGMAS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
GRAD_SIGMA = 1.0
GRAD_BINS = 8
GRAD_CELL = 4  # px; also the stride of the grad map (S/4)
GRAD_NEIGHBOURS = 3  # 3x3 cells stacked
PATCH = 5  # 5x5 neighbourhoods
# Constant channels. Colour and patch layers are scaled to the RMS of their
# channels (vector / sqrt(C)), whose typical spread on faces is ~0.2-0.5 in
# these units; 0.5 puts the homogeneous coordinate at that scale. The grad
# constant is about the root of a 3x3 block's summed histograms in a flat area
# with sensor noise (mean |grad L| ~ 0.005 per px, L in [0, 1]): below that the
# descriptor tends to the constant instead of to a noise histogram.
RGB_CONST = 0.5
PATCH_CONST = 0.5
GRAD_CONST = 0.2

_RESOLUTION = {"rgb": 2, "grad": 4, "patch2": 2, "patch4": 4}  # map stride in crop px


# ------------------------------------------------------------ image operations
def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> CIE Lab (D65): L in [0, 100], a, b roughly [-100, 100]."""
    c = rgb.clamp(0.0, 1.0)
    lin = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = torch.tensor(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
        dtype=rgb.dtype, device=rgb.device,
    )
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("oc,bchw->bohw", m, lin) / white[None, :, None, None]
    d = 6.0 / 29.0
    f = torch.where(xyz > d**3, xyz.clamp_min(1e-12) ** (1.0 / 3.0), xyz / (3 * d * d) + 4.0 / 29.0)
    L = 116.0 * f[:, 1] - 16.0
    a = 500.0 * (f[:, 0] - f[:, 1])
    b = 200.0 * (f[:, 1] - f[:, 2])
    return torch.stack([L, a, b], 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (radius 3 sigma), replicate padding, channel by channel."""
    r = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def neighbourhood(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C * size**2, h, w): each position's size x size neighbourhood as channels."""
    r = size // 2
    b, c, h, w = x.shape
    cols = F.unfold(F.pad(x, (r, r, r, r), mode="replicate"), kernel_size=size)
    return cols.view(b, c * size * size, h, w)


def with_constant(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.cat([x, torch.full_like(x[:, :1], value)], 1)


def rgb_features(lab: torch.Tensor) -> torch.Tensor:
    scaled = torch.stack([(lab[:, 0] - 50.0) / 50.0, lab[:, 1] / 50.0, lab[:, 2] / 50.0], 1)
    # Blurred on the 2x-pooled map (sigma in its pixels = half the crop's): a quarter of the cost.
    pooled = F.avg_pool2d(scaled, 2)
    blurs = torch.cat([gaussian_blur(pooled, s / 2.0) for s in RGB_SIGMAS], 1)
    return with_constant(blurs / math.sqrt(blurs.shape[1]), RGB_CONST)


def grad_features(lab: torch.Tensor) -> torch.Tensor:
    L = gaussian_blur(lab[:, :1] / 100.0, GRAD_SIGMA)
    p = F.pad(L, (1, 1, 1, 1), mode="replicate")
    gx = (p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2]) / 2.0
    gy = (p[:, :, 2:, 1:-1] - p[:, :, :-2, 1:-1]) / 2.0
    mag = torch.sqrt(gx * gx + gy * gy)
    # Soft binning: each gradient splits its magnitude between the two nearest bin centres.
    pos = (torch.atan2(gy, gx) % (2 * math.pi)) / (2 * math.pi) * GRAD_BINS
    lo = torch.floor(pos)
    frac = pos - lo
    bins = torch.arange(GRAD_BINS, device=lab.device, dtype=lab.dtype)[None, :, None, None]
    lo_i, hi_i = lo % GRAD_BINS, (lo + 1) % GRAD_BINS
    hist = mag * ((bins == lo_i) * (1.0 - frac) + (bins == hi_i) * frac)
    cells = torch.sqrt(F.avg_pool2d(hist, GRAD_CELL).clamp_min(0.0))
    return with_constant(neighbourhood(cells, GRAD_NEIGHBOURS), GRAD_CONST)


def patch_features(rgb: torch.Tensor, factor: int) -> torch.Tensor:
    patches = neighbourhood(F.avg_pool2d(rgb, factor), PATCH)
    return with_constant(patches / math.sqrt(patches.shape[1]), PATCH_CONST)


# ------------------------------------------------------------ the backbone
class PixelFeatures(DiffusionBackbone):
    """Fixed pixel descriptors (see the module doc) seen as a backbone."""

    kind = "pixels"

    def __init__(self, device: str | torch.device = "cpu", name: str = NAME) -> None:
        self.name = name
        self._device = torch.device(device)

    def to(self, device: str | torch.device) -> "PixelFeatures":
        self._device = torch.device(device)
        return self

    @property
    def device(self) -> torch.device:
        return self._device

    def layer_names(self) -> list[str]:
        return list(LAYERS)

    def default_layers(self) -> list[str]:
        return list(LAYERS)

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "version": VERSION,
            "rgb": {"space": "CIE Lab D65", "sigmas": list(RGB_SIGMAS), "const": RGB_CONST},
            "grad": {"sigma": GRAD_SIGMA, "bins": GRAD_BINS, "signed": True, "cell": GRAD_CELL,
                     "neighbours": GRAD_NEIGHBOURS, "sqrt": True, "const": GRAD_CONST},
            "patch": {"size": PATCH, "space": "RGB [-1, 1]", "const": PATCH_CONST},
        }

    def feature_timesteps(self, timesteps: Sequence[int]) -> list[int]:
        return [PLACEHOLDER_T]

    def canonical_spec(self, spec: FeatureSpec) -> FeatureSpec:
        # No noise either: the seed does not change the features, so it must not change the store.
        return dataclasses.replace(spec, timesteps=(PLACEHOLDER_T,), noise_seed=0)

    def notes(self) -> list[str]:
        return [
            "timestep-free: features are computed from the crop's pixels, with no noise and no model;",
            f"every requested timestep gives the placeholder t{PLACEHOLDER_T} (keys 'rgb@t{PLACEHOLDER_T}', ...),",
            "so --timesteps and --seed do not change the features or the store.",
        ]

    def feature_shapes(self, image_size: int, layers: list[str]) -> dict[str, tuple[int, int, int]]:
        layers = check_layers(list(layers) or self.default_layers(), self.layer_names(), self.name)
        if image_size < 8 or image_size % 4:
            raise ConfigError(
                f"image size {image_size} does not suit the pixels backbone (maps at 1/2 and 1/4 of it)",
                where="FeatureSpec.image_size / --size",
                fix="use a multiple of 4 of at least 8, e.g. 64",
            )
        channels = {
            "rgb": 3 * len(RGB_SIGMAS) + 1,
            "grad": GRAD_BINS * GRAD_NEIGHBOURS**2 + 1,
            "patch2": 3 * PATCH * PATCH + 1,
            "patch4": 3 * PATCH * PATCH + 1,
        }
        return {n: (channels[n], image_size // _RESOLUTION[n], image_size // _RESOLUTION[n]) for n in layers}

    def extract(
        self,
        images: torch.Tensor,
        timesteps: list[int],
        layers: list[str],
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The requested layers of ``images`` (B, 3, S, S) in [-1, 1], keyed ``"{layer}@t0"``.

        ``timesteps`` and ``generator`` are accepted for the contract and
        ignored (see the module doc). Output: float32 on the backbone's device.
        """
        check_images(images, 3, "PixelFeatures.extract(images)")
        layers = check_layers(list(layers) or self.default_layers(), self.layer_names(), self.name)
        self.feature_shapes(int(images.shape[-1]), layers)  # size check with a clear error
        x = images.to(self.device, torch.float32)
        out: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            lab = srgb_to_lab((x + 1.0) / 2.0) if {"rgb", "grad"} & set(layers) else None
            for name in layers:
                if name == "rgb":
                    f = rgb_features(lab)
                elif name == "grad":
                    f = grad_features(lab)
                else:
                    f = patch_features(x, _RESOLUTION[name])
                out[feature_key(name, PLACEHOLDER_T)] = f.contiguous()
        return out
