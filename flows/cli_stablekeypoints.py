"""``uld train --method stablekeypoints``: landmarks from tokens optimised against a UNet's cross-attention (seed 002).

Reads crops straight from the manifests (no feature store). ``--backbone``
is the UNet whose cross-attention the tokens are optimised against: a Stable
Diffusion folder, a context-DDPM folder (:mod:`pipeline.backbones.context_ddpm`),
or a plain DDPM folder (``shipped``, the face DDPM ...), which gets cross-attention
grown on it (:func:`pipeline.methods.stablekeypoints.model.grown_from_ddpm`). Options of ``uld train`` it
reads: ``--dataset``, ``--backbone``, ``-k``, ``--steps``,
``--batch-size``, ``--size``, ``--crop-margin``, ``--run-id`` / ``--resume``,
``--threads``, ``--progress``, ``--roi/--no-roi`` (select and predict
tokens' peaks inside the object box); any other
:class:`~pipeline.methods.stablekeypoints.StableKeypointsConfig` field through
``--param NAME=VALUE`` (e.g. ``--param n_tokens=200``, ``--param token_chunk=25``,
``--param lr=0.05``: the tokens' learning rate; ``--lr`` is not read),
and ``--param checkpoint_every=N`` (default 50).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flows.cli_train import TrainRequest, register_method

# Fields set from options of `uld train`. Not --lr: its default (1e-3) suits network weights, the tokens
# need a larger step (StableKeypointsConfig.lr), so their learning rate is --param lr=VALUE.
_FROM_OPTIONS = {"k", "steps", "batch_size", "backbone", "seed", "roi"}


def stablekeypoints_request(req: TrainRequest) -> dict[str, Any]:
    """The ``flows.stablekeypoints.stablekeypoints`` arguments a ``uld train`` request describes."""
    from pipeline.methods.stablekeypoints import StableKeypointsConfig

    o, s = req.options, req.settings
    casts = {f.name: type(f.default) for f in dataclasses.fields(StableKeypointsConfig) if f.name not in _FROM_OPTIONS}
    extra = {name: req.param(name, cast) for name, cast in casts.items() if name in req.params}
    steps = o.get("steps")
    config = StableKeypointsConfig(k=o["k"], steps=StableKeypointsConfig.steps if steps is None else int(steps),
                                   batch_size=o["batch_size"], backbone=o["backbone"], seed=s.seed,
                                   roi=bool(o["roi"]), **extra)
    return dict(dataset=o["dataset"], config=config, home=s.home, size=o["size"], crop_margin=o["crop_margin"], run_id=o["run_id"],
                resume=o["resume"], checkpoint_every=req.param("checkpoint_every", int, 50), progress=o["progress"],
                threads=o["threads"], device=s.device)


@register_method("stablekeypoints", "StableKeypoints (seed 002): optimise tokens so a text-conditioned UNet's cross-attention maps become "
                 "single Gaussians, equivariant to affine warps; K selected tokens' argmaxes are the landmarks.", own_options=("steps",))
def run_stablekeypoints(req: TrainRequest) -> None:
    from flows.stablekeypoints import stablekeypoints
    from flows.summary import print_summary

    rows = stablekeypoints(**stablekeypoints_request(req))
    if len(rows):
        print_summary(req.settings.home, rows.attrs["run_id"])
