"""StableKeypoints (Hedlin et al., seed 002) as an estimator: ``fit`` tokens, ``select`` K, ``predict`` landmarks.

1. ``fit(crops)``: N token embeddings (N, D) -- D the UNet's
   ``cross_attention_dim`` -- are the only trainable tensor; the UNet is frozen.
   Every step: a batch of crops and random small affine warps of them, both
   noised to ``timestep`` and run through the UNet with the tokens as context;
   the cross-attention maps of a random chunk of ``token_chunk`` tokens
   (:mod:`.attention`: up blocks at <= ``max_side`` cells, upsampled to
   ``map_size`` and averaged) get the localisation loss (both images) and the
   equivariance loss (:mod:`.losses`). Step ``s`` draws its batch, warps,
   noise and chunk from ``(seed, s)`` only, so a resumed fit equals an
   uninterrupted one.
2. ``select(crops)``: K of the N tokens (:mod:`.selection`).
3. ``predict(crops, rows) -> LandmarkSet``: per image the maps of the K tokens
   under ``augmentations`` warps (the first is the identity), each warped back
   to the crop frame and averaged; landmark = the argmax cell's centre. The
   noise and the warps of an image are seeded by ``(seed, row)``
   (:func:`augmentation_warps`), so a prediction does not depend on the batch.

Memory is bounded by what the processors keep: head-averaged maps of
``token_chunk`` tokens at <= ``max_side`` cells (the softmax still runs over all
N tokens), batches of ``batch_size`` images, and an early stop of the UNet
after its last read layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.errors import ConfigError
from pipeline.methods.condgen.estimators import as_model_input, step_generator
from pipeline.methods.condgen.geometry import random_affine, to_crop_pixels, warp_images
from pipeline.methods.landmarks import LandmarkSet, points_in_rois, roi_cell_mask
from pipeline.methods.stablekeypoints.attention import aggregate_maps, capture_cross_attention, cross_attention_layers, run_unet
from pipeline.methods.stablekeypoints.losses import argmax_points, equivariance_loss, localisation_loss, peak_normalised, unwarp_maps
from pipeline.methods.stablekeypoints.model import ConditionedUNet
from pipeline.methods.stablekeypoints.selection import most_frequent_tokens, tokens_per_image


@dataclass(frozen=True)
class StableKeypointsConfig:
    """Settings; ``to_json`` is what a run records and a resume must match."""

    k: int = 10
    n_tokens: int = 100  # seed 002's code optimises 500; fewer keep a CPU run short
    steps: int = 300
    batch_size: int = 4
    lr: float = 5e-2  # Adam on the tokens (tokens start ~N(0, 1); 5e-3 barely moved them in short CPU runs)
    timestep: int = 50  # noise level of the UNet input (of the scheduler's 1000)
    map_size: int = 32  # maps are upsampled to / compared at this many cells
    max_side: int = 32  # read up-block cross-attention layers with maps <= this (method brief: <= 32 x 32)
    sigma: float = 2.0  # Gaussian width in map cells (method brief: sigma ~2)
    equivariance_weight: float = 1.0
    token_chunk: int = 50  # tokens whose maps are kept per UNet pass (memory bound)
    top_per_image: int = 0  # best-localised tokens per image before FPS; 0 = 2 K
    select_images: int = 100  # images the selection counts over (method brief: ~100)
    augmentations: int = 4  # warps averaged at prediction (the first is the identity)
    roi: bool = True  # select tokens by their peaks inside the object box, and predict inside it (as ZeroShot / D-ULD keep keypoints in the RoI)
    rotation_deg: float = 15.0
    log_scale: float = 0.1
    translation: float = 0.1
    seed: int = 0
    backbone: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        checks = [
            (self.k >= 1, "k must be >= 1", "-k"),
            (self.n_tokens >= self.k, f"n_tokens ({self.n_tokens}) must be >= k ({self.k})", "--param n_tokens"),
            (self.steps >= 0, "steps must be >= 0", "--steps"),
            (self.batch_size >= 1, "batch size must be >= 1", "--batch-size"),
            (self.token_chunk >= 1, "token_chunk must be >= 1", "--param token_chunk"),
            (self.map_size >= 4, "map_size must be >= 4", "--param map_size"),
            (self.augmentations >= 1, "augmentations must be >= 1", "--param augmentations"),
            (self.select_images >= 1, "select_images must be >= 1", "--param select_images"),
        ]
        for ok, what, where in checks:
            if not ok:
                raise ConfigError(what, where=where, fix="see `uld train --method stablekeypoints --help`")


def _noise_for(seed: int, rows: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """One fixed noise tensor per image row (prediction and selection do not depend on batch mates)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(seed) * 7_919 + int(r) + 1)) for r in rows])


