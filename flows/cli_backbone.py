"""``uld backbone ...``: train a category DDPM, inspect a backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

HELP = (
    "Diffusion backbones: train a small category DDPM on a dataset's unlabelled training crops "
    "(resumable), or show what a backbone offers (layers, feature shapes, bytes per image)."
)


def register(app: typer.Typer) -> None:
    """Add the ``backbone`` command group to ``app``."""
    sub = typer.Typer(name="backbone", help=HELP, no_args_is_help=True)

    @sub.command("train")
    def train(
        ctx: typer.Context,
        dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset whose train manifest exists in the workspace (see `uld datasets --help`)."),
        steps: int = typer.Option(3000, "--steps", min=1, help="Optimiser steps in total (a resumed run continues up to this; raise it to extend a finished run)."),
        batch_size: int = typer.Option(32, "--batch-size", min=1, help="Crops per step."),
        size: int = typer.Option(64, "--size", min=8, help="Crop size in pixels (multiple of 8); features are later extracted at this size."),
        margin: float = typer.Option(0.15, "--crop-margin", help="Margin around the object box, as a fraction of its size (match `uld features --crop-margin`)."),
        lr: float = typer.Option(5e-4, "--lr", help="AdamW learning rate (after a 100-step linear warm-up)."),
        name: Optional[str] = typer.Option(None, "--name", help="Backbone name in the workspace (<home>/backbones/NAME) [default: ddpm-DATASET-SIZE]."),
        out: Optional[Path] = typer.Option(None, "--out", help="Also export the trained model to this folder (e.g. to ship it)."),
        save_dtype: str = typer.Option("float32", "--save-dtype", help="Weights dtype on disk: float32 or float16 (half the size)."),
        checkpoint_every: int = typer.Option(250, "--checkpoint-every", min=1, help="Steps between resumable checkpoints."),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Train on the first N training images only."),
        threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads. 1 is fastest on a shared 2-core machine (more threads oversubscribe: 0.3-1 steps/s instead of 2.9 measured); raise it on an idle multi-core one."),
        channels: Optional[str] = typer.Option(None, "--channels", help="UNet widths per resolution level, e.g. 16,32,64,128 (self-attention at the lowest level) [default: the shipped 16,24,32,64]."),
        flip: bool = typer.Option(False, "--flip/--no-flip", help="Random horizontal flips of the training crops (see TrainConfig.flip for why it is off by default)."),
    ) -> None:
        """Train a pixel-space DDPM (diffusers UNet2DModel) on the dataset's training crops.

        Checkpoints go to <home>/backbones/NAME/checkpoints/; re-running the same
        command after an interruption continues from the newest one. The EMA
        weights are saved with save_pretrained to <home>/backbones/NAME/ (plus
        loss.png); use the backbone later with `--backbone NAME` or its folder.
        """
        from flows.backbone import train_backbone
        from flows.cli import settings
        from flows.cli_options import int_list
        from flows.datasets import load_manifest
        from pipeline.settings import resolve_device

        s = settings(ctx)
        load_manifest(s.home, dataset, "train")  # fail fast with the dataset's own hint, before Prefect starts
        summary = train_backbone(
            dataset=dataset,
            home=s.home,
            steps=steps,
            batch_size=batch_size,
            image_size=size,
            margin=margin,
            lr=lr,
            seed=s.seed,
            name=name,
            out=out,
            save_dtype=save_dtype,
            checkpoint_every=checkpoint_every,
            limit=limit,
            device=resolve_device(s.device),
            threads=threads,
            channels=None if channels is None else tuple(int_list(channels, "--channels")),
            flip=flip,
        )
        typer.echo(f"backbone:   {summary['name']} -> {summary['dir']}")
        if "out" in summary:
            typer.echo(f"exported:   {summary['out']}")
        typer.echo(f"images:     {summary['n_images']} ({dataset}/train, {size} px)")
        typer.echo(f"steps:      {summary['steps']} (batch {batch_size})")
        typer.echo(f"final loss: {summary['final_loss_mean_last_100']:.4f} (mean of the last 100 steps)")
        total = summary["train_wall_seconds_total"]
        typer.echo(f"wall time:  {summary['wall_seconds_this_run']:.0f} s this run"
                   + (f", {total:.0f} s training in total" if total is not None else ""))

    @sub.command("info")
    def info(
        ctx: typer.Context,
        spec: str = typer.Argument("shipped", help="Backbone: `shipped`, a workspace backbone name, a folder, or a hub id."),
        size: int = typer.Option(64, "--size", help="Input crop size for the shapes and bytes shown."),
        timesteps: str = typer.Option("50,150", "--timesteps", help="Comma-separated timesteps of the feature spec."),
        layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated layers [default: the backbone's default layers]."),
    ) -> None:
        """Show a backbone's identity, all its layers with their shapes at --size,
        and the float16 bytes per image of a feature spec (default layers unless --layers)."""
        from flows.cli import settings
        from pipeline.backbones.loading import backbone_name, load_backbone
        from flows.cli_options import int_list, str_list

        s = settings(ctx)
        model = load_backbone(spec, "cpu", home=s.home)
        ts = model.feature_timesteps(int_list(timesteps, "--timesteps"))  # `pixels`: one placeholder t0
        chosen = list(str_list(layers)) or model.default_layers()
        all_shapes = model.feature_shapes(size, model.layer_names())
        typer.echo(f"backbone:  {backbone_name(spec)} ({type(model).__name__})")
        for k, v in model.identity().items():
            typer.echo(f"  {k}: {v}")
        for line in model.notes():
            typer.echo(f"  note: {line}")
        typer.echo(f"layers at {size} px (C, h, w); * = default:")
        defaults = set(model.default_layers())
        for layer, shape in all_shapes.items():
            typer.echo(f"  {'*' if layer in defaults else ' '} {layer:10s} {shape}")
        shapes = model.feature_shapes(size, chosen)
        per_t = sum(c * h * w for c, h, w in shapes.values())
        total = per_t * len(ts) * 2
        typer.echo(f"feature spec: layers {','.join(chosen)}, timesteps {ts}")
        typer.echo(f"bytes/image: {total:,} ({total / 1024:.1f} KiB) in float16")

    app.add_typer(sub)
