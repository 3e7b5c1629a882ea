"""``uld predict`` and ``uld export-model``: a trained method's landmarks on new images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the ``predict`` and ``export-model`` commands to the ``uld`` app."""

    @app.command("predict")
    def predict_cmd(
        ctx: typer.Context,
        model: str = typer.Option(..., "--model", "-m", help="A run id (under --home), a run folder, or a folder written by `uld export-model`."),
        images: Optional[list[str]] = typer.Option(None, "--images", "-i", help="Image file, folder (every image below it) or quoted glob; repeatable."),
        out: Path = typer.Option(Path("predictions.parquet"), "--out", "-o", help="Parquet table written: one row per (image, landmark), original pixels."),
        overlays: Optional[Path] = typer.Option(None, "--overlays", help="Also write one PNG per image with its landmarks into this folder."),
        dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Instead of --images: a dataset's split with its manifest boxes (reproduces the run's keypoints.parquet)."),
        split: str = typer.Option("test", "--split", help="With --dataset: the split to predict."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per batch (default 16; with --dataset, the batch the run predicted its splits with, e.g. D-ULD's 32)."),
        backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Load the backbone from here instead of the model's record (its identity must match)."),
        round_: Optional[int] = typer.Option(None, "--round", help="D-ULD / Mallis (D) / D-ULD++ run: use this finished round's checkpoint (default: the last)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    ) -> None:
        """Landmarks of new images with any trained method's model (ZeroShot, D-ULD, Mallis (D), D-ULD++, Jakab, C3, StableKeypoints).

        Unlabelled images are cropped like the `folder` dataset: the object box is the
        whole image. Unreadable images are skipped and listed with their reasons (also in
        <out stem>-skipped.parquet); the others are predicted.
        """
        from flows.cli import settings
        from flows.predict import predict, skipped_path
        from pipeline.settings import resolve_device

        s = settings(ctx)
        res = predict(
            model, images, out=out, home=s.home, dataset=dataset, split=split, overlays=overlays, batch_size=batch_size,
            backbone=backbone, round_=round_, device=resolve_device(s.device), progress=progress,
        )
        if len(res.skipped):
            typer.echo("skipped images:")
            typer.echo(res.skipped[["image", "reason"]].to_string(index=False))
            typer.echo(f"(also in {skipped_path(out)})")
        typer.echo(f"{res.summary()} -> {out}" + (f"; overlays in {overlays}" if overlays is not None and len(res.frame) else ""))
        if not len(res.frame):
            raise typer.Exit(1)  # nothing usable came out: a script should notice

    @app.command("export-model")
    def export_cmd(
        ctx: typer.Context,
        model: str = typer.Option(..., "--model", "-m", help="A run id (under --home) or run folder of any trained method."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder to write the model to (predictor.json + weights)."),
        round_: Optional[int] = typer.Option(None, "--round", help="D-ULD / Mallis (D) / D-ULD++ run: export this finished round (default: the last)."),
    ) -> None:
        """Write a run's trained model as a folder you can copy: config JSON, safetensors / npy
        weights, the feature spec and the backbone reference with its identity hash."""
        from flows.cli import settings
        from flows.predict import export_model

        s = settings(ctx)
        path = export_model(model, out, home=s.home, round_=round_)
        typer.echo(f"model written to {path} (load it with `uld predict --model {path}` or LandmarkPredictor.from_pretrained)")