def augmentation_warps(config: StableKeypointsConfig, rows: np.ndarray, augmentation: int) -> torch.Tensor:
    """Prediction augmentation ``augmentation``'s warp of each image row, thetas (len(rows), 2, 3).

    Augmentation 0 is the identity. Every other warp is drawn from a generator of
    ``(seed, augmentation, row)`` alone, like the image's noise (:func:`_noise_for`): an
    image's prediction depends on the image and the seed, not on where it sits in a batch
    nor on the batch size (drawing one batch of warps per augmentation gave the same image
    other warps at another position: 20-28 px apart on the test runs).
    """
    rows = np.asarray(rows)
    if augmentation == 0:
        return torch.eye(2, 3).repeat(len(rows), 1, 1)
    thetas = []
    for r in rows:
        # SeedSequence mixes the three numbers: no two (augmentation, row) pairs share a stream.
        key = np.random.SeedSequence([int(config.seed) % 2**63, int(augmentation), int(r) % 2**63]).generate_state(2, np.uint64)[0]
        gen = torch.Generator().manual_seed(int(key) & 0x7FFF_FFFF_FFFF_FFFF)
        thetas.append(random_affine(1, gen, config.rotation_deg, config.log_scale, config.translation, shear=0.0)[0])
    return torch.stack(thetas) if thetas else torch.zeros(0, 2, 3)


