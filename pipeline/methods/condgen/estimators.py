"""Landmarks through conditional image generation: one model, two trainers.

* :class:`JakabLandmarks` (Jakab et al. 2018, seed 003): pairs are an image and
  a random warp of it (affine, or a thin-plate spline then affine with
  ``warp="tps"`` as in the paper); the generator reconstructs the warped target from
  the *source's* appearance ``Psi(x)`` and the *target's* geometry bottleneck
  ``g(Phi(x'))``; the loss compares the perceptual features ``Gamma`` of ``x'`` and
  of ``G(Psi(x), g(Phi(x')))`` (seed 003, Sec. III-C "Loss Function").
* :class:`C3Landmarks` (Xu et al. 2020, "C3", seed 004): unpaired images A, B.
  First swap: ``I_AB = G(Psi(A), g(Phi(B)))`` (A's appearance, B's pose) and
  ``I_BA = G(Psi(B), g(Phi(A)))``; second swap:
  ``A^ = G(Psi(I_AB), g(Phi(I_BA)))``, ``B^ = G(Psi(I_BA), g(Phi(I_AB)))``;
  the cross-image cycle loss asks ``A^ = A`` and ``B^ = B``. Plus the
  cross-image flow term (:func:`~pipeline.methods.condgen.losses.cross_image_flow_loss`)
  and, weighted by ``paired_weight``, Jakab's paired term on A: the cycle alone
  is met by an appearance path that copies its input image and ignores the
  pose (then ``I_AB = A`` and ``A^ = A`` trivially); the paired term makes the
  pose bottleneck necessary.

Both trainers share :class:`CondGenNet` and every loss. Landmarks are the
bottleneck's K expected coordinates of ``Phi(x)``, in crop pixels.

Reconstruction loss (both trainers): perceptual loss through the frozen
diffusion UNet of ``config.backbone`` at ``t = 0``
(:class:`~pipeline.methods.condgen.perceptual.DiffusionPerceptualLoss`; there is
no VGG here) plus a pixel L1 loss, over valid target pixels.

Determinism: weights are initialised from ``seed``; step ``s`` draws its batch
and warps from a generator seeded with ``(seed, s)`` alone, so a run resumed
from a checkpoint after step ``s`` (weights + Adam state + step) computes the
same numbers as an uninterrupted run (on CPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pipeline.errors import ConfigError
from pipeline.methods.condgen.geometry import (
    expected_coordinates,
    gaussian_maps,
    random_affine,
    random_tps,
    sample_grid,
    spatial_softmax,
    to_crop_pixels,
    tps_grid,
    warp_images,
)
from pipeline.methods.condgen.losses import cross_image_flow_loss, reconstruction_loss
from pipeline.methods.condgen.networks import AppearanceEncoder, Generator, KeypointEncoder
from pipeline.methods.landmarks import LandmarkSet


WARPS = ("affine", "tps")


@dataclass(frozen=True)
class CondGenConfig:
    """Settings of both trainers. Defaults are CPU-sized for 64 px crops; paper values in comments."""

    k: int = 10  # landmarks (Jakab et al.: 10 on MAFL for the comparison table; also 30)
    width: int = 16  # encoder / generator base width (the paper's networks are much wider, at 128 px)
    appearance_channels: int = 32  # Psi's output channels
    sigma: float = 0.1  # Gaussian bottleneck std in [-1, 1] units (the usual choice for this bottleneck)
    steps: int = 300  # optimisation steps (a CPU budget; the papers train for many epochs of CelebA on GPUs)
    batch_size: int = 16  # images (pairs) per step
    lr: float = 1e-3  # Adam
    perceptual_weight: float = 1.0
    pixel_weight: float = 1.0
    # Jakab's warps: "affine" (random affine only) or "tps" (a random thin-plate-spline deformation
    # of a tps_points x tps_points control grid, offsets uniform in +-tps_scale, then the random
    # affine; the paper's pairs on CelebA). Affine stays the default so earlier runs keep their meaning.
    warp: str = "affine"
    rotation_deg: float = 15.0
    log_scale: float = 0.1
    translation: float = 0.1
    shear: float = 0.05
    tps_points: int = 5
    # 0.1 on a 5 x 5 grid: pixels move 1.9 px on average, at most 5 px of a 64 px crop, and no
    # fold (smallest local area ratio 0.33 over 500 draws); 0.15 comes close to folding (0.02).
    tps_scale: float = 0.1
    # C3 only.
    cycle_weight: float = 1.0
    flow_weight: float = 1.0
    paired_weight: float = 1.0
    flow_temperature: float = 0.1
    # Width (normalised units) of the flow term's K-way matching kernel: carried landmarks must be
    # nearer their own counterpart than the others by a few of these (losses.landmark_matching_loss).
    flow_scale: float = 0.1
    # Steps before the flow term is switched on (0 = on from the start). Introduced when the flow
    # term was a squared error, whose minimum held flat maps (bench/results/condgen.md); the
    # K-way matching form has no such minimum, the warm-up remains as an option.
    flow_warmup: int = 0
    # The perceptual network: a pixel-space DDPM (backbone spec) and its up-block layers (() = its defaults).
    backbone: str = "shipped"
    perceptual_layers: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.k >= 1, "k", "K must be at least 1"),
            (self.width >= 1 and self.appearance_channels >= 1, "width", "widths must be positive"),
            (self.sigma > 0, "sigma", "the Gaussian width must be positive"),
            (self.steps >= 0, "steps", "steps must be >= 0"),
            (self.batch_size >= 2, "batch_size", "a batch needs at least 2 images (C3 pairs different images)"),
            (self.lr > 0, "lr", "the learning rate must be positive"),
            (self.flow_temperature > 0, "flow_temperature", "the flow temperature must be positive"),
            (self.flow_warmup >= 0, "flow_warmup", "the flow warm-up must be >= 0 steps"),
            (self.flow_scale > 0, "flow_scale", "the flow matching width must be positive"),
            (self.warp in WARPS, "warp", f"the warp must be one of {', '.join(WARPS)}"),
            (self.tps_points >= 2, "tps_points", "a TPS control grid needs at least 2 points a side"),
            (self.tps_scale >= 0, "tps_scale", "the TPS offsets must be >= 0"),
        ]
        for ok, where, what in checks:
            if not ok:
                raise ConfigError(f"{what}, got {getattr(self, where)!r}", where=f"CondGenConfig.{where} (--{where.replace('_', '-')})")

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["perceptual_layers"] = list(self.perceptual_layers)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CondGenConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        kw["perceptual_layers"] = tuple(kw.get("perceptual_layers", ()))
        return cls(**kw)


class CondGenNet(nn.Module):
    """``Phi`` (keypoints), ``Psi`` (appearance) and the generator, with the bottleneck between them."""

    def __init__(self, config: CondGenConfig) -> None:
        super().__init__()
        self.k, self.sigma = config.k, config.sigma
        self.keypoints = KeypointEncoder(config.k, config.width)
        self.appearance = AppearanceEncoder(config.width, config.appearance_channels)
        self.generator = Generator(config.k, config.appearance_channels, config.width)

    def pose(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Phi(x)``: probability maps ``prob`` (B,K,h,w), normalised points ``pts`` (B,K,2),
        the Gaussian bottleneck ``maps`` (B,K,h,w) and the encoder ``feats``."""
        heat, feats = self.keypoints(x)
        prob = spatial_softmax(heat)
        pts = expected_coordinates(prob)
        h, w = heat.shape[-2:]
        return {"prob": prob, "pts": pts, "maps": gaussian_maps(pts, h, w, self.sigma), "feats": feats}

    def render(self, appearance_of: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """``G(Psi(appearance_of), maps)``."""
        return self.generator(self.appearance(appearance_of), maps)


def as_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 crops (N, S, S, 3) -> float (N, 3, S, S) in [-1, 1]; a float tensor (N, 3, S, S) passes unchanged."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"image tensors must be (N, 3, S, S), got {tuple(images.shape)}", where="fit/predict(images)")
        return images.float()
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[1] != arr.shape[2]:
        raise ConfigError(f"images must be square crops (N, S, S, 3), got {arr.shape}", where="fit/predict(images)")
    x = arr.astype(np.float32) / 127.5 - 1.0 if arr.dtype == np.uint8 else arr.astype(np.float32) * 2.0 - 1.0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of training step ``step``: a function of (seed, step) only (resumable)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step) * 7_919 + 17)


