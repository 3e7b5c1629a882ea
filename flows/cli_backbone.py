"""``uld backbone ...``: train a category DDPM, inspect a backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli_options import TRAIN_THREADS
from pipeline.datasets.crop import DEFAULT_CROP_MARGIN

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
        margin: float = typer.Option(DEFAULT_CROP_MARGIN, "--crop-margin", help="Margin around the object box, as a fraction of its size (match `uld features --crop-margin`)."),
        lr: float = typer.Option(5e-4, "--lr", help="AdamW learning rate (after a 100-step linear warm-up)."),
        name: Optional[str] = typer.Option(None, "--name", help="Backbone name in the workspace (<home>/backbones/NAME) [default: ddpm-DATASET-SIZE]."),
        out: Optional[Path] = typer.Option(None, "--out", help="Also export the trained model to this folder (e.g. to ship it)."),
        save_dtype: str = typer.Option("float32", "--save-dtype", help="Weights dtype on disk: float32 or float16 (half the size)."),
        checkpoint_every: int = typer.Option(250, "--checkpoint-every", min=1, help="Steps between resumable checkpoints."),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Train on the first N training images only."),
        threads: int = typer.Option(TRAIN_THREADS, "--threads", min=1, help="torch CPU threads. 1 is fastest on a shared 2-core machine (more threads oversubscribe: 0.3-1 steps/s instead of 2.9 measured); raise it on an idle multi-core one."),
        channels: Optional[str] = typer.Option(None, "--channels", help="UNet widths per resolution level, e.g. 16,32,64,128 (self-attention at the lowest level) [default: the shipped 16,24,32,64]."),
        flip: bool = typer.Option(False, "--flip/--no-flip", help="Random horizontal flips of the training crops (see TrainConfig.flip for why it is off by default)."),
        kind: str = typer.Option("ddpm", "--kind", help="ddpm (UNet2DModel) or context-ddpm: a UNet2DConditionModel whose cross-attention reads a few learned constant tokens (the CPU model for `uld train --method stablekeypoints`; --channels default 32,64)."),
        context_tokens: int = typer.Option(4, "--context-tokens", min=1, help="context-ddpm: number of learned context tokens."),
        precision: str = typer.Option("auto", "--precision", help="auto | fp32 | bf16 autocast of the forward pass. auto = bf16 where the hardware computes it (CUDA with bf16; CPUs with AVX512-BF16/AMX: 1.6x faster here), else fp32 (emulated bf16 is 15-35x slower)."),
        init_from: Optional[str] = typer.Option(None, "--init-from", help="Continue from this backbone's exported weights (a folder, `shipped`, or a workspace backbone name) with a fresh optimiser, when its checkpoints are gone; keeps its architecture. --steps counts this run's steps. With --kind context-ddpm: start the context-DDPM from this DDPM's convolutions (same widths; the cross-attention is new), so its attention maps sit on features that already know the category."),
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
            init_from=init_from,
            kind=kind,
            context_tokens=context_tokens,
            precision=precision,
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
        timesteps: Optional[str] = typer.Option(None, "--timesteps", help="Comma-separated timesteps of the feature spec [default: the backbone's default timesteps, else 50,150]."),
        layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated layers [default: the backbone's default layers]."),
    ) -> None:
        """Show a backbone's identity, all its layers with their shapes at --size,
        and the float16 bytes per image of a feature spec (default layers unless --layers)."""
        from flows.cli import settings
        from pipeline.backbones.loading import backbone_name, load_backbone
        from flows.cli_options import int_list, str_list

        s = settings(ctx)
        model = load_backbone(spec, "cpu", home=s.home)
        from pipeline.backbones.defaults import default_timesteps

        asked = default_timesteps(spec, s.home) if timesteps is None else int_list(timesteps, "--timesteps")
        ts = model.feature_timesteps(asked)  # `pixels`: one placeholder t0
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

    @sub.command("probe")
    def probe_cmd(
        ctx: typer.Context,
        dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset whose manifests exist in the workspace; the probe uses train images only."),
        backbone: str = typer.Option("shipped", "--backbone", "-b", help="Backbone: `shipped`, a workspace backbone name, a folder, or a hub id."),
        timesteps: str = typer.Option("25,50,100,150,250,400,600", "--timesteps", help="Comma-separated timesteps to probe."),
        layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated layers to probe [default: every layer of the backbone]."),
        size: int = typer.Option(64, "--size", help="Crop size in pixels fed to the UNet (as in `uld features`)."),
        crop_margin: float = typer.Option(DEFAULT_CROP_MARGIN, "--crop-margin", help="Margin around the object box, as a fraction of its size (as in `uld features`)."),
        reduce_channels: Optional[int] = typer.Option(None, "--reduce-channels", help="Project each layer to this many channels (as in `uld features`)."),
        store: Optional[str] = typer.Option(None, "--store", help="Probe this feature store (a folder or an fsspec URL) instead of finding (or extracting) it from the options."),
        n_images: int = typer.Option(100, "--n-images", min=2, help="Validation subset: this many train images (BLAKE2b of id and --seed; never test images)."),
        n_pairs: int = typer.Option(200, "--n-pairs", min=1, help="Random ordered image pairs (A -> B) of the subset."),
        alpha: float = typer.Option(0.1, "--alpha", help="A transfer is correct within alpha x the object size of B."),
        object_size: str = typer.Option("max_side", "--object-size", help="max_side | sqrt_area of B's ground-truth landmark box (crop pixels)."),
        stride: int = typer.Option(1, "--stride", min=1, help="Search B's crop on a grid of this stride (1 = every pixel)."),
        zeroshot: bool = typer.Option(True, "--zeroshot/--no-zeroshot", help="Also run ZeroShot on the best combinations and the default spec (slower)."),
        zeroshot_top: int = typer.Option(3, "--zeroshot-top", min=1, help="How many best combinations ZeroShot checks."),
        k: int = typer.Option(10, "-k", "--k", help="ZeroShot landmarks K."),
        zeroshot_train_images: Optional[int] = typer.Option(None, "--zeroshot-train-images", help="Fit ZeroShot and its regressors on a seeded subset of this many remaining train images [default: all]."),
        n_regressor_images: int = typer.Option(300, "--n-regressor-images", help="Images per NME regressor fit (0 = all)."),
        repeats: int = typer.Option(5, "--repeats", help="NME regressor fits on different random subsets, averaged."),
        write_default: bool = typer.Option(False, "--write-default", help="Store the best layers x timesteps in the backbone's uld_backbone.json (DDPM folders; not the shipped one)."),
        default_dir: Optional[Path] = typer.Option(None, "--default-dir", help="Store the best spec in this backbone folder (implies --write-default; the only way to change the shipped backbone's defaults)."),
        top: int = typer.Option(10, "--top", help="Rows of the printed table."),
    ) -> None:
        """Transfer PCK of hyperfeatures (DIFT-style keypoint transfer): which layers and timesteps carry correspondence.

        For random pairs (A, B) of a fixed validation subset of train images, each visible
        ground-truth landmark of A is matched to the most similar pixel of B (cosine of the
        ZeroShot descriptors); correct when within alpha x the object size of B. Scores every
        layer@t key and combinations (all keys, per layer, per timestep, best 2 / 3), then runs
        ZeroShot (fitted on the other train images) on the best ones. Reuses the feature store
        (or extracts it), writes probes/<dataset>/<backbone>/<store>/probe.parquet and
        probe.png, and prints the best combinations.
        """
        from flows.cli import settings
        from flows.cli_options import feature_spec
        from flows.features import check_manifests
        from flows.probe import probe, summary_table
        from pipeline.settings import resolve_device

        s = settings(ctx)
        if store is None:
            check_manifests(s.home, dataset, s.data_root)  # one clear line before Prefect starts
        spec = feature_spec(size, timesteps, layers, crop_margin, reduce_channels, s.seed)
        out = probe(
            dataset, backbone, spec, home=s.home, device=resolve_device(s.device), all_layers=layers is None, store_path=store,
            n_images=n_images, n_pairs=n_pairs, alpha=alpha, object_size=object_size, stride=stride, seed=s.seed,
            zeroshot=zeroshot, zeroshot_top=zeroshot_top, k=k, zeroshot_train_images=zeroshot_train_images,
            n_regressor_images=n_regressor_images or None, repeats=repeats, write_default=write_default, default_dir=default_dir,
        )
        typer.echo(summary_table(out, top))
        typer.echo(f"table:  {out['table']}\nfigure: {out['figure']}")
        if out["written"] is not None:
            typer.echo(f"defaults written: {out['written']} <- {'+'.join(out['written_keys'])}")
            typer.echo("note: stores extracted earlier for this backbone without --layers used the old default layers; "
                       "a stage that meets one reports the mismatch and asks to rebuild it.")

    app.add_typer(sub)