class StableKeypoints:
    """Optimise N tokens against a frozen text-conditioned UNet; K of them are the landmarks.

    Fitted state: ``tokens_`` (N, D) float32, ``optimizer_`` (Adam), ``step_``,
    ``history_`` (one dict of losses per step run by this object),
    ``selected_`` (K,) token ids after :meth:`select`, ``image_size_``.
    """

    method = "stablekeypoints"

    def __init__(self, model: ConditionedUNet, config: StableKeypointsConfig | None = None) -> None:
        self.model = model
        self.config = config or StableKeypointsConfig()
        self.config.validate()
        self.device = model.device
        gen = torch.Generator().manual_seed(int(self.config.seed))
        self.tokens_ = torch.randn(self.config.n_tokens, model.context_dim, generator=gen).to(self.device).requires_grad_(True)
        self.optimizer_ = torch.optim.Adam([self.tokens_], lr=self.config.lr)
        self.step_ = 0
        self.history_: list[dict[str, float]] = []
        self.selected_: np.ndarray | None = None
        self.image_size_: int | None = None

    # ------------------------------------------------------------ maps
    def _layers(self, image_size: int) -> list[str]:
        if image_size % self.model.latent_factor:
            raise ConfigError(f"crop size {image_size} is not divisible by the model's downsampling {self.model.latent_factor}", where="--size")
        return cross_attention_layers(self.model.unet, image_size // self.model.latent_factor, self.config.max_side)

    def _maps(self, store, images: torch.Tensor, noise: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Peak-comparable maps (B, len(keep), R, R) of tokens ``keep`` for images (B, 3, S, S) in [-1, 1]."""
        m = self.model
        with torch.no_grad():
            z0 = m.encode(images.to(self.device)).float()
        t = torch.full((len(images),), int(self.config.timestep), dtype=torch.long, device=self.device)
        zt = m.scheduler.add_noise(z0, noise.to(self.device, z0.dtype), t).to(m.dtype)
        ctx = self.tokens_.to(m.dtype)[None].expand(len(images), -1, -1)
        store.keep = keep
        return aggregate_maps(run_unet(m.unet, store, zt, t, encoder_hidden_states=ctx), self.config.map_size)

    def _latent_shape(self, image_size: int) -> tuple[int, ...]:
        c = int(self.model.unet.config.in_channels)
        s = image_size // self.model.latent_factor
        return (c, s, s)

    # ------------------------------------------------------------ 1. fit
    def step_loss(self, store, images: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one step (seed 002: localisation + equivariance) on ``images`` (B, 3, S, S)."""
        cfg = self.config
        b, s = len(images), images.shape[-1]
        theta = random_affine(b, gen, cfg.rotation_deg, cfg.log_scale, cfg.translation, shear=0.0)
        keep = torch.randperm(cfg.n_tokens, generator=gen)[: min(cfg.token_chunk, cfg.n_tokens)]
        noise = torch.randn((2 * b, *self._latent_shape(s)), generator=gen)
        warped, _ = warp_images(images, theta)
        maps = self._maps(store, torch.cat([images, warped]), noise, keep)
        m_x, m_w = maps[:b], maps[b:]
        loc = localisation_loss(maps, cfg.sigma)
        eq = equivariance_loss(m_x, m_w, theta.to(maps.device))
        loss = loc + cfg.equivariance_weight * eq
        return loss, {"loss": float(loss.detach()), "localisation": float(loc.detach()), "equivariance": float(eq.detach())}

    def fit(self, images: np.ndarray, stop_after: int | None = None, checkpoint_every: int = 0, on_checkpoint=None,
            progress: bool = False) -> "StableKeypoints":
        """Optimise the tokens from ``step_`` to ``config.steps`` on uint8 crops (N, S, S, 3)."""
        x = as_model_input(images)
        self.image_size_ = int(x.shape[-1])
        cfg = self.config
        end = cfg.steps if stop_after is None else min(cfg.steps, int(stop_after))
        bar = tqdm(total=cfg.steps, initial=self.step_, desc="stablekeypoints", unit="step", disable=not progress, mininterval=2.0)
        with capture_cross_attention(self.model.unet, self._layers(self.image_size_)) as store:
            while self.step_ < end:
                gen = step_generator(cfg.seed, self.step_)
                idx = torch.randint(0, len(x), (min(cfg.batch_size, len(x)),), generator=gen)
                loss, record = self.step_loss(store, x[idx], gen)
                self.optimizer_.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer_.step()
                self.step_ += 1
                self.history_.append({"step": self.step_, **record})
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if on_checkpoint is not None and (self.step_ == cfg.steps or (checkpoint_every and self.step_ % checkpoint_every == 0)):
                    on_checkpoint(self)
        bar.close()
        return self

    # ------------------------------------------------------------ 2. select
    @torch.no_grad()
    def token_scores(self, images: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Localisation loss (n, N) and argmax (n, N, 2) of every token on ``images``, tokens in chunks."""
        x = as_model_input(images)
        rows = np.arange(len(x)) if rows is None else np.asarray(rows)
        cfg = self.config
        losses, points = [], []
        with capture_cross_attention(self.model.unet, self._layers(int(x.shape[-1]))) as store:
            for b0 in range(0, len(x), cfg.batch_size):
                xb = x[b0:b0 + cfg.batch_size]
                noise = _noise_for(cfg.seed, rows[b0:b0 + cfg.batch_size], self._latent_shape(int(x.shape[-1])))
                lb, pb = [], []
                for c0 in range(0, cfg.n_tokens, cfg.token_chunk):
                    keep = torch.arange(c0, min(c0 + cfg.token_chunk, cfg.n_tokens))
                    maps = self._maps(store, xb, noise, keep)
                    lb.append(localisation_loss(maps, cfg.sigma, reduce=False).cpu())
                    pb.append(argmax_points(maps).cpu())
                losses.append(torch.cat(lb, dim=1))
                points.append(torch.cat(pb, dim=1))
        return torch.cat(losses).numpy(), torch.cat(points).numpy()

    def select(self, images: np.ndarray, rois: np.ndarray | None = None) -> np.ndarray:
        """K tokens: best-localised per image + FPS, most frequent over ``select_images`` images (seeded sample).

        ``rois`` (n, 4) object boxes in crop pixels (``x0, y0, x1, y1``), used when ``config.roi``:
        per image, tokens peaking inside the box are preferred (:func:`.selection.tokens_per_image`).
        """
        cfg = self.config
        n = len(images)
        rows = np.sort(np.random.default_rng(cfg.seed).permutation(n)[: min(cfg.select_images, n)])
        loss, points = self.token_scores(np.asarray(images)[rows], rows)
        inside = None
        if cfg.roi and rois is not None:
            size = int(as_model_input(np.asarray(images)[:1]).shape[-1])
            inside = points_in_rois(to_crop_pixels(torch.from_numpy(points), size).numpy(), np.asarray(rois)[rows])
        per_image = tokens_per_image(loss, points, cfg.k, cfg.top_per_image or 2 * cfg.k, inside)
        self.selected_ = most_frequent_tokens(per_image, loss, cfg.k)
        return self.selected_

    # ------------------------------------------------------------ 3. predict
    @torch.no_grad()
    def predict_maps(self, images: np.ndarray | torch.Tensor, rows: np.ndarray | None = None,
                     progress: str | None = None) -> torch.Tensor:
        """(n, K, R, R) maps of the selected tokens, averaged over the augmentations in the crop frame.

        ``progress``: a bar with this label over the images (``augmentations`` UNet passes each).
        """
        if self.selected_ is None:
            raise ConfigError("no tokens selected yet", where="StableKeypoints.predict", fix="call select(train_crops) after fit")
        x = as_model_input(images)
        rows = np.arange(len(x)) if rows is None else np.asarray(rows)
        cfg = self.config
        keep = torch.as_tensor(self.selected_, dtype=torch.long)
        out = []
        bar = tqdm(total=len(x), desc=progress or "", unit="img", disable=progress is None, mininterval=2.0)
        with capture_cross_attention(self.model.unet, self._layers(int(x.shape[-1]))) as store:
            for b0 in range(0, len(x), cfg.batch_size):
                xb = x[b0:b0 + cfg.batch_size]
                rb = rows[b0:b0 + cfg.batch_size]
                noise = _noise_for(cfg.seed, rb, self._latent_shape(int(x.shape[-1])))
                acc, weight = 0.0, 0.0
                for a in range(cfg.augmentations):
                    theta = augmentation_warps(cfg, rb, a)
                    maps = peak_normalised(self._maps(store, warp_images(xb, theta)[0], noise, keep))
                    back, valid = unwarp_maps(maps, theta.to(maps.device))
                    acc, weight = acc + back * valid, weight + valid
                out.append((acc / weight.clamp_min(1e-6)).cpu())
                bar.update(len(xb))
        bar.close()
        return torch.cat(out)

    def predict(self, images: np.ndarray | torch.Tensor, rows: np.ndarray | None = None,
                progress: str | None = None, rois: np.ndarray | None = None) -> LandmarkSet:
        """K landmarks per crop in crop pixels: the argmax of each selected token's averaged map.

        With ``config.roi`` and ``rois`` (n, 4 crop pixels) the argmax is taken over the map
        cells whose centres lie in the object box (the whole map where none does).
        """
        maps = self.predict_maps(images, rows, progress)
        size = int(as_model_input(images[:1]).shape[-1])
        if self.config.roi and rois is not None:
            maps = maps * roi_cell_mask(rois, len(maps), maps.shape[-1], size)[:, None].to(maps.dtype)
        pts = to_crop_pixels(argmax_points(maps), size).numpy()
        scores = maps.flatten(2).amax(dim=-1).numpy()
        return LandmarkSet(pts, np.ones(pts.shape[:2], bool), scores)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens_.detach().cpu().clone(), "optimizer": self.optimizer_.state_dict(), "step": int(self.step_)}

    def load_state_dict(self, state: dict[str, Any]) -> "StableKeypoints":
        tokens = torch.as_tensor(state["tokens"]).float()
        if tuple(tokens.shape) != tuple(self.tokens_.shape):
            raise ConfigError(f"checkpoint tokens are {tuple(tokens.shape)}, this model needs {tuple(self.tokens_.shape)}",
                              where="checkpoint", fix="resume with the run's original backbone and n_tokens")
        with torch.no_grad():
            self.tokens_.copy_(tokens.to(self.device))
        self.optimizer_.load_state_dict(state["optimizer"])
        self.step_ = int(state["step"])
        return self