class CondGenLandmarks:
    """Shared estimator: ``fit(images) -> self``, ``predict(images) -> LandmarkSet``.

    ``perceptual``: the perceptual network (a
    :class:`~pipeline.methods.condgen.perceptual.DiffusionPerceptualLoss`); None
    builds it from ``config.backbone`` on the first ``fit``. Fitted state:
    ``net_``, ``optimizer_``, ``step_`` (steps done), ``image_size_``, ``history_``
    (one dict of losses per step run by this object). ``fit`` continues from
    ``step_`` up to ``config.steps``, so after :meth:`load_state_dict` of a
    checkpoint it resumes.
    """

    method: ClassVar[str] = ""

    def __init__(self, config: CondGenConfig | None = None, perceptual: nn.Module | None = None, device: str = "cpu") -> None:
        self.config = config or CondGenConfig()
        self.perceptual = perceptual
        self.device = torch.device(device)
        self.net_: CondGenNet | None = None
        self.optimizer_: torch.optim.Optimizer | None = None
        self.step_ = 0
        self.image_size_: int | None = None
        self.history_: list[dict[str, float]] = []

    # ------------------------------------------------------------ set-up
    def _init(self, image_size: int) -> None:
        if image_size % 4:
            raise ConfigError(f"crop size {image_size} is not divisible by 4", where="images", fix="use crops of e.g. 32, 64 or 128 px")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.config.seed))
            self.net_ = CondGenNet(self.config).to(self.device)
        self.optimizer_ = torch.optim.Adam(self.net_.parameters(), lr=self.config.lr)
        self.image_size_ = int(image_size)
        self.step_ = 0

    def _perceptual(self) -> nn.Module | None:
        if self.perceptual is None and self.config.perceptual_weight > 0:
            from pipeline.backbones.loading import load_backbone
            from pipeline.methods.condgen.perceptual import DiffusionPerceptualLoss

            self.perceptual = DiffusionPerceptualLoss.from_backbone(
                load_backbone(self.config.backbone, device=str(self.device)), self.config.perceptual_layers or None
            )
        return self.perceptual

    # ------------------------------------------------------------ training
    def _recon(self, x_hat: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        return reconstruction_loss(x_hat, x, mask, self.perceptual, c.perceptual_weight, c.pixel_weight)

    def _paired_term(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Jakab et al.'s term: reconstruct a random warp ``x'`` of ``x`` from ``Psi(x)`` and ``g(Phi(x'))``."""
        target, valid = self._warp(x, gen)
        x_hat = self.net_.render(x, self.net_.pose(target)["maps"])
        return self._recon(x_hat, target, valid)

    def _warp(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A random warp of each image of ``x`` (``config.warp``) -> ``(target, valid)``.

        The affine draw comes first and the TPS offsets after it, so with
        ``warp="affine"`` the generator's stream (and every earlier run) is unchanged.
        """
        c = self.config
        theta = random_affine(x.shape[0], gen, c.rotation_deg, c.log_scale, c.translation, c.shear).to(x.device)
        if c.warp == "affine":
            return warp_images(x, theta)
        displaced = random_tps(x.shape[0], gen, c.tps_points, c.tps_scale).to(x.device)
        return sample_grid(x, tps_grid(displaced, int(x.shape[-1]), theta))

    def _losses(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def fit(
        self,
        images: np.ndarray | torch.Tensor,
        *,
        stop_after: int | None = None,
        checkpoint_every: int = 0,
        on_checkpoint: Callable[["CondGenLandmarks"], None] | None = None,
        progress: bool = False,
    ) -> "CondGenLandmarks":
        """Train on ``images`` (crops, uint8 (N, S, S, 3)) from step ``step_`` to ``config.steps``.

        ``stop_after``: stop once ``step_`` reaches it, as if killed there (an
        interrupted run, for tests: no checkpoint at that step).
        ``on_checkpoint(self)`` is called every ``checkpoint_every`` steps and
        after step ``config.steps``.
        """
        x_all = as_model_input(images)
        if len(x_all) < 2:
            raise ConfigError(f"training needs at least 2 images, got {len(x_all)}", where="fit(images)")
        size = int(x_all.shape[-1])
        if self.net_ is None:
            self._init(size)
        elif size != self.image_size_:
            raise ConfigError(f"crops are {size} px but the model was trained on {self.image_size_} px", where="fit(images)")
        self._perceptual()
        c = self.config
        end = c.steps if stop_after is None else min(c.steps, int(stop_after))
        bs = min(c.batch_size, len(x_all))
        self.net_.train()
        bar = tqdm(total=max(end - self.step_, 0), desc=f"{self.method} training", unit="step", disable=not progress)
        while self.step_ < end:
            gen = step_generator(c.seed, self.step_)
            idx = torch.randperm(len(x_all), generator=gen)[:bs]
            x = x_all[idx].to(self.device)
            loss, parts = self._losses(x, gen)
            self.optimizer_.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer_.step()
            self.step_ += 1
            record = {"step": self.step_, "loss": float(loss.detach()), **parts}
            self.history_.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if on_checkpoint is not None and (self.step_ == c.steps or (checkpoint_every and self.step_ % checkpoint_every == 0)):
                on_checkpoint(self)
        bar.close()
        return self

    # ------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> LandmarkSet:
        """K landmarks per crop: the expected coordinates of ``Phi``'s maps, in crop pixels.

        ``scores`` = the probability mass of the map's most likely cell (how
        peaked the landmark is). Every landmark is present and none is a fallback.
        """
        if self.net_ is None:
            raise ConfigError("the model is not trained", where=f"{type(self).__name__}.predict", fix="call fit() or load a checkpoint first")
        x_all = as_model_input(images)
        if len(x_all) and int(x_all.shape[-1]) != self.image_size_:
            raise ConfigError(f"crops are {x_all.shape[-1]} px but the model was trained on {self.image_size_} px", where="predict(images)")
        self.net_.eval()
        coords, scores = [], []
        for b0 in range(0, len(x_all), batch_size):
            out = self.net_.pose(x_all[b0:b0 + batch_size].to(self.device))
            coords.append(to_crop_pixels(out["pts"], self.image_size_).cpu().numpy())
            scores.append(out["prob"].flatten(2).amax(-1).cpu().numpy())
        self.net_.train()
        k = self.config.k
        c = np.concatenate(coords) if coords else np.zeros((0, k, 2), np.float32)
        s = np.concatenate(scores) if scores else np.zeros((0, k), np.float32)
        return LandmarkSet(c, np.ones(s.shape, bool), s)

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``{"net": ..., "optimizer": ..., "step": int, "image_size": int}`` (for checkpoints)."""
        if self.net_ is None:
            raise ConfigError("nothing to save: the model is not trained", where=f"{type(self).__name__}.state_dict")
        return {"net": self.net_.state_dict(), "optimizer": self.optimizer_.state_dict(), "step": self.step_, "image_size": self.image_size_}

    def load_state_dict(self, state: dict[str, Any]) -> "CondGenLandmarks":
        self._init(int(state["image_size"]))
        self.net_.load_state_dict(state["net"])
        if state.get("optimizer") is not None:
            self.optimizer_.load_state_dict(state["optimizer"])
        self.step_ = int(state["step"])
        return self


class JakabLandmarks(CondGenLandmarks):
    """Jakab et al. 2018 (seed 003): reconstruct a warped copy from the source's appearance and the target's geometry."""

    method = "jakab"

    def _losses(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return self._paired_term(x, gen)


class C3Landmarks(CondGenLandmarks):
    """C3 (Xu et al. 2020, seed 004): cross-image cycle consistency + cross-image flow (+ Jakab's paired term)."""

    method = "c3"

    def __init__(self, config: CondGenConfig | None = None, perceptual: nn.Module | None = None, device: str = "cpu") -> None:
        super().__init__(config, perceptual, device)
        if self.config.k < 2 and self.config.flow_weight > 0:
            # The flow term matches each carried landmark against the image's other landmarks; with one there is none.
            raise ConfigError("C3's flow term needs at least 2 landmarks", where="CondGenConfig.k (-k)", fix="use -k 2 or more, or --param flow_weight=0")

    def _losses(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        c, net = self.config, self.net_
        # B = A shifted by one inside the batch: every pair holds two different images
        # (the batch indices are distinct), and each image is encoded once.
        a, b = x, x.roll(1, dims=0)
        pose_a = net.pose(a)
        pose_b = {k: v.roll(1, dims=0) for k, v in pose_a.items()}
        app_a = net.appearance(a)
        app_b = app_a.roll(1, dims=0)
        i_ab = net.generator(app_a, pose_b["maps"])  # A's appearance, B's pose
        i_ba = net.generator(app_b, pose_a["maps"])  # B's appearance, A's pose
        a_hat = net.render(i_ab, net.pose(i_ba)["maps"])
        b_hat = net.render(i_ba, net.pose(i_ab)["maps"])
        la, pa = self._recon(a_hat, a, None)
        lb, _ = self._recon(b_hat, b, None)
        cycle = 0.5 * (la + lb)
        flow = cross_image_flow_loss(pose_a["prob"], pose_a["pts"], pose_a["feats"], pose_b["prob"], pose_b["pts"], pose_b["feats"],
                                     c.flow_temperature, c.flow_scale)
        flow_weight = c.flow_weight if self.step_ >= c.flow_warmup else 0.0  # step_ = steps done before this one
        total = c.cycle_weight * cycle + flow_weight * flow
        parts = {"cycle": float(cycle.detach()), "flow": float(flow.detach()), "flow_weight": float(flow_weight),
                 **{f"cycle_{k}": v for k, v in pa.items()}}
        if c.paired_weight > 0:
            paired, pp = self._paired_term(a, gen)
            total = total + c.paired_weight * paired
            parts.update({"paired": float(paired.detach()), **{f"paired_{k}": v for k, v in pp.items()}})
        return total, parts


METHODS: dict[str, type[CondGenLandmarks]] = {"jakab": JakabLandmarks, "c3": C3Landmarks}


def make_estimator(method: str, config: CondGenConfig, perceptual: nn.Module | None = None, device: str = "cpu") -> CondGenLandmarks:
    """The estimator class of ``method`` (``jakab`` | ``c3``)."""
    if method not in METHODS:
        raise ConfigError(f"unknown conditional-generation method {method!r}", where="--method", fix=f"one of: {', '.join(METHODS)}")
    return METHODS[method](config, perceptual=perceptual, device=device)
