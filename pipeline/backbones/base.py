"""The backbone contract: a frozen diffusion UNet that returns named feature maps.

Feature keys are ``"{layer}@t{timestep}"``; each value is a float tensor
(B, C, h, w). Images come in as float tensors (B, 3, S, S) in [-1, 1].
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:  # torch is imported on use: FeatureSpec is needed by every CLI command, torch by few
    import torch


def _current_crop_rule() -> int:
    # Not from pipeline.datasets.crop (which re-exports it): that would import the datasets
    # package, pandas included, into every command that only names a store.
    from pipeline.crop_rule import CROP_RULE

    return CROP_RULE


def feature_key(layer: str, timestep: int) -> str:
    return f"{layer}@t{int(timestep)}"


def parse_feature_key(key: str) -> tuple[str, int]:
    layer, t = key.rsplit("@t", 1)
    return layer, int(t)


@dataclass(frozen=True)
class FeatureSpec:
    """Which features to extract, at what input size. Hashes to the store name."""

    image_size: int = 64
    timesteps: tuple[int, ...] = (50, 150)
    layers: tuple[str, ...] = ()  # empty = the backbone's default hyperfeature layers
    crop_margin: float = 0.15
    noise_seed: int = 0
    reduce_channels: int | None = None  # fixed random projection per layer, None = keep all
    # The crop rule the features were computed with (pipeline.datasets.crop.CROP_RULE).
    # In the spec, hence in the store hash: changing how crops are made never reuses old stores.
    crop_rule: int = field(default_factory=lambda: _current_crop_rule())

    def __post_init__(self) -> None:
        current = _current_crop_rule()
        if self.crop_rule != current:
            raise ConfigError(
                f"feature spec asks for crop rule {self.crop_rule}, but this version crops with rule {current}",
                where="FeatureSpec.crop_rule",
                fix="leave crop_rule at its default; features of older crop rules cannot be recomputed (re-run `uld features`)",
            )

    def to_json(self) -> dict:
        return asdict(self)

    def config_hash(self, backbone_identity: dict) -> str:
        payload = json.dumps({"spec": self.to_json(), "backbone": backbone_identity}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


class DiffusionBackbone(abc.ABC):
    """A frozen diffusion model seen as a feature extractor."""

    name: str

    @abc.abstractmethod
    def layer_names(self) -> list[str]:
        """All layers this backbone can return, e.g. ``up0.res1``."""

    @abc.abstractmethod
    def default_layers(self) -> list[str]:
        """The hyperfeature layers used when a spec names none."""

    @abc.abstractmethod
    def identity(self) -> dict:
        """What makes features reproducible: kind, source, a hash of the weights."""

    @abc.abstractmethod
    def feature_shapes(self, image_size: int, layers: list[str]) -> dict[str, tuple[int, int, int]]:
        """(C, h, w) of each layer for square inputs of ``image_size``."""

    @abc.abstractmethod
    def extract(
        self,
        images: torch.Tensor,
        timesteps: list[int],
        layers: list[str],
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Noise ``images`` to each timestep, run the UNet once per timestep,
        and return the requested layers' outputs keyed by :func:`feature_key`."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    def feature_timesteps(self, timesteps: Sequence[int]) -> list[int]:
        """The timesteps of the keys :meth:`extract` returns when asked for ``timesteps``.

        A diffusion backbone returns exactly the ones asked for. A feature
        extractor that does not noise its input (``pixels``) returns one
        placeholder, so its stores hold each layer once, not once per timestep.
        """
        return [int(t) for t in timesteps]

    def canonical_spec(self, spec: FeatureSpec) -> FeatureSpec:
        """``spec`` with the fields this backbone ignores set to one value.

        Feature stores are named after the canonical spec, so specs that give
        the same features share one store (for diffusion backbones: ``spec`` itself).
        """
        ts = tuple(self.feature_timesteps(spec.timesteps))
        return spec if ts == tuple(spec.timesteps) else dataclasses.replace(spec, timesteps=ts)

    def notes(self) -> list[str]:
        """Plain sentences for `uld backbone info` about how this backbone reads a feature spec."""
        return []


def weights_hash(module: torch.nn.Module) -> str:
    """A short, stable hash of all parameter bytes (identity of the weights).

    It names feature stores, so every byte counts: a store is never reused for
    weights that differ anywhere (~0.7 GB/s here: a few seconds for Stable Diffusion 1.5).
    """
    import torch

    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        t = p.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: view the same bits as int16
            t = t.view(torch.int16)
        h.update(t.numpy())  # contiguous: hashed through the buffer, no copy
        h.update(str(tuple(p.shape)).encode())
    return h.hexdigest()[:16]
