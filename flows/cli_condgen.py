"""``uld train --method jakab|c3``: landmarks through conditional image generation (seeds 003, 004).

Both read crops straight from the manifests (no feature store) and use
``--backbone`` (a pixel-space DDPM, default ``shipped``) as the frozen
perceptual network. Options of ``uld train`` they read: ``--dataset``,
``--backbone``, ``-k``, ``--steps``, ``--lr``, ``--batch-size``, ``--size``,
``--crop-margin``, ``--run-id`` / ``--resume``, ``--threads``,
``--progress``; any other :class:`~pipeline.methods.condgen.CondGenConfig`
field through ``--param NAME=VALUE`` (e.g. ``--param width=24``,
``--param flow_weight=0.5``, ``--param warp=tps``), and ``--param checkpoint_every=N`` (default 50).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flows.cli_train import TrainRequest, register_method

# CondGenConfig fields settable with --param (the others come from options of `uld train`).
_FROM_OPTIONS = {"k", "steps", "lr", "batch_size", "backbone", "seed", "perceptual_layers"}


def condgen_request(req: TrainRequest, method: str) -> dict[str, Any]:
    """The ``flows.condgen.condgen`` arguments a ``uld train`` request describes."""
    from pipeline.methods.condgen import CondGenConfig

    o, s = req.options, req.settings
    casts = {f.name: type(f.default) for f in dataclasses.fields(CondGenConfig) if f.name not in _FROM_OPTIONS}
    extra = {name: req.param(name, cast) for name, cast in casts.items() if name in req.params}
    steps = o.get("steps")
    config = CondGenConfig(k=o["k"], steps=CondGenConfig.steps if steps is None else int(steps), lr=o["lr"], batch_size=o["batch_size"],
                           backbone=o["backbone"], seed=s.seed, **extra)
    return dict(method=method, dataset=o["dataset"], config=config, home=s.home, size=o["size"], crop_margin=o["crop_margin"],
                run_id=o["run_id"], resume=o["resume"], checkpoint_every=req.param("checkpoint_every", int, 50),
                progress=o["progress"], threads=o["threads"], device=s.device)


def _run(req: TrainRequest, method: str) -> None:
    from flows.condgen import condgen
    from flows.summary import print_summary

    rows = condgen(**condgen_request(req, method))
    if len(rows):
        print_summary(req.settings.home, rows.attrs["run_id"])


@register_method("jakab", "Jakab et al. 2018 (seed 003): reconstruct a warped copy from the image's appearance + the copy's K-point Gaussian bottleneck.",
                 own_options=("steps",))
def run_jakab(req: TrainRequest) -> None:
    return _run(req, "jakab")


@register_method("c3", "C3 (seed 004): cross-image cycle consistency (swap appearance and pose of two images, twice) + cross-image flow term.",
                 own_options=("steps",))
def run_c3(req: TrainRequest) -> None:
    return _run(req, "c3")
