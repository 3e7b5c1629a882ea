"""DDPM training: it learns, it resumes bit for bit, it refuses to mix runs; the flow and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.backbones.ddpm import CategoryDDPM
from pipeline.backbones.training import TrainConfig, list_checkpoints, train_ddpm
from pipeline.errors import ConfigError, DatasetError

torch.set_num_threads(1)

TINY = {
    "block_out_channels": (8, 8, 16),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 4,
    "attention_head_dim": 8,
}


def tiny_model(seed: int = 0, size: int = 16) -> CategoryDDPM:
    torch.manual_seed(seed)
    return CategoryDDPM.create(image_size=size, **TINY)


def blobs(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """Structured uint8 images (a bright disc on a dark background) a DDPM can learn fast."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        cx, cy = rng.uniform(size * 0.3, size * 0.7, 2)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < (size / 4) ** 2
        out[i][disc] = (230, 180, 120)
        out[i][~disc] = (20, 30, 40)
    return out


def eval_loss(model: CategoryDDPM, crops: np.ndarray) -> float:
    """Epsilon MSE on a fixed set of (image, t, noise)."""
    g = torch.Generator().manual_seed(123)
    x0 = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    x0 = x0.repeat(4, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (len(x0),), generator=g)
    with torch.no_grad():
        pred = model.unet(model.scheduler.add_noise(x0, noise, t), t).sample
    return float(torch.nn.functional.mse_loss(pred, noise))


def state(model: CategoryDDPM) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.unet.state_dict().items()}


def test_training_reduces_the_loss():
    crops = blobs(16)
    model = tiny_model()
    before = eval_loss(model, crops)
    result = train_ddpm(model, crops, TrainConfig(steps=60, batch_size=16, lr=2e-3, warmup_steps=5), progress=False)
    after = eval_loss(model, crops)  # model.unet now holds the EMA weights
    assert result.steps == 60 and len(result.losses) == 60 and result.resumed_from is None
    assert after < 0.6 * before, (before, after)
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:10])


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_is_bit_identical(tmp_path):
    crops = blobs(8)
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=2)
    ref = tiny_model()
    ref_result = train_ddpm(ref, crops, cfg, checkpoint_dir=tmp_path / "ref", progress=False)

    def crash_at_5(step: int, loss: float) -> None:
        if step == 5:
            raise Crash("killed")

    with pytest.raises(Crash):
        train_ddpm(tiny_model(), crops, cfg, checkpoint_dir=tmp_path / "run", on_step=crash_at_5, progress=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 4]  # keep_checkpoints=2
    # a new process: fresh model object (its init is overwritten by the checkpoint)
    resumed = tiny_model(seed=99)
    result = train_ddpm(resumed, crops, cfg, checkpoint_dir=tmp_path / "run", progress=False)
    assert result.resumed_from == 4 and result.steps == 6
    assert result.total_wall_seconds is not None and result.total_wall_seconds > result.wall_seconds
    assert result.losses == ref_result.losses
    # both calls are reported: the crashed one up to its last checkpoint, then the resume
    assert [(g["from_step"], g["to_step"], g["steps_target"]) for g in result.segments] == [(0, 4, 6), (4, 6, 6)]
    a, b = state(ref), state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_extending_a_finished_run_equals_a_longer_run(tmp_path):
    crops = blobs(8)
    short = TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=10)
    longer = TrainConfig(steps=5, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=10)
    ref = tiny_model()
    train_ddpm(ref, crops, longer, progress=False)
    train_ddpm(tiny_model(), crops, short, checkpoint_dir=tmp_path / "c", progress=False)
    ext = tiny_model()
    result = train_ddpm(ext, crops, longer, checkpoint_dir=tmp_path / "c", progress=False)
    assert result.resumed_from == 3
    assert [(g["from_step"], g["to_step"], g["steps_target"], g["checkpoint_every"]) for g in result.segments] == [(0, 3, 3, 10), (3, 5, 5, 10)]
    a, b = state(ref), state(ext)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # re-running a finished run is a no-op that restores the same weights
    again = tiny_model(seed=5)
    r2 = train_ddpm(again, crops, longer, checkpoint_dir=tmp_path / "c", progress=False)
    assert r2.resumed_from == 5 and r2.losses == result.losses
    assert all(torch.equal(a[k], v) for k, v in state(again).items())


