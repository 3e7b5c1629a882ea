"""Run-wide settings: where data and the workspace live, device, seed.

Values come from explicit arguments (CLI options) first, then environment
variables, then defaults. Nothing is read at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError

ENV_HOME = "ULD_HOME"  # workspace root (default ./workspace)
ENV_DATA = "ULD_DATA"  # root of user datasets (default ./data)
ENV_DEVICE = "ULD_DEVICE"  # "auto" | "cpu" | "cuda" | "cuda:N"
ENV_SEED = "ULD_SEED"
ENV_RUNS_URL = "ULD_RUNS_URL"  # fsspec URL run folders are mirrored to (default: none)


def resolve_device(device: str = "auto") -> str:
    """Turn "auto" into "cuda" when a GPU is usable, else "cpu"; validate the rest."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} was requested but no CUDA GPU is usable",
                where=f"--device / ${ENV_DEVICE}",
                fix="use --device cpu (or auto), or run on a machine with a CUDA build of torch",
            )
        return device
    raise ConfigError(
        f"unknown device {device!r}",
        where=f"--device / ${ENV_DEVICE}",
        fix="use one of: auto, cpu, cuda, cuda:N",
    )


@dataclass(frozen=True)
class Settings:
    """Where things are and how to run. Build with :meth:`from_env`."""

    home: Path = field(default_factory=lambda: Path("workspace"))
    data_root: Path = field(default_factory=lambda: Path("data"))
    device: str = "auto"
    seed: int = 0
    runs_url: str | None = None  # run folders are also kept at <runs_url>/<run id> (storage.run_mirror)

    @classmethod
    def from_env(
        cls,
        home: str | Path | None = None,
        data_root: str | Path | None = None,
        device: str | None = None,
        seed: int | None = None,
        runs_url: str | None = None,
    ) -> "Settings":
        env = os.environ
        seed_value: int | str = seed if seed is not None else env.get(ENV_SEED, 0)
        try:
            seed_int = int(seed_value)
        except ValueError:
            raise ConfigError(
                f"seed must be an integer, got {seed_value!r}",
                where=f"--seed / ${ENV_SEED}",
                fix="pass a whole number, e.g. --seed 0",
            ) from None
        if seed_int < 0:
            raise ConfigError(f"seed must be >= 0, got {seed_int}", where="--seed", fix="pass a non-negative integer")
        return cls(
            home=Path(home if home is not None else env.get(ENV_HOME, "workspace")).expanduser(),
            data_root=Path(data_root if data_root is not None else env.get(ENV_DATA, "data")).expanduser(),
            device=device if device is not None else env.get(ENV_DEVICE, "auto"),
            seed=seed_int,
            runs_url=_runs_url(runs_url if runs_url is not None else env.get(ENV_RUNS_URL)),
        )


def _runs_url(value: str | None) -> str | None:
    """A usable ``--runs-url``: an fsspec URL (``s3://...``), or None for none (empty)."""
    if not value:
        return None
    if "://" not in value or value.split("://", 1)[0].lower() in ("file", "local"):
        raise ConfigError(
            f"--runs-url must be a remote fsspec URL, got {value!r}",
            where=f"--runs-url / ${ENV_RUNS_URL}",
            fix="give e.g. s3://bucket/runs (run folders always live under <home>/runs; this is where they are copied)",
        )
    return value.rstrip("/")
