"""Contact sheets are real PNGs of the expected grid with legend."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets.show import contact_sheet
from pipeline.errors import ConfigError


def test_contact_sheet_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8)
    pts = rng.uniform(0, 32, (10, 3, 2))
    pts[0, 1] = np.nan
    visible = np.ones((10, 3), bool)
    visible[2, 0] = False
    out = contact_sheet(images, pts, visible, ["a", "b", "c"], tmp_path / "s" / "sheet.png", "title", cols=4)
    with Image.open(out) as im:
        w, h = im.size
        assert im.format == "PNG" and w == 4 * 160 and h > 3 * 160
    plain = contact_sheet(images[:3], None, None, [], tmp_path / "plain.png", "no landmarks")
    assert plain.is_file()
    with pytest.raises(ConfigError):
        contact_sheet(images, pts[:, :2], None, ["a", "b", "c"], tmp_path / "bad.png", "x")


def test_show_crops_with_the_features_margin():
    """One crop rule: `uld datasets show` draws crops with the margin the features (and methods) use."""
    import typer

    from flows import cli_datasets
    from pipeline.backbones.base import FeatureSpec
    from pipeline.datasets.crop import DEFAULT_CROP_MARGIN

    app = typer.Typer()
    cli_datasets.register(app)
    group = typer.main.get_command(app)
    show = group.commands["datasets"].commands["show"] if "datasets" in getattr(group, "commands", {}) else group.commands["show"]
    margin = next(p for p in show.params if p.name == "margin")
    assert margin.default == DEFAULT_CROP_MARGIN == FeatureSpec().crop_margin
    assert "--crop-margin" in margin.opts and "--margin" in margin.opts