def test_resume_refuses_other_settings_or_data(tmp_path):
    crops = blobs(8)
    cfg = TrainConfig(steps=2, batch_size=4, checkpoint_every=1)
    train_ddpm(tiny_model(), crops, cfg, checkpoint_dir=tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="settings differ"):
        train_ddpm(tiny_model(), crops, TrainConfig(steps=4, batch_size=4, lr=1e-3), checkpoint_dir=tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="training images differ"):
        train_ddpm(tiny_model(), blobs(8, seed=1), TrainConfig(steps=4, batch_size=4), checkpoint_dir=tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="beyond the requested"):
        train_ddpm(tiny_model(), crops, TrainConfig(steps=1, batch_size=4), checkpoint_dir=tmp_path / "c", progress=False)
    with pytest.raises(DatasetError, match="uint8"):
        train_ddpm(tiny_model(), crops.astype(np.float32), cfg, progress=False)
    with pytest.raises(DatasetError, match=r"\(N, 16, 16, 3\)"):
        train_ddpm(tiny_model(), blobs(4, size=32), cfg, progress=False)
    with pytest.raises(ConfigError, match="steps"):
        train_ddpm(tiny_model(), crops, TrainConfig(steps=0), progress=False)


class _Planted:
    """Unpickling this runs a shell command (what a planted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_checkpoint_is_refused_not_run(tmp_path):
    crops = blobs(8)
    cfg = TrainConfig(steps=2, batch_size=4, checkpoint_every=2)
    train_ddpm(tiny_model(), crops, cfg, checkpoint_dir=tmp_path / "c", progress=False)
    (ckpt,) = [p for _, p in list_checkpoints(tmp_path / "c")]
    assert not any(f.suffix in (".pt", ".pkl") for f in ckpt.iterdir())  # the format has no pickle
    # An attacker replaces the state by an old-format pickle that runs code when loaded.
    marker = tmp_path / "pwned"
    for f in ("state.json", "state.safetensors"):
        (ckpt / f).unlink()
    torch.save({"step": _Planted(marker)}, ckpt / "state.pt")
    with pytest.raises(ConfigError, match="refusing to load"):
        train_ddpm(tiny_model(), crops, TrainConfig(steps=4, batch_size=4, checkpoint_every=2), checkpoint_dir=tmp_path / "c", progress=False)
    assert not marker.exists()


def test_legacy_checkpoint_of_plain_tensors_still_resumes(tmp_path):
    from pipeline.backbones.training import read_checkpoint_state

    crops = blobs(8)
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=2)
    ref = tiny_model()
    train_ddpm(ref, crops, cfg, progress=False)
    train_ddpm(tiny_model(), crops, TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=2),
               checkpoint_dir=tmp_path / "c", progress=False)
    (ckpt,) = [p for _, p in list_checkpoints(tmp_path / "c")]
    # rewrite it in the format of earlier versions (torch.save of plain containers)
    torch.save(read_checkpoint_state(ckpt), ckpt / "state.pt")
    (ckpt / "state.json").unlink()
    (ckpt / "state.safetensors").unlink()
    resumed = tiny_model(seed=3)
    assert train_ddpm(resumed, crops, cfg, checkpoint_dir=tmp_path / "c", progress=False).resumed_from == 2
    a, b = state(ref), state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _synthetic_workspace(workspace):
    from pipeline.datasets.registry import get_loader
    from pipeline.datasets.synthetic import generate_synthetic

    root = generate_synthetic(workspace.generated_dataset("synthetic"), 6, 2, 64, 0)
    for split in ("train", "test"):
        manifest, _ = get_loader("synthetic").load(root, split)
        manifest.save(workspace.manifest("synthetic", split))


def test_train_flow_and_cli(prefect_harness, workspace, tmp_path):
    from typer.testing import CliRunner

    from flows.backbone import train_backbone
    from flows.cli import _register_commands, app
    from pipeline.backbones.loading import load_backbone

    _synthetic_workspace(workspace)
    summary = train_backbone(
        dataset="synthetic", home=workspace.home, steps=3, batch_size=2, image_size=32,
        checkpoint_every=2, save_dtype="float16", out=tmp_path / "export", name="tiny",
    )
    target = workspace.backbone_dir("tiny")
    assert summary["steps"] == 3 and summary["n_images"] == 6
    for name in ("unet", "scheduler", "uld_backbone.json", "loss.png", "training_record.json", "checkpoints"):
        assert (target / name).exists(), name
    meta = json.loads((target / "uld_backbone.json").read_text())
    assert meta["training"]["dataset"] == "synthetic" and meta["training"]["steps"] == 3
    assert meta["weights_dtype"] == "float16"
    assert (tmp_path / "export" / "unet").is_dir() and not (tmp_path / "export" / "checkpoints").exists()
    model = load_backbone("tiny", home=workspace.home)
    assert model.image_size == 32 and model.default_layers() == ["up1.res1", "up2.res1"]

    _register_commands()
    runner = CliRunner()
    # re-running the finished run through the CLI resumes at the last step and re-exports
    res = runner.invoke(app, ["--home", str(workspace.home), "backbone", "train", "--dataset", "synthetic",
                              "--steps", "3", "--batch-size", "2", "--size", "32", "--checkpoint-every", "2",
                              "--name", "tiny", "--save-dtype", "float16"])
    assert res.exit_code == 0, res.output
    assert "steps:      3" in res.output
    res = runner.invoke(app, ["--home", str(workspace.home), "backbone", "info", "tiny", "--size", "32"])
    assert res.exit_code == 0, res.output
    assert "up2.res1" in res.output and "bytes/image: 32,768" in res.output  # (32*8*8 + 24*16*16) * 2 t * 2 B

    # extending the run: training_record.json reports both calls' settings, not only the last one's
    train_backbone(dataset="synthetic", home=workspace.home, steps=4, batch_size=2, image_size=32, checkpoint_every=2, name="tiny")
    record = json.loads((target / "training_record.json").read_text())
    assert [(g["from_step"], g["to_step"], g["steps_target"]) for g in record["segments"]] == [(0, 3, 3), (3, 4, 4)]
    assert all(g["device"] == "cpu" and g["machine"] for g in record["segments"]) and record["steps"] == 4


def test_warm_start_from_exported_weights(prefect_harness, workspace, tmp_path):
    """--init-from continues an exported backbone (no checkpoints), resumes, and never mixes starts."""
    from flows.backbone import train_backbone
    from pipeline.backbones.loading import load_backbone
    from pipeline.backbones.training import weights_fingerprint

    _synthetic_workspace(workspace)
    common = dict(dataset="synthetic", home=workspace.home, batch_size=2, image_size=32, checkpoint_every=2)
    train_backbone(steps=2, name="first", out=tmp_path / "first", **common)
    first = load_backbone(str(tmp_path / "first"))
    start = weights_fingerprint(first.unet)
    # method settings measured on the first model's data must not carry over to the new one
    meta_path = tmp_path / "first" / "uld_backbone.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "method_defaults": {"duld": {"top_k": 60}}}))

    summary = train_backbone(steps=2, name="second", init_from=str(tmp_path / "first"), **common)
    init = summary["init_from"]
    assert init == {"backbone": "first", "weights": start, "steps": 2, "train_wall_seconds_total": init["train_wall_seconds_total"]}
    second = load_backbone("second", home=workspace.home)
    assert second.unet.config.block_out_channels == first.unet.config.block_out_channels
    assert weights_fingerprint(second.unet) != start  # it trained
    second_meta = json.loads((workspace.backbone_dir("second") / "uld_backbone.json").read_text())
    assert second_meta["training"]["init_from"]["weights"] == start and "method_defaults" not in second_meta

    # raising --steps resumes the warm-started run from its own checkpoint
    assert train_backbone(steps=3, name="second", init_from=str(tmp_path / "first"), **common)["steps"] == 3
    # the same checkpoints with another start (here: a random init) are refused
    with pytest.raises(ConfigError, match="init_weights"):
        train_backbone(steps=4, name="second", **common)
    with pytest.raises(ConfigError, match="--channels"):
        train_backbone(steps=2, name="third", init_from=str(tmp_path / "first"), channels=(8, 16, 32, 64), **common)
    with pytest.raises(ConfigError, match="32 px"):
        train_backbone(**{**common, "image_size": 64}, steps=2, name="fourth", init_from=str(tmp_path / "first"))


def test_precision_choice(monkeypatch):
    from pipeline.backbones import training

    cpu = torch.device("cpu")
    assert training.autocast_dtype("fp32", cpu) is None
    assert training.autocast_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    assert training.autocast_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)
    assert training.autocast_dtype("auto", cpu) is None
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp16").validate()


def test_bf16_training_records_its_precision_and_resumes_in_fp32(tmp_path):
    # precision is not part of the trajectory: a run may continue on a machine without bf16
    crops = blobs(8)
    first = train_ddpm(tiny_model(), crops, TrainConfig(steps=3, batch_size=4, lr=1e-3, checkpoint_every=3, precision="bf16"),
                       checkpoint_dir=tmp_path / "c", progress=False)
    assert np.isfinite(first.losses).all()
    more = train_ddpm(tiny_model(), crops, TrainConfig(steps=5, batch_size=4, lr=1e-3, checkpoint_every=3, precision="fp32"),
                      checkpoint_dir=tmp_path / "c", progress=False)
    assert more.resumed_from == 3 and len(more.losses) == 5
    assert [seg["precision"] for seg in more.segments] == ["bf16", "fp32"]
