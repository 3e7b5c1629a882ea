"""Labellers by name, so a run's config.json (``{"name": ..., **params}``) rebuilds its labeller."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.errors import ConfigError
from pipeline.labelling.base import PseudoLabeller

LABELLERS: dict[str, type[PseudoLabeller]] = {}


def register_labeller(name: str) -> Callable[[type[PseudoLabeller]], type[PseudoLabeller]]:
    """Class decorator: make ``cls`` available to :func:`make_labeller` as ``name`` (sets ``cls.name``)."""

    def deco(cls: type[PseudoLabeller]) -> type[PseudoLabeller]:
        if name in LABELLERS and LABELLERS[name] is not cls:
            raise ValueError(f"labeller {name!r} is registered twice")
        cls.name = name
        LABELLERS[name] = cls
        return cls

    return deco


def make_labeller(spec: dict[str, Any]) -> PseudoLabeller:
    """An unfitted labeller from ``{"name": ..., **params}`` (what ``PseudoLabeller.to_json`` writes)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in LABELLERS:
        raise ConfigError(f"unknown pseudo-labeller {name!r}", where="labeller", fix=f"use one of: {', '.join(sorted(LABELLERS))}")
    try:
        return LABELLERS[name](**spec)
    except TypeError as exc:
        raise ConfigError(f"bad settings for the {name!r} labeller: {exc}", where="labeller") from None
