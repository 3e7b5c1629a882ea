"""Options shared by the commands that read or write a feature store.

`uld features` builds a :class:`FeatureSpec` from these options, and every
later stage (zeroshot, duld, evaluate-baseline) must build the *same* spec to
find that store. Declaring the options and the builder once keeps them in step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.backbones.base import FeatureSpec
from pipeline.errors import ConfigError

_SAME = "(use the same value in `uld features` and in every stage that reads its store)"

Timesteps = Annotated[Optional[str], typer.Option("--timesteps", help=f"Comma-separated diffusion timesteps, one UNet pass each; default: the backbone's default_timesteps (uld_backbone.json, written by `uld backbone probe --write-default`), else 50,150 {_SAME}.")]
Layers = Annotated[Optional[str], typer.Option("--layers", help=f"Comma-separated up-block layers, e.g. up1.res1,up2.res1; default: the backbone's hyperfeature layers {_SAME}.")]
Size = Annotated[int, typer.Option("--size", help=f"Crop size in pixels fed to the UNet {_SAME}.")]
CropMargin = Annotated[float, typer.Option("--crop-margin", help=f"Margin around the object box, as a fraction of its size {_SAME}.")]
ReduceChannels = Annotated[Optional[int], typer.Option("--reduce-channels", help=f"Project each layer to this many channels (fixed seeded random projection) {_SAME}.")]

# torch CPU threads for DDPM training (`uld backbone train --threads`, `uld discover --train-backbone`):
# 1 is fastest on a shared 2-core machine (more threads oversubscribe: 0.3-1 steps/s instead of 2.9 measured).
TRAIN_THREADS = 1

# Dask fan-out (`uld features` shards, `uld train` rounds' keypoint extraction; the [dask] extra).
DaskAddress = Annotated[Optional[str], typer.Option("--dask-address", help="Run the fanned-out tasks on this Dask scheduler (tcp://HOST:8786; workers must see the workspace, images and feature store). Needs the [dask] extra.")]
DaskWorkers = Annotated[Optional[int], typer.Option("--dask-workers", help="Run the fanned-out tasks on a local Dask cluster of N single-threaded worker processes (0: one per GPU, else one per core). Needs the [dask] extra.")]

# Evaluation options shared by `uld evaluate` and every method command that evaluates
# (zeroshot, duld, evaluate-baseline): pipeline.evaluation.protocols defines the values.
Protocol = Annotated[str, typer.Option("--protocol", help="Regressor protocol: paper (ridge, lambda 0.001/0.1 x max(XtX) fwd/bwd, 300 images, 5 repeats; 001 Table 1) | mallis (ridge, lambda 0.1 both, 10 repeats, all images forward on 5-point sets) | lstsq (least squares without intercept, all images). Recorded in every metrics row.")]
Box = Annotated[str, typer.Option("--box", help="Normalising box of box-normalised datasets (synthetic, LS3D): landmarks (the dataset's box rule) | image (the whole image, as StableKeypoints / Jakab / AutoLink). Recorded in every metrics row.")]
NRegressorImages = Annotated[Optional[int], typer.Option("--n-regressor-images", help="Training images per regressor fit, drawn at random (0 = all); default: the protocol's.")]
Repeats = Annotated[Optional[int], typer.Option("--repeats", help="Regressor fits on different random subsets, averaged; default: the protocol's.")]


def eval_options(protocol: str, box: str, n_regressor_images: Optional[int] = None, repeats: Optional[int] = None) -> dict:
    """The evaluation settings the options describe, validated (unknown names are a ConfigError now,
    not after the method has run); None values are left out so the protocol's own apply."""
    from pipeline.evaluation.protocols import check_box, get_protocol

    get_protocol(protocol).with_overrides(n_regressor_images, repeats)
    cfg = {"protocol": protocol, "box": check_box(box), "n_regressor_images": n_regressor_images, "repeats": repeats}
    return {k: v for k, v in cfg.items() if v is not None}


def int_list(text: str, option: str) -> tuple[int, ...]:
    """Parse "50,150" into (50, 150); a clear error naming the option otherwise."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated integers, got {text!r}", where=option, fix="e.g. 50,150") from None
    if not values:
        raise ConfigError(f"{option} is empty", where=option, fix="e.g. 50,150")
    return values


def str_list(text: Optional[str]) -> tuple[str, ...]:
    return tuple(v.strip() for v in (text or "").split(",") if v.strip())


def feature_spec(
    size: int,
    timesteps: Optional[str],
    layers: Optional[str],
    crop_margin: float,
    reduce_channels: Optional[int],
    seed: int,
    backbone: Optional[str] = None,
    home: Optional[Path] = None,
) -> FeatureSpec:
    """The FeatureSpec the feature options describe (the noise seed is the global --seed).

    ``timesteps=None`` (option not given) means the backbone's recorded
    ``default_timesteps`` when its folder has them, else FeatureSpec's 50,150 --
    resolved here, so the spec (and the store hash) always names explicit
    timesteps and stores made before defaults existed are still found.
    """
    from pipeline.backbones.defaults import default_timesteps

    ts = default_timesteps(backbone, home) if timesteps is None else int_list(timesteps, "--timesteps")
    return FeatureSpec(
        image_size=size,
        timesteps=ts,
        layers=str_list(layers),
        crop_margin=crop_margin,
        noise_seed=seed,
        reduce_channels=reduce_channels,
    )
