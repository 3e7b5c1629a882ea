"""A tiny workspace with one ZeroShot and one D-ULD run, built once per test session.

Synthetic heads (24 train / 8 test, 32 px), a small random-init DDPM saved as a
backbone folder, its features (batches of 16: the last batch holds the 8 last
train and the 8 test images, so reproducing it needs the batch mates), then
``zeroshot-tiny`` and ``duld-tiny`` (one self-training round, a few steps).
Used by tests/test_predict.py and tests/test_readme.py; ~1-4 minutes on a busy 2-core CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

N_TRAIN, N_TEST, SIZE, K = 24, 8, 32, 4
ZEROSHOT_RUN, DULD_RUN = "zeroshot-tiny", "duld-tiny"

_BUILT: dict[str, "TinyRuns"] = {}


@dataclass(frozen=True)
class TinyRuns:
    home: Path  # .../workspace: its parent is the directory to run README code from
    backbone: str  # the DDPM folder (outside the workspace)
    store: Path


def make_backbone(path: Path, seed: int = 0) -> str:
    """A small random-init DDPM folder (``seed`` changes its weights, hence its identity)."""
    import torch

    from pipeline.backbones.ddpm import CategoryDDPM

    torch.manual_seed(seed)
    model = CategoryDDPM.create(image_size=SIZE, name=path.name, block_out_channels=(8, 8, 16, 16), attention_head_dim=8, norm_num_groups=4)
    model.save_pretrained(path)
    return str(path)


def invoke_cli(home: Path, register: Callable[[Any], None], *args: str):
    """Run one command group (``register`` of a flows.cli_* module) under the real root options."""
    import typer
    from typer.testing import CliRunner

    from flows import cli

    app = typer.Typer()
    app.callback()(cli._main)
    register(app)
    return CliRunner().invoke(app, ["--home", str(home), *args])


def tiny_runs(tmp_path_factory) -> TinyRuns:
    """Build (once per session) and return the tiny workspace; needs the Prefect test harness."""
    if "runs" in _BUILT:
        return _BUILT["runs"]
    from flows.duld import duld
    from flows.features import extract_features
    from flows.zeroshot import zeroshot
    from pipeline.backbones.base import FeatureSpec
    from pipeline.datasets.registry import get_loader
    from pipeline.datasets.synthetic import generate_synthetic
    from storage.layout import Workspace

    base = tmp_path_factory.mktemp("tiny-runs")
    home = base / "workspace"
    ws = Workspace(home)
    root = generate_synthetic(ws.generated_dataset("synthetic"), N_TRAIN, N_TEST, SIZE, 0)
    for split in ("train", "test"):
        manifest, _ = get_loader("synthetic").load(root, split)
        manifest.save(ws.manifest("synthetic", split))
    backbone = make_backbone(base / "tinyddpm")
    spec = FeatureSpec(image_size=SIZE)
    store = extract_features("synthetic", backbone, spec, home=home, batch_size=16)
    zeroshot("synthetic", backbone, spec, k=K, n_samples_per_image=50, home=home, run_id=ZEROSHOT_RUN, store_path=store,
             n_init=1, max_iter=10, silhouette_sample=500)
    # views=None: the feature-warp shortcut (no view store to extract): training quality is not the point here.
    duld("synthetic", backbone, spec, k=K, rounds=1, steps_per_round=2, bootstrap_steps=2, batch_size=6, home=home,
         run_id=DULD_RUN, progress=False, views=None, store_path=store, threads=1)
    _BUILT["runs"] = TinyRuns(home, backbone, Path(store))
    return _BUILT["runs"]
