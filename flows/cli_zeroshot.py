"""``uld zeroshot``: training-free landmarks from cached hyperfeatures (001, Sec 3.1)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from flows.cli_options import Box, CropMargin, Layers, NRegressorImages, Protocol, ReduceChannels, Repeats, Size, Timesteps, eval_options, feature_spec

def print_metrics(home: Path, run_id: str, extra: tuple[str, ...] = ()) -> None:
    """Print the run's summary (the columns every method prints: flows.summary)."""
    from flows.summary import print_summary

    print_summary(home, run_id, extra)


def register(app: typer.Typer) -> None:
    """Add the ``zeroshot`` command to the ``uld`` app."""

    @app.command("zeroshot")
    def zeroshot_cmd(
        ctx: typer.Context,
        dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset with manifests and cached features in the workspace."),
        backbone: str = typer.Option("shipped", "--backbone", "-b", help="Backbone the features were extracted with (as given to `uld features`)."),
        k: int = typer.Option(10, "-k", "--k", help="Number of landmarks K (k-means clusters)."),
        samples_per_image: int = typer.Option(200, "--samples-per-image", help="Random RoI pixels per training image fed to k-means."),
        test_samples: Optional[int] = typer.Option(None, "--test-samples", help="Random RoI pixels per test image; default: every RoI pixel (deterministic)."),
        proj_dim: Optional[int] = typer.Option(None, "--proj-dim", help="Project each feature key to this many channels (fixed seeded random projection) before clustering."),
        max_train_images: Optional[int] = typer.Option(None, "--max-train-images", help="Use a seeded subset of this many training images (sampling and regressor pool)."),
        run_id: Optional[str] = typer.Option(None, "--run-id", help="Run folder name under runs/; default: a fresh zeroshot-<time>-<hash>. An existing run with the same config resumes."),
        resume: bool = typer.Option(False, "--resume", help="Continue the existing run --run-id; an error when no such run exists (instead of silently starting a new one)."),
        store: Optional[str] = typer.Option(None, "--store", help="Read this feature store (a folder or an fsspec URL such as s3://bucket/features/...) directly instead of looking it up from the options below."),
        timesteps: Timesteps = None,
        layers: Layers = None,
        size: Size = 64,
        crop_margin: CropMargin = 0.15,
        reduce_channels: ReduceChannels = None,
        batch_size: int = typer.Option(16, "--batch-size", help="Images read from the store at a time (bounds memory)."),
        n_init: int = typer.Option(3, "--n-init", help="k-means restarts (lowest inertia kept)."),
        max_iter: int = typer.Option(50, "--max-iter", help="k-means iterations per restart."),
        protocol: Protocol = "paper",
        box: Box = "landmarks",
        n_regressor_images: NRegressorImages = None,
        repeats: Repeats = None,
        evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Compute forward/backward NME after predicting."),
        force: bool = typer.Option(False, "--force", help="Redo every step of an existing run, overwriting its files."),
        candidates: Optional[int] = typer.Option(None, "--candidates", help="k-means clusters M; the K most compact ones present in most training images become the landmarks (pipeline/clustering/selection.py). Default 4 x K; --candidates K = the paper's plain K-means."),
        min_presence: float = typer.Option(0.8, "--min-presence", help="With --candidates > K: keep only clusters present in at least this fraction of the training images."),
        min_coherence: Optional[float] = typer.Option(None, "--min-coherence", help="With --candidates > K: prefer clusters whose position across images follows the other clusters' shared motion at least this much (R^2 in [0, 1]); drops compact clusters parked at fixed crop positions (background, crop borders). Default: flows.zeroshot.MIN_COHERENCE."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
        roi: str = typer.Option("box", "--roi", help="Pixels sampled and labelled: `box` = inside the object box (the paper's RoI); `foreground` = also drop what an unsupervised two-cluster split of each crop's features calls background (measured in bench/results/zeroshot_selection.md: not better than the box with the cluster choice)."),
    ) -> None:
        """Cluster hyperfeatures of random RoI pixels into K landmarks; label test pixels; evaluate.

        Needs `uld features` for the dataset first. Writes runs/<run>/ (descriptor sample,
        centroids, keypoints.parquet, metrics.parquet, errors.parquet, a CED plot) and prints
        the headline metrics (NME in % of the normalising distance).
        """
        from flows.cli import settings
        from pipeline.settings import resolve_device
        from flows.zeroshot import zeroshot

        s = settings(ctx)
        eval_cfg = eval_options(protocol, box, n_regressor_images, repeats)
        from flows.results import new_run_id
        from flows.run_mirror import mirrored_run
        from pipeline.errors import ConfigError
        from storage.layout import Workspace

        if resume and run_id is None:
            raise ConfigError("--resume needs the --run-id of the run to continue", where="--resume", fix="pass --run-id <id> (see `ls <home>/runs`)")
        run_id = run_id or new_run_id("zeroshot")
        t0 = time.perf_counter()
        with mirrored_run(s.home, run_id, s.runs_url, resume):  # with --runs-url: fetched first when resuming, copied when done
            if resume and not Workspace(s.home).run_file(run_id, "config.json").is_file():
                raise ConfigError(
                    f"no run {run_id!r} to resume",
                    where=str(Workspace(s.home).run_dir(run_id)),
                    fix="drop --resume to start a new run with this id, or give the --run-id of an existing run (see `ls <home>/runs`)",
                )
            spec = feature_spec(size, timesteps, layers, crop_margin, reduce_channels, s.seed, backbone=backbone, home=s.home)
            rid = zeroshot(
                dataset, backbone, spec, k, samples_per_image, home=s.home, seed=s.seed, run_id=run_id,
                store_path=store, n_test_samples=test_samples, proj_dim=proj_dim, max_train_images=max_train_images,
                batch_size=batch_size, n_init=n_init, max_iter=max_iter, evaluate=evaluate,
                eval_cfg=eval_cfg, device=resolve_device(s.device), force=force, roi=roi,
                n_candidates=candidates, min_presence=min_presence, min_coherence=min_coherence, progress=progress,
            )
        print_metrics(s.home, rid)
        typer.echo(f"time: {time.perf_counter() - t0:.1f} s")
