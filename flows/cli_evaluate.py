"""``uld evaluate`` and ``uld evaluate-baseline``: the field's NME protocol on a run's keypoints."""

from __future__ import annotations

from typing import Optional

import typer

from flows.cli_options import Box, CropMargin, Layers, NRegressorImages, Protocol, ReduceChannels, Repeats, Size, Timesteps, eval_options, feature_spec

from pipeline.datasets.crop import DEFAULT_CROP_MARGIN
from pipeline.errors import ConfigError


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` and ``evaluate-baseline`` commands to the ``uld`` app."""

    @app.command("evaluate")
    def evaluate_cmd(
        ctx: typer.Context,
        run: str = typer.Option(..., "--run", "-r", help="Run id (a folder under <home>/runs/)."),
        dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset whose ground truth to use; default: the one in the run's config.json."),
        protocol: Protocol = "paper",
        box: Box = "landmarks",
        n_regressor_images: NRegressorImages = None,
        repeats: Repeats = None,
        missing: str = typer.Option("impute", "--missing", help="Missing discovered landmarks: 'impute' (training mean position, counted) or 'drop' (leave the image out, counted)."),
        forward_lambda: Optional[float] = typer.Option(None, "--forward-lambda", help="Ridge lambda of the forward regressor, relative to max(X^T X); default: the protocol's."),
        backward_lambda: Optional[float] = typer.Option(None, "--backward-lambda", help="Ridge lambda of the backward regressor, relative to max(X^T X); default: the protocol's."),
        stage: Optional[str] = typer.Option(None, "--stage", help="Only this stage (default: every stage in the run)."),
        round_: Optional[int] = typer.Option(None, "--round", help="Only this round (default: every round)."),
    ) -> None:
        """Forward/backward NME, yaw bins, CED and Hungarian accuracy for every (method, stage, round) of a run.

        Ridge regressors (closed form, bias via centring) map discovered landmarks to the ground truth
        (forward) and back (backward) in crop-normalised coordinates; errors are % of the dataset's
        normalising distance (inter-ocular, or sqrt of the landmark box area). Appends to the run's
        metrics.parquet / errors.parquet (re-runs replace their rows) and writes figures/ced_*.png.
        """
        from flows.cli import settings
        from flows.cli_zeroshot import print_metrics
        from flows.evaluate import evaluate

        if missing not in ("impute", "drop"):
            raise ConfigError(f"unknown --missing value {missing!r}", where="--missing", fix="use impute or drop")
        from pipeline.evaluation.protocols import get_protocol

        get_protocol(protocol).with_overrides(n_regressor_images, repeats, forward_lambda, backward_lambda)  # bad options fail first
        s = settings(ctx)
        from flows.run_mirror import mirrored_run

        with mirrored_run(s.home, run, s.runs_url, resume=True):  # with --runs-url: fetched when missing here, copied back
            evaluate(
                run, home=s.home, dataset=dataset, **eval_options(protocol, box, n_regressor_images, repeats), seed=s.seed,
                forward_lambda=forward_lambda, backward_lambda=backward_lambda, missing=missing, stage=stage, round_=round_,
            )
        print_metrics(s.home, run)

    @app.command("evaluate-baseline")
    def baseline_cmd(
        ctx: typer.Context,
        name: str = typer.Argument(..., help="random (K uniform points in the object box) | mean-shape (box corners + centre, K=5)."),
        dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset with manifests and cached features in the workspace."),
        backbone: str = typer.Option("shipped", "--backbone", "-b", help="Backbone of the feature store whose crops to use."),
        k: int = typer.Option(10, "-k", "--k", help="Number of random landmarks (ignored by mean-shape)."),
        run_id: Optional[str] = typer.Option(None, "--run-id", help="Run folder name; default: a fresh baseline-<name>-<time>-<hash>."),
        store: Optional[str] = typer.Option(None, "--store", help="Read this feature store (a folder or an fsspec URL) directly."),
        timesteps: Timesteps = None,
        layers: Layers = None,
        size: Size = 64,
        crop_margin: CropMargin = DEFAULT_CROP_MARGIN,
        reduce_channels: ReduceChannels = None,
        protocol: Protocol = "paper",
        box: Box = "landmarks",
        n_regressor_images: NRegressorImages = None,
        repeats: Repeats = None,
    ) -> None:
        """Evaluate a box-only reference (no image content) through the same protocol and crops as the methods.

        Any discovery method must beat `mean-shape`: with the linear regressor on top, the object
        box alone already predicts the average landmark layout.
        """
        from flows.cli import settings
        from pipeline.settings import resolve_device
        from flows.cli_zeroshot import print_metrics
        from flows.zeroshot import reference_baseline
        from pipeline.methods.baselines import BASELINES

        if name not in BASELINES:
            raise ConfigError(f"unknown baseline {name!r}", where="NAME", fix=f"use one of: {', '.join(BASELINES)}")
        s = settings(ctx)
        from flows.results import new_run_id
        from flows.run_mirror import mirrored_run

        spec = feature_spec(size, timesteps, layers, crop_margin, reduce_channels, s.seed, backbone=backbone, home=s.home)
        run_id = run_id or new_run_id(f"baseline-{name}")
        with mirrored_run(s.home, run_id, s.runs_url, resume=False):
            rid = reference_baseline(
                dataset, name, backbone, spec, k, home=s.home, seed=s.seed, run_id=run_id, store_path=store,
                eval_cfg=eval_options(protocol, box, n_regressor_images, repeats), device=resolve_device(s.device),
            )
        print_metrics(s.home, rid)
