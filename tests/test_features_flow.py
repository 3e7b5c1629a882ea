"""The `uld features` flow: resume after a crash equals an uninterrupted run bit for bit,
no-op re-runs, config changes, mismatching stores, unreadable images, the CLI.

The backbone is a real (tiny, randomly initialised) diffusers UNet2DModel behind
the DiffusionBackbone contract; images are PNGs the test writes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.backbones.base import DiffusionBackbone, FeatureSpec, feature_key, weights_hash
from pipeline.datasets.base import DatasetMeta, Manifest, manifest_row
from pipeline.errors import DatasetError, StoreError
from storage.features import FeatureStore
from storage.layout import Workspace

torch.set_num_threads(1)

N_TRAIN, N_TEST, SHARD = 7, 3, 4  # 10 images, 3 shards (last one partial)


class TinyUNetBackbone(DiffusionBackbone):
    """A real 2-level diffusers UNet2DModel; features = up-block ResNet outputs via forward hooks."""

    name = "tiny"

    def __init__(self, seed: int = 0) -> None:
        from diffusers import DDPMScheduler, UNet2DModel

        torch.manual_seed(seed)
        self.unet = UNet2DModel(
            sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
        ).eval().requires_grad_(False)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)

    def layer_names(self) -> list[str]:
        return [f"up{i}.res{j}" for i, b in enumerate(self.unet.up_blocks) for j in range(len(b.resnets))]

    def default_layers(self) -> list[str]:
        return ["up0.res1", "up1.res1"]

    def identity(self) -> dict:
        return {"kind": "tiny-test-unet", "weights": weights_hash(self.unet)}

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def feature_shapes(self, image_size: int, layers: list[str]) -> dict[str, tuple[int, int, int]]:
        feats = self.extract(torch.zeros(1, 3, image_size, image_size), [0], layers)
        return {layer: tuple(feats[feature_key(layer, 0)].shape[1:]) for layer in layers}

    def extract(self, images, timesteps, layers, generator=None):
        captured: dict[str, torch.Tensor] = {}
        hooks = []
        for layer in layers:
            up, res = layer.split(".")
            i, j = int(up.removeprefix("up")), int(res.removeprefix("res"))
            module = self.unet.up_blocks[i].resnets[j]
            hooks.append(module.register_forward_hook(lambda _m, _i, out, layer=layer: captured.__setitem__(layer, out)))
        gen = generator or torch.Generator().manual_seed(0)
        noise = torch.randn(images.shape, generator=gen)
        out = {}
        try:
            for t in timesteps:
                tt = torch.full((images.shape[0],), int(t), dtype=torch.long)
                with torch.no_grad():
                    self.unet(self.scheduler.add_noise(images, noise, tt), tt)
                for layer in layers:
                    out[feature_key(layer, t)] = captured[layer].clone()
        finally:
            for h in hooks:
                h.remove()
        return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Images + a function writing the train/test manifests of dataset ``toy`` into a workspace."""
    root = tmp_path_factory.mktemp("toy-images")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_TRAIN + N_TEST):
        w, h = 28 + i, 24
        path = root / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        lm = np.array([[6.0 + i % 3, 8.0], [18.0, 9.0 + i % 2]], np.float32)
        split = "train" if i < N_TRAIN else "test"
        rows.append(manifest_row(f"img_{i:02d}", split, str(path), w, h, lm, bbox=(4.0, 5.0, 20.0, 19.0)))
    meta = DatasetMeta(name="toy", landmark_names=("a", "b"))
    import pandas as pd

    frame = pd.DataFrame(rows)

    def write(home: Path) -> Workspace:
        ws = Workspace(home)
        for split in ("train", "test"):
            Manifest(frame[frame["split"] == split].reset_index(drop=True), meta).save(ws.manifest("toy", split))
        return ws

    return {"root": root, "write": write, "paths": [Path(p) for p in frame["path"]]}


SPEC = FeatureSpec(image_size=16, timesteps=(50, 150), crop_margin=0.1, noise_seed=3)


