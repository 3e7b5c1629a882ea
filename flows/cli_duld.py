"""``uld duld``: D-ULD -- detector/descriptor heads on cached hyperfeatures, bootstrapped, then self-trained."""

from __future__ import annotations

import time
from typing import Optional

import typer

from flows.cli_options import CropMargin, Layers, ReduceChannels, Size, Timesteps, feature_spec


def format_nme_table(table) -> str:
    """The per-round NME table as text (NME in % of the normalising distance)."""
    if table is None or len(table) == 0:
        return "(no evaluated rounds yet)"
    cols = [c for c in ("stage", "round", "nme_forward", "nme_backward", "nme_forward_nofallback", "nme_backward_nofallback",
                        "acc0.2_hungarian", "acc0.2_hungarian_nofallback", "fallback_train", "fallback_test") if c in table.columns]
    return table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}")


def register(app: typer.Typer) -> None:
    """Add the ``duld`` command to the ``uld`` app."""

    @app.command("duld")
    def duld_cmd(
        ctx: typer.Context,
        dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset with manifests and cached features in the workspace."),
        backbone: str = typer.Option("shipped", "--backbone", "-b", help="Backbone the features were extracted with (as given to `uld features`)."),
        k: int = typer.Option(10, "-k", "--k", help="Number of landmarks K (k-means clusters of keypoint descriptors)."),
        rounds: int = typer.Option(3, "--rounds", help="Self-training rounds (each: keypoints -> k-means pseudo-labels -> training -> evaluation)."),
        steps_per_round: int = typer.Option(150, "--steps-per-round", help="Optimisation steps per round (paper: 5000; re-cluster after each round)."),
        bootstrap_steps: int = typer.Option(300, "--bootstrap-steps", help="Self-supervised bootstrapping steps before round 1 (paper: 50000)."),
        lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate (paper: 1e-4 over 150k steps; larger for short CPU runs)."),
        batch_size: int = typer.Option(12, "--batch-size", help="Crops per optimisation step (paper: 12)."),
        resolution: Optional[int] = typer.Option(None, "--resolution", help="Heatmap/descriptor map size; default crop/4 (at most the largest cached map)."),
        channels: int = typer.Option(64, "--channels", help="Aggregator bottleneck channels (paper: 384)."),
        descriptor_dim: int = typer.Option(32, "--descriptor-dim", help="Descriptor dimension D."),
        run_id: Optional[str] = typer.Option(None, "--run-id", help="Run folder name under runs/; default: a fresh duld-<time>-<hash>."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run --run-id from its last finished round (same options required)."),
        timesteps: Timesteps = None,
        layers: Layers = None,
        size: Size = 64,
        crop_margin: CropMargin = 0.15,
        reduce_channels: ReduceChannels = None,
        roi: bool = typer.Option(True, "--roi/--no-roi", help="Keep keypoints inside each image's object box (as ZeroShot samples only RoI pixels)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
        n_views: int = typer.Option(2, "--views", help="Augmented views per training image for bootstrapping (their features are extracted once, next to the feature store); 0 = warp the cached maps instead (the old shortcut, for comparison)."),
        flip: bool = typer.Option(False, "--flip/--no-flip", help="Mirror half of the views. Off by default: matching a crop to its mirror teaches the descriptor that left and right parts are the same."),
        colour_jitter: float = typer.Option(0.0, "--colour-jitter", help="Brightness/contrast/saturation jitter strength of the views (factors in [1-j, 1+j]; 0 = none)."),
        view_seed: Optional[int] = typer.Option(None, "--view-seed", help="Seed of the augmented views (part of the view store's name); default: the global --seed."),
        threshold: Optional[float] = typer.Option(None, "--threshold", help="Detector gate: keep heatmap maxima above this sigmoid score (default: the method's)."),
        relative_threshold: Optional[float] = typer.Option(None, "--relative-threshold", help="Detector gate: keep maxima of at least this fraction of the image's strongest one (default: the method's)."),
        threads: int = typer.Option(1, "--threads", help="torch CPU threads. 1 is fastest on a shared 2-core machine (more threads oversubscribe); raise it on an idle multi-core one."),
    ) -> None:
        """Train D-ULD on cached features and print forward/backward NME after every round.

        Needs `uld features` for the dataset first. Round 0 is the bootstrapped
        model (k-means on its keypoint descriptors); rounds 1..R are
        self-training rounds. Writes runs/<run>/: checkpoints per round,
        round-NNN-keypoints.parquet, pseudolabels.parquet, train-log.parquet,
        keypoints.parquet, metrics.parquet, errors.parquet, CED plots. A run
        that was interrupted continues with --run-id <id> --resume.
        """

        from flows.cli import settings
        from flows.duld import duld
        from pipeline.datasets.augment_views import ViewAugmentConfig
        from pipeline.settings import resolve_device

        s = settings(ctx)
        if resolve_device(s.device) != "cpu":
            typer.echo("note: D-ULD heads train on the CPU in this version; --device is used only to extract the augmented views")
        spec = feature_spec(size, timesteps, layers, crop_margin, reduce_channels, s.seed, backbone=backbone, home=s.home)
        t0 = time.perf_counter()
        table = duld(
            dataset, backbone, spec, k=k, rounds=rounds, steps_per_round=steps_per_round, bootstrap_steps=bootstrap_steps,
            lr=lr, batch_size=batch_size, home=s.home, seed=s.seed, run_id=run_id, resume=resume, resolution=resolution,
            channels=channels, descriptor_dim=descriptor_dim, progress=progress, threads=threads, roi=roi, device=s.device,
            views=ViewAugmentConfig(n_views=n_views, flip=flip, colour_jitter=colour_jitter, seed=s.seed if view_seed is None else view_seed) if n_views > 0 else None,
            threshold=threshold, relative_threshold=relative_threshold,
        )
        typer.echo("\nD-ULD per-round NME (%), test split:")
        typer.echo(format_nme_table(table))
        rid = table.attrs.get("run_id", run_id)
        typer.echo(f"\nrun: {rid}  (everything under {s.home / 'runs' / str(rid)})")
        typer.echo(f"time: {time.perf_counter() - t0:.1f} s")
