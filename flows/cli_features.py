"""``uld features``: cache diffusion hyperfeatures of a dataset (the features stage)."""

from __future__ import annotations

import time

import typer

from flows.cli_options import CropMargin, DaskAddress, DaskWorkers, Layers, ReduceChannels, Size, Timesteps, feature_spec


def register(app: typer.Typer) -> None:
    """Add the ``features`` command to the ``uld`` app."""

    @app.command("features")
    def features(
        ctx: typer.Context,
        dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset whose manifests exist in the workspace (see `uld datasets --help`)."),
        backbone: str = typer.Option("shipped", "--backbone", "-b", help="Backbone: `shipped` (the bundled DDPM), a backbone trained in the workspace, or a diffusers directory."),
        timesteps: Timesteps = None,
        layers: Layers = None,
        size: Size = 64,
        crop_margin: CropMargin = 0.15,
        batch_size: int = typer.Option(16, "--batch-size", help="Images per UNet call (memory vs speed; a resumed store keeps its own)."),
        shard_size: int = typer.Option(64, "--shard-size", help="Images per shard file: the unit of writing and of resuming."),
        reduce_channels: ReduceChannels = None,
        skip_bad: bool = typer.Option(False, "--skip-bad", help="Store zeros and mark invalid any image that cannot be read, instead of stopping."),
        verify: bool = typer.Option(False, "--verify", help="Only check the store of this configuration: list missing, damaged or unfinished pieces (exit 2 if any); extract nothing."),
        deep: bool = typer.Option(False, "--deep", help="Also decode every stored chunk (checks each CRC32C; reads the whole store). With --verify: report; without: re-extract what fails."),
        dask_address: DaskAddress = None,
        dask_workers: DaskWorkers = None,
        store_url: str = typer.Option(None, "--store-url", help="Keep the store below this folder or fsspec URL (s3://bucket/prefix, gs://...) instead of <home>/features; credentials and endpoint from the usual environment (AWS_* for S3). Needs s3fs / gcsfs for those."),
    ) -> None:
        """Extract diffusion hyperfeatures of every train and test image into a sharded Zarr store.

        Resumable: an interrupted run continues from the first unfinished shard;
        re-running a finished configuration does nothing, except re-extracting
        shards whose files went missing or are damaged (see --verify). A different
        configuration (timesteps, layers, size, backbone weights, manifest)
        writes a different store under features/<dataset>/<backbone>.zarr/<hash>/.
        """
        from flows.cli import settings
        from flows.feature_plan import check_manifests, check_usable, recorded_no_op
        from pipeline.errors import StoreError

        s = settings(ctx)
        spec = feature_spec(size, timesteps, layers, crop_margin, reduce_channels, s.seed, backbone=backbone, home=s.home)
        check_manifests(s.home, dataset, s.data_root)  # before a flow run starts: one clear error line
        t0 = time.perf_counter()
        if verify:
            from flows.features import verify_features

            path, problems = verify_features(dataset, backbone, spec, home=s.home, device="cpu", data_root=s.data_root, deep=deep, store_url=store_url)
            typer.echo(f"store:      {path}")
            if not problems:
                typer.echo(f"verified:   complete, every shard file present{' and every chunk decodes' if deep else ''}")
                return
            for p in problems:
                typer.echo(f"  {p}")
            raise StoreError(
                f"{len(problems)} problem(s) in the feature store (listed above)",
                where=str(path),
                fix="re-run this command without --verify to re-extract them" if all(p.repairable for p in problems)
                else "delete the folder and re-run `uld features` to rebuild it",
            )
        # A finished store needs no flow run (no Prefect server start-up) and, when the backbone's
        # identity is recorded for its unchanged files, no model either (no torch, no Prefect import);
        # when the store's completion record still holds, not even pandas or Zarr (storage.completion_cache).
        found = recorded_no_op(dataset, backbone, spec, home=s.home, data_root=s.data_root, deep=deep, store_url=store_url)
        path, summary = found if found is not None else (None, None)
        if path is None:
            from flows.features import complete_store_path

            path = complete_store_path(dataset, backbone, spec, home=s.home, device="cpu", data_root=s.data_root, deep=deep, store_url=store_url)
        if path is not None:
            typer.echo("features already complete: nothing to do")
        else:
            from flows.features import extract_features

            options = dict(home=s.home, device=s.device, batch_size=batch_size, skip_bad=skip_bad, shard_size=shard_size,
                           data_root=s.data_root, deep_check=deep, store_url=store_url)
            if dask_address is not None or dask_workers is not None:
                from flows.features_dask import dask_task_runner, extract_features_dask

                dask_task_runner(dask_address, dask_workers)  # a wrong option fails before the flow run starts
                path = extract_features_dask(dataset, backbone, spec, dask_address=dask_address, dask_workers=dask_workers, **options)
            else:
                path = extract_features(dataset, backbone, spec, **options)
        seconds = time.perf_counter() - t0
        if summary is None:  # recorded only for a complete, usable store: else open and check it here
            from storage.completion_cache import store_summary
            from storage.features import FeatureStore

            store = FeatureStore.open(path)
            check_usable(store)  # a store whose split has no readable image is an error, also when it was already complete
            summary = store_summary(store)
        b = summary["bytes_per_image"]
        typer.echo(f"store:      {path}")
        typer.echo(f"images:     {summary['n_images']} ({', '.join(f'{k}: {n}' for k, n in summary['splits'].items())})")
        shapes = summary["shapes"]
        typer.echo(f"keys:       {', '.join(f'{k} {tuple(shapes[k])}' for k in summary['keys'])}")
        typer.echo(f"bytes/image: {b['raw'] / 1024:.1f} KiB float16, {b['on_disk'] / 1024:.1f} KiB on disk")
        if summary["n_skipped"]:
            typer.echo(f"skipped:    {summary['n_skipped']} unreadable images (features zero, valid=False)")
        typer.echo(f"time:       {seconds:.1f} s")
