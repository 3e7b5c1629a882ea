"""``uld duld``: D-ULD -- detector/descriptor heads on cached hyperfeatures, bootstrapped, then self-trained.

An alias of ``uld train --method duld`` (flows/cli_train.py declares the options once).
"""

from __future__ import annotations

import typer


def format_nme_table(table) -> str:
    """The per-round NME table as text (NME in % of the normalising distance)."""
    if table is None or len(table) == 0:
        return "(no evaluated rounds yet)"
    cols = [c for c in ("stage", "round", "nme_forward", "nme_backward", "nme_forward_nofallback", "nme_backward_nofallback",
                        "acc0.2_hungarian", "acc0.2_hungarian_nofallback", "fallback_train", "fallback_test") if c in table.columns]
    return table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}")


DOC = """Train D-ULD on cached features and print forward/backward NME after every round (= `uld train --method duld`).

Needs `uld features` for the dataset first. Round 0 is the bootstrapped
model (k-means on its keypoint descriptors); rounds 1..R are
self-training rounds. Writes runs/<run>/: checkpoints per round,
round-NNN-keypoints.parquet, pseudolabels.parquet, train-log.parquet,
keypoints.parquet, metrics.parquet, errors.parquet, CED plots. A run
that was interrupted continues with --run-id <id> --resume.
"""


def register(app: typer.Typer) -> None:
    """Add the ``duld`` command (alias of ``uld train --method duld``) to the ``uld`` app."""
    from flows.cli_train import alias_command

    app.command("duld")(alias_command("duld", DOC))
