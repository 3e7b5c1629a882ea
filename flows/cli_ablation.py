"""``uld ablation``: the paper's Table 2 ablation (seed 001, Sec 5) on one feature store, by one command."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from flows.cli_options import Box, CropMargin, Layers, Protocol, ReduceChannels, Size, Timesteps, eval_options, feature_spec, int_list


def register(app: typer.Typer) -> None:
    """Add the ``ablation`` command to the ``uld`` app."""

    @app.command("ablation")
    def ablation_cmd(
        ctx: typer.Context,
        dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset with manifests and cached features in the workspace."),
        store: Optional[str] = typer.Option(None, "--store", help="Read this feature store (a folder or an fsspec URL) directly (e.g. the demo's) instead of finding it from --backbone and the feature options."),
        backbone: str = typer.Option("shipped", "--backbone", "-b", help="Backbone of the features (also renders the augmented views)."),
        seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated seeds; every row is run once per seed (mean +- std in the table)."),
        k: int = typer.Option(10, "-k", "--k", help="Number of landmarks K."),
        rounds: int = typer.Option(3, "--rounds", help="D-ULD rounds of the D-ULD, Mallis (D) and D-ULD++ runs."),
        steps_per_round: int = typer.Option(150, "--steps-per-round", help="Optimisation steps per round."),
        bootstrap_steps: int = typer.Option(300, "--bootstrap-steps", help="Bootstrapping steps before round 1."),
        q: int = typer.Option(5, "--q", help="D-ULD++: pose clusters Q (paper: 10)."),
        proxy_steps: Optional[int] = typer.Option(None, "--proxy-steps", help="D-ULD++: steps of the proxy-task stage (default: --steps-per-round)."),
        tsc_rounds: int = typer.Option(2, "--tsc-rounds", help="D-ULD++: TSC rounds after the proxy stage."),
        lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate of the D-ULD rounds."),
        batch_size: int = typer.Option(12, "--batch-size", help="Crops per optimisation step."),
        n_views: int = typer.Option(2, "--views", help="Augmented views per training image for bootstrapping (one view store for all seeds); 0 = warp the cached maps."),
        ablation_id: Optional[str] = typer.Option(None, "--ablation-id", help="Name of the ablation (folder ablations/<id>/, prefix of its run ids); default: <dataset>-k<K>-<hash of the settings>."),
        out: Optional[Path] = typer.Option(None, "--out", help="Also write the Markdown table here (default: only <home>/ablations/<id>/ablation.md)."),
        threads: int = typer.Option(1, "--threads", help="torch CPU threads (1 is fastest on a shared 2-core machine)."),
        timesteps: Timesteps = None,
        layers: Layers = None,
        size: Size = 64,
        crop_margin: CropMargin = 0.15,
        reduce_channels: ReduceChannels = None,
        protocol: Protocol = "paper",
        box: Box = "landmarks",
        progress: bool = typer.Option(False, "--progress/--no-progress", help="Show progress bars."),
    ) -> None:
        """ZeroShot (paper rule and cluster choice), D-ULD, + pose proxy, + TSC w/ full VAE, + TSC (D-ULD++), Mallis (D): per seed.

        Writes <home>/ablations/<id>/ablation.parquet (every row, seed, metric; last and
        best round) and ablation.md (mean +- std over seeds, NME per yaw bin where the
        dataset has yaw), and prints the table. "+ TSC w/ full VAE" is a second D-ULD++
        run whose TSC rounds train the whole pose VAE with the ELBO instead of Eq. 3
        (`uld train --method duld++ --tsc-loss elbo`).
        Running the same command again resumes every run and finishes at once.
        """
        from flows.ablation import ablation, check_seeds
        from flows.cli import settings
        from pipeline.datasets.augment_views import ViewAugmentConfig

        s = settings(ctx)
        seed_list = check_seeds(int_list(seeds, "--seeds"))  # before Prefect starts: a typo fails at once
        evaluation = eval_options(protocol, box)
        spec = None if store is not None else feature_spec(size, timesteps, layers, crop_margin, reduce_channels, s.seed, backbone=backbone, home=s.home)
        views = ViewAugmentConfig(n_views=n_views, seed=0) if n_views > 0 else None
        t0 = time.perf_counter()
        result = ablation(dataset, backbone, spec, home=s.home, store_path=store, seeds=seed_list, k=k, rounds=rounds, steps_per_round=steps_per_round,
                 bootstrap_steps=bootstrap_steps, q=q, proxy_steps=proxy_steps, tsc_rounds=tsc_rounds, lr=lr, batch_size=batch_size, views=views,
                 evaluation=evaluation, ablation_id=ablation_id, out=out, threads=threads, progress=progress, device=s.device)
        typer.echo(result.text)
        typer.echo(f"table: {result.markdown}\nrows: {result.parquet}")
        typer.echo(f"time: {time.perf_counter() - t0:.1f} s")
