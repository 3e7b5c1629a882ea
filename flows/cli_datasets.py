"""``uld datasets ...``: list loaders, build manifests, draw contact sheets, generate synthetic data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer

from flows.cli import settings
from pipeline.datasets.crop import DEFAULT_CROP_MARGIN
from pipeline.errors import ConfigError
from storage.layout import Workspace

HELP = (
    "Datasets: read real on-disk layouts into manifests (one Parquet table per split under "
    "<home>/manifests/<dataset>/), inspect them, and generate the synthetic dataset."
)


def _print_counts(home: Path, dataset: str, paths: dict[str, Path]) -> None:
    from flows.datasets import load_manifest
    from storage.tables import read_table

    for split in paths:
        typer.echo(f"  {split:5s} {len(load_manifest(home, dataset, split)):7d} images  -> {paths[split]}")
    skipped = Workspace(home).skipped(dataset)
    n_skipped = len(read_table(skipped, "skipped")) if skipped.exists() else 0
    typer.echo(f"  skipped {n_skipped}" + (f"  (reasons: {skipped})" if n_skipped else ""))


def register(app: typer.Typer) -> None:
    """Add the ``datasets`` command group to ``app``."""
    sub = typer.Typer(name="datasets", help=HELP, no_args_is_help=True)

    @sub.command("list")
    def list_() -> None:
        """List the known datasets with their landmarks and the folder layout each one expects."""
        from pipeline.datasets.registry import available, get_loader
        from pipeline.errors import ULDError

        for name in available():
            try:
                loader = get_loader(name)
            except (ImportError, ULDError) as exc:  # one missing optional module must not hide the rest
                typer.echo(f"{name}\n    (unavailable: {exc})")
                continue
            meta = loader.meta
            typer.echo(f"{name}: {loader.description}")
            names = list(meta.landmark_names)
            shown = ", ".join(names if len(names) <= 12 else names[:6] + ["..."] + names[-2:])
            typer.echo(f"    landmarks ({meta.n_landmarks}): {shown or '-'}")
            typer.echo(f"    splits: {', '.join(meta.splits)}; normalisation: {meta.normalisation}"
                       + (f" {meta.norm_points}" if meta.normalisation == 'interocular' else ""))
            typer.echo(f"    layout: {loader.expected_layout}")

    @sub.command("manifest")
    def manifest(
        ctx: typer.Context,
        dataset: Optional[str] = typer.Argument(None, help="Dataset name (see `uld datasets list`)."),
        dataset_opt: Optional[str] = typer.Option(None, "--dataset", help="Same as the DATASET argument."),
        root: Optional[Path] = typer.Option(
            None, "--root", help="Folder holding the dataset in its release layout (default: <data-root>/<dataset>; "
            "synthetic: <home>/datasets/synthetic)."),
        skip_bad: bool = typer.Option(
            False, "--skip-bad", help="Leave out unreadable images and malformed annotations instead of stopping; "
            "each is listed with its reason in <home>/manifests/<dataset>/skipped.parquet."),
    ) -> None:
        """Read DATASET from --root and write its manifests (one per split); prints counts per split."""
        from flows.datasets import build_manifests, default_root

        name = dataset or dataset_opt
        if not name:
            raise ConfigError("no dataset given", where="DATASET", fix="e.g. `uld datasets manifest mtfl --root data/mtfl`")
        from pipeline.datasets.registry import get_loader

        cfg = settings(ctx)
        folder = root if root is not None else default_root(name, cfg.home, cfg.data_root)
        # Fail on an unknown name or absent folder before the flow starts its Prefect server.
        get_loader(name).check_root(folder)
        paths = build_manifests(name, folder, cfg.home, skip_bad)
        typer.echo(f"{name} (from {folder}):")
        _print_counts(cfg.home, name, paths)

    @sub.command("show")
    def show(
        ctx: typer.Context,
        dataset: str = typer.Argument(..., help="Dataset whose manifest to draw (build it with `uld datasets manifest`)."),
        split: str = typer.Option("test", "--split", help="Split to draw."),
        n: int = typer.Option(32, "--n", min=1, max=512, help="Number of images (spread evenly over the split)."),
        size: int = typer.Option(64, "--size", min=8, max=1024, help="Crop size in pixels."),
        margin: float = typer.Option(DEFAULT_CROP_MARGIN, "--crop-margin", "--margin", help="Crop margin: fraction of the object box added on each side; the default is the features' (what the methods see)."),
        cols: int = typer.Option(8, "--cols", min=1, help="Images per row."),
        out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default: <home>/manifests/<dataset>/<split>_sheet.png)."),
    ) -> None:
        """Draw a contact sheet of crops with the ground-truth landmarks; prints the PNG path."""
        from flows.datasets import load_manifest
        from pipeline.datasets.crop import load_crops, to_crop
        from pipeline.datasets.show import contact_sheet

        cfg = settings(ctx)
        m = load_manifest(cfg.home, dataset, split)
        if len(m) == 0:
            raise ConfigError(f"{dataset}/{split} has no images", where=split, fix="pick another --split")
        idx = np.unique(np.linspace(0, len(m) - 1, min(n, len(m))).round().astype(int))
        images, boxes = load_crops(m, size, margin, idx)
        points = to_crop(m.landmarks()[idx], boxes, size) if m.meta.n_landmarks else None
        visible = m.visible()[idx] if m.meta.n_landmarks else None
        path = out if out is not None else Workspace(cfg.home).manifest_dir(dataset) / f"{split}_sheet.png"
        contact_sheet(images, points, visible, list(m.meta.landmark_names), path,
                      title=f"{dataset} / {split}: {len(idx)} of {len(m)} images, {size}px crops", cols=cols)
        typer.echo(str(path))

    @sub.command("generate")
    def generate(
        ctx: typer.Context,
        name: str = typer.Argument(..., help="What to generate; only 'synthetic' exists."),
        n_train: int = typer.Option(2000, "--n-train", min=1, help="Training images."),
        n_test: int = typer.Option(500, "--n-test", min=1, help="Test images."),
        size: int = typer.Option(128, "--size", min=16, help="Image side in pixels."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Generator seed (default: the global --seed)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: <home>/datasets/synthetic)."),
    ) -> None:
        """Render the synthetic head dataset (known landmarks and yaw), then build its manifests."""
        from flows.datasets import build_manifests, load_manifest

        if name != "synthetic":
            raise ConfigError(f"cannot generate {name!r}", where="NAME", fix="only `uld datasets generate synthetic` exists")
        from pipeline.datasets.synthetic import generate_synthetic

        cfg = settings(ctx)
        folder = out if out is not None else Workspace(cfg.home).generated_dataset("synthetic")
        generate_synthetic(Path(folder), n_train, n_test, size, cfg.seed if seed is None else seed)
        paths = build_manifests("synthetic", Path(folder), cfg.home, False)
        typer.echo(f"synthetic dataset in {folder}:")
        _print_counts(cfg.home, "synthetic", paths)
        frames = [load_manifest(cfg.home, "synthetic", s) for s in paths]
        yaw = np.concatenate([f.frame["yaw"].to_numpy(float) for f in frames])
        typer.echo(f"  landmarks ({frames[0].meta.n_landmarks}): {', '.join(frames[0].meta.landmark_names)}")
        if np.isfinite(yaw).any():
            typer.echo(f"  yaw range: {np.nanmin(yaw):.1f} .. {np.nanmax(yaw):.1f} degrees")

    app.add_typer(sub, name="datasets")
