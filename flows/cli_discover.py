"""``uld discover``: your own images -> landmarks, overlays and a report, in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli_options import CropMargin, Layers, Size, Timesteps
from pipeline.datasets.crop import DEFAULT_CROP_MARGIN


def register(app: typer.Typer) -> None:
    """Add the ``discover`` command to the ``uld`` app."""

    @app.command("discover")
    def discover_cmd(
        ctx: typer.Context,
        images: str = typer.Option(..., "--images", "-i", help="A folder (every image below it), an image file or a quoted glob."),
        method: str = typer.Option("zeroshot", "--method", "-m", help="zeroshot (training-free, minutes) or duld (trains heads on the features)."),
        k: int = typer.Option(10, "-k", "--k", help="Number of landmarks K."),
        backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Backbone for the features: shipped (default), a backbone folder, one trained here, a hub id."),
        train_backbone: bool = typer.Option(False, "--train-backbone", help="First train a category DDPM on these images (`uld backbone train`: resumable checkpoints under <home>/backbones/ddpm-<name>-<size>-<hash>/; the same command again continues or skips it) and use it for the features."),
        backbone_steps: int = typer.Option(3000, "--backbone-steps", min=1, help="--train-backbone: training steps in total (raise it to continue a finished training); ~2.9 steps/s at 64 px on one CPU thread."),
        boxes: Optional[Path] = typer.Option(None, "--boxes", help="CSV image,x0,y0,x1,y1 (original pixels; image = path relative to the images' folder or to the CSV's, or absolute): object boxes for the images it lists (recorded as box_source 'file'); the others use the whole image."),
        name: Optional[str] = typer.Option(None, "--name", help="Dataset name in the workspace (default: folder-<the folder's name>)."),
        run_id: Optional[str] = typer.Option(None, "--run-id", help="Run folder name (default: <name>-<method>-k<K>-<hash of the features and settings>; the same command again resumes it)."),
        timesteps: Timesteps = None,
        layers: Layers = None,
        size: Size = 64,
        crop_margin: CropMargin = DEFAULT_CROP_MARGIN,
        rounds: int = typer.Option(3, "--rounds", help="D-ULD: self-training rounds."),
        steps_per_round: int = typer.Option(150, "--steps-per-round", help="D-ULD: training steps per round."),
        bootstrap_steps: int = typer.Option(300, "--bootstrap-steps", help="D-ULD: bootstrap training steps."),
        samples_per_image: int = typer.Option(200, "--samples-per-image", help="ZeroShot: random pixels per training image fed to k-means."),
        overlays: int = typer.Option(48, "--overlays", help="Write this many per-image overlay PNGs (test images first; 0 = none)."),
        flip: bool = typer.Option(True, "--flip-check/--no-flip-check", help="Measure consistency under a horizontal flip (predicts up to 64 images, test first, and their mirror images)."),
        warp: bool = typer.Option(True, "--warp-check/--no-warp-check", help="Measure consistency under a seeded small affine warp per image (rotation <= 3 degrees, scale <= 5%, shift <= 3% of the side), mapped back through its inverse."),
        force: bool = typer.Option(False, "--force", help="Redo the method run from scratch (e.g. an existing --run-id with other settings); manifests and features are reused."),
    ) -> None:
        """Discover K landmarks on a folder of unlabelled images of one category.

        Builds the folder's manifests (object box = whole image, or --boxes; a seeded 10% hold-out
        is the test split), optionally trains a DDPM on the images (--train-backbone), extracts
        the backbone's features, runs the method, and writes under <home>/runs/<run>/:
        keypoints.parquet and landmarks.csv (original pixels, with each image's path),
        figures/overlays/*.png, the contact sheet, and report.html. Without labels there is no
        NME: the report shows landmark presence, cluster quality (ZeroShot) and the consistency
        under a flip and under small warps. Every stage resumes; the same command again finishes at once.
        """
        from flows.cli import settings
        from flows.discover import discover
        from pipeline.settings import resolve_device

        s = settings(ctx)
        res = discover(
            images, method=method, k=k, backbone=backbone, home=s.home, name=name, run_id=run_id, size=size, timesteps=timesteps,
            layers=layers, crop_margin=crop_margin, seed=s.seed, device=resolve_device(s.device), rounds=rounds,
            steps_per_round=steps_per_round, bootstrap_steps=bootstrap_steps, n_samples_per_image=samples_per_image,
            max_overlays=overlays, flip=flip, warp=warp, force=force, train_backbone=train_backbone, backbone_steps=backbone_steps,
            boxes=boxes,
        )
        if len(res.skipped):
            typer.echo("skipped images:")
            typer.echo(res.skipped[["source", "reason"]].to_string(index=False))
        if res.consistency is not None and len(res.consistency):
            typer.echo("consistency (up to 64 images, test first; errors in % of sqrt(w*h) of the object box; partner = the landmark it "
                       "becomes when mirrored; warp = a small affine warp mapped back; renoise = same image, other noise):")
            typer.echo(res.consistency.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        typer.echo(res.summary())