def _all(store: FeatureStore) -> dict[str, np.ndarray]:
    return store.read(0, len(store))


def _files(path: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


def test_resume_after_crash_equals_uninterrupted_run(prefect_harness, toy, tmp_path):
    from flows.features import complete_store_path, extract_features, open_features

    backbone = TinyUNetBackbone()
    # Uninterrupted reference run.
    ref_home = tmp_path / "ref"
    toy["write"](ref_home)
    ref_path = extract_features("toy", backbone, SPEC, home=ref_home, batch_size=3, shard_size=SHARD)
    ref = FeatureStore.open(ref_path)
    assert len(ref) == 10 and ref.n_shards() == 3 and ref.is_complete()
    assert ref.keys == sorted(feature_key(l, t) for l in ("up0.res1", "up1.res1") for t in (50, 150))
    assert ref.shapes["up0.res1@t50"] == (16, 8, 8) and ref.shapes["up1.res1@t150"] == (8, 16, 16)
    assert list(ref.splits) == ["train"] * 7 + ["test"] * 3
    assert ref.config["spec"] == json.loads(json.dumps(SPEC.to_json())) and ref.config["backbone"] == backbone.identity()
    # Crop boxes: square, centred on the object box (4,5)-(20,19), margin included.
    b = ref.crop_boxes[0]
    assert b[2] - b[0] == pytest.approx(b[3] - b[1]) and b[2] - b[0] > 16
    ref_feats = _all(ref)
    assert all(np.abs(v).max() > 0 for v in ref_feats.values())

    # Crash: image 9 (in the last shard) is unreadable; the flow stops naming it.
    home = tmp_path / "crash"
    toy["write"](home)
    bad = toy["paths"][9]
    good_bytes = bad.read_bytes()
    try:
        bad.write_bytes(b"not a png")
        with pytest.raises(DatasetError) as err:
            extract_features("toy", backbone, SPEC, home=home, batch_size=3, shard_size=SHARD)
        assert str(bad) in str(err.value)
    finally:
        bad.write_bytes(good_bytes)
    crashed_path = Workspace(home).feature_store("toy", "tiny", ref_path.name)
    part = FeatureStore.open(crashed_path, require_complete=False)
    assert part.missing_shards() == [2]
    with pytest.raises(StoreError, match="incomplete"):
        FeatureStore.open(crashed_path)
    with pytest.raises(StoreError, match="unfinished"):
        open_features(home, "toy", backbone, SPEC)

    assert complete_store_path("toy", backbone, SPEC, home=home) is None  # work left: the CLI starts the flow
    # Resume with another --batch-size: the store's recorded batch size is used.
    t0 = time.perf_counter()
    path = extract_features("toy", backbone, SPEC, home=home, batch_size=5, shard_size=SHARD)
    assert path == crashed_path
    resumed = FeatureStore.open(path)
    feats = _all(resumed)
    for k in ref.keys:
        assert np.array_equal(feats[k].view(np.uint16), ref_feats[k].view(np.uint16)), k  # bit for bit
    assert np.array_equal(resumed.image_ids, ref.image_ids) and np.array_equal(resumed.crop_boxes, ref.crop_boxes)
    assert resumed.valid.all()

    # No-op re-run: nothing on disk changes.
    before = _files(path)
    t0 = time.perf_counter()
    assert extract_features("toy", backbone, SPEC, home=home, batch_size=3, shard_size=SHARD) == path
    noop_s = time.perf_counter() - t0
    assert _files(path) == before
    print(f"no-op re-run: {noop_s:.2f} s")

    assert complete_store_path("toy", backbone, SPEC, home=home) == path  # the CLI's no-flow fast path
    # open_features finds the complete store.
    assert open_features(home, "toy", backbone, SPEC).path == path


def test_other_config_new_store_mismatch_skip_bad_and_errors(prefect_harness, toy, tmp_path):
    from flows.features import extract_features, open_features

    backbone = TinyUNetBackbone()
    home = tmp_path / "ws"
    toy["write"](home)
    spec1 = FeatureSpec(image_size=16, timesteps=(50,), layers=("up1.res1",), reduce_channels=3)
    p1 = extract_features("toy", backbone, spec1, home=home, batch_size=4, shard_size=SHARD)
    st = FeatureStore.open(p1)
    assert st.keys == ["up1.res1@t50"] and st.shapes["up1.res1@t50"] == (3, 16, 16)
    assert st.projection("up1.res1").shape == (3, 8)
    spec2 = FeatureSpec(image_size=16, timesteps=(150,), layers=("up1.res1",))
    p2 = extract_features("toy", backbone, spec2, home=home, batch_size=4, shard_size=SHARD)
    assert p1 != p2 and p1.parent == p2.parent
    with pytest.raises(StoreError, match="no features cached") as err:
        open_features(home, "toy", backbone, FeatureSpec(image_size=16, timesteps=(7,)))
    assert "uld --home" in err.value.fix and "features --dataset toy --backbone tiny" in err.value.fix

    # A store whose attrs no longer match its name is refused, not silently reused.
    meta_path = p2 / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["config"]["layers"] = ["up0.res1"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="different configuration .*layers"):
        extract_features("toy", backbone, spec2, home=home, batch_size=4, shard_size=SHARD)

    # --skip-bad: the unreadable image gets zeros, valid=False and a recorded reason.
    bad = toy["paths"][2]
    good_bytes = bad.read_bytes()
    try:
        bad.write_bytes(b"")
        p3 = extract_features("toy", backbone, FeatureSpec(image_size=16, timesteps=(10,), layers=("up0.res1",)),
                              home=home, batch_size=4, shard_size=SHARD, skip_bad=True)
    finally:
        bad.write_bytes(good_bytes)
    st3 = FeatureStore.open(p3)
    assert list(np.flatnonzero(~st3.valid)) == [2]
    assert "img_02" in st3.skipped and str(bad) in st3.skipped["img_02"]
    assert 2 not in st3.indices("train") and len(st3.indices("train")) == N_TRAIN - 1
    assert not _all(st3)["up0.res1@t10"][2].any() and _all(st3)["up0.res1@t10"][3].any()

    # Missing manifests: the error names the command that builds them.
    with pytest.raises(DatasetError) as err:
        extract_features("ls3d", backbone, SPEC, home=home, data_root=tmp_path / "data")
    assert "datasets manifest ls3d --root" in err.value.fix and str(tmp_path / "data" / "ls3d") in err.value.fix


def test_cli_help_and_missing_manifest(prefect_harness, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from flows import cli_features

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    cli_features.register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["features", "--help"])
    assert res.exit_code == 0
    for opt in ("--dataset", "--backbone", "--timesteps", "--layers", "--size", "--batch-size", "--shard-size", "--reduce-channels"):
        assert opt in res.output
    monkeypatch.setenv("ULD_HOME", str(tmp_path / "ws"))
    res = runner.invoke(app, ["features", "--dataset", "mtfl", "--timesteps", "50,150"])
    assert isinstance(res.exception, DatasetError)
    assert "datasets manifest mtfl" in res.exception.fix
    res = runner.invoke(app, ["features", "--dataset", "mtfl", "--timesteps", "a,b"])
    assert "comma-separated integers" in str(res.exception)


def _features_cli(home: Path, *args: str):
    import typer
    from typer.testing import CliRunner

    from flows import cli, cli_features

    app = typer.Typer()
    app.callback()(cli._main)  # the real global options
    cli_features.register(app)
    return CliRunner().invoke(app, ["--home", str(home), "features", *args])


def test_deleted_shard_file_is_refused_listed_by_verify_locked_and_repaired_bit_identically(prefect_harness, toy, tmp_path):
    """A shard file deleted from a finished store: readers refuse it by name, `--verify` lists it,
    a second writer is locked out, and re-running `uld features` re-extracts exactly those bytes."""
    from flows.features import complete_store_path, open_features
    from pipeline.backbones.ddpm import CategoryDDPM
    from pipeline.errors import BusyError
    from storage.locks import WriterLock

    torch.manual_seed(0)
    bdir = tmp_path / "tinyddpm"
    CategoryDDPM.create(image_size=16, name="tinyddpm", block_out_channels=(8, 8, 16, 16), attention_head_dim=8,
                        norm_num_groups=4).save_pretrained(bdir)
    home = tmp_path / "ws"
    toy["write"](home)
    opts = ["--dataset", "toy", "--backbone", str(bdir), "--size", "16", "--timesteps", "50", "--shard-size", str(SHARD), "--batch-size", "3"]
    res = _features_cli(home, *opts)
    assert res.exit_code == 0, res.output
    (path,) = (home / "features" / "toy" / "tinyddpm.zarr").glob("[!.]*")
    store = FeatureStore.open(path)
    assert store.n_shards() == 3 and store.verify() == []
    reference = _all(store)
    key = store.keys[0]
    victim = path / "features" / key / "c" / "1" / "0" / "0" / "0"
    original = victim.read_bytes()
    victim.unlink()

    # Readers: a StoreError naming the array, the image range and the file, with the command to run.
    with pytest.raises(StoreError, match="damaged") as err:
        FeatureStore.open(path)
    assert f"features/{key} images 4:8 (shard 1)" in str(err.value) and str(victim) in str(err.value)
    backbone = CategoryDDPM.from_pretrained(bdir, name="tinyddpm")
    spec = FeatureSpec(image_size=16, timesteps=(50,), noise_seed=0)
    with pytest.raises(StoreError, match="damaged") as err:
        open_features(home, "toy", backbone, spec)
    assert "features --dataset toy --backbone tinyddpm" in err.value.fix
    assert complete_store_path("toy", backbone, spec, home=home) is None  # not "nothing to do"

    res = _features_cli(home, *opts, "--verify")
    assert isinstance(res.exception, StoreError) and "1 problem(s)" in str(res.exception)
    assert f"features/{key} images 4:8 (shard 1): shard file missing" in res.output

    # One writer per store: while another holder has the lock, extraction refuses to start.
    with WriterLock(path, "feature store"):
        res = _features_cli(home, *opts)
    assert isinstance(res.exception, BusyError)
    assert f"another uld process is writing {path} (pid {os.getpid()})" in str(res.exception)

    others = {p: p.stat().st_mtime_ns for p in (path / "features").rglob("c/[02]/0/0/0")}  # shards 0 and 2
    assert len(others) == 2 * len(store.keys)
    res = _features_cli(home, *opts)
    assert res.exit_code == 0, res.output
    assert victim.read_bytes() == original  # the same bytes as the first extraction
    assert {p: p.stat().st_mtime_ns for p in others} == others  # the other shards were not rewritten
    repaired = _all(FeatureStore.open(path))
    for k in reference:
        assert np.array_equal(repaired[k].view(np.uint16), reference[k].view(np.uint16)), k
    res = _features_cli(home, *opts, "--verify", "--deep")
    assert res.exit_code == 0 and "verified:   complete" in res.output, res.output


def test_a_split_without_one_readable_image_is_an_error_not_a_store(prefect_harness, toy, tmp_path):
    from flows.features import extract_features

    home = tmp_path / "ws"
    toy["write"](home)
    test_images = toy["paths"][N_TRAIN:]
    saved = [p.read_bytes() for p in test_images]
    try:
        for p in test_images:
            p.write_bytes(b"")
        with pytest.raises(DatasetError, match=f"none of the {N_TEST} test images could be read") as err:
            extract_features("toy", TinyUNetBackbone(), SPEC, home=home, batch_size=4, shard_size=SHARD, skip_bad=True)
    finally:
        for p, b in zip(test_images, saved):
            p.write_bytes(b)
    assert "img_07" in str(err.value) and "delete the store folder" in err.value.fix
