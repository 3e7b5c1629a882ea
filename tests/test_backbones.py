"""Backbones: feature shapes, dtypes, determinism, save/load round trips, load errors.

Models are tiny and randomly initialised from configs (no downloads); the SD
test model goes through save_pretrained -> load_backbone, the path a real
checkpoint takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.backbones.base import FeatureSpec, feature_key
from pipeline.backbones.common import noise_seed_for
from pipeline.backbones.ddpm import CategoryDDPM
from pipeline.backbones.tiny import build_tiny_sd
from pipeline.backbones.loading import backbone_name, detect_layout, load_backbone, resolve_spec, shipped_dir
from pipeline.errors import BackboneError, ConfigError

torch.set_num_threads(1)

TINY_DDPM = {
    "block_out_channels": (8, 8, 16),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 4,
    "attention_head_dim": 8,
}


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def ddpm() -> CategoryDDPM:
    torch.manual_seed(0)
    return CategoryDDPM.create(image_size=32, **TINY_DDPM)


# --- tiny Stable Diffusion ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("sd"))


# --- DDPM -----------------------------------------------------------------------

def test_ddpm_shapes_dtypes_and_layer_names(ddpm):
    assert ddpm.layer_names() == ["up0.res0", "up0.res1", "up1.res0", "up1.res1", "up2.res0", "up2.res1"]
    # defaults: last ResNet at 1/4 and 1/2 of the input resolution
    assert ddpm.default_layers() == ["up0.res1", "up1.res1"]
    x = images(3, 32)
    feats = ddpm.extract(x, [10, 400], ddpm.layer_names())
    shapes = ddpm.feature_shapes(32, ddpm.layer_names())
    assert set(feats) == {feature_key(l, t) for l in ddpm.layer_names() for t in (10, 400)}
    for key, f in feats.items():
        layer = key.split("@")[0]
        assert f.dtype == torch.float32 and f.device.type == "cpu"
        assert tuple(f.shape) == (3, *shapes[layer])
        assert torch.isfinite(f).all()
    assert shapes["up0.res1"] == (16, 8, 8) and shapes["up1.res1"] == (8, 16, 16)
    # timesteps matter: different noise levels give different features
    assert not torch.allclose(feats["up1.res1@t10"], feats["up1.res1@t400"])


def test_ddpm_early_exit_gives_the_same_features_as_a_full_pass(ddpm):
    x = images(2, 32, seed=1)
    early = ddpm.extract(x, [50], ["up0.res0"])  # stops after the first up ResNet
    full = ddpm.extract(x, [50], ["up0.res0", "up2.res1"])  # must run to the end
    assert torch.equal(early["up0.res0@t50"], full["up0.res0@t50"])


def test_ddpm_extract_is_deterministic_and_batch_independent(ddpm):
    x = images(4, 32, seed=2)
    seeds = [noise_seed_for(0, i) for i in range(4)]
    a = ddpm.extract(x, [50, 150], [], noise_seeds=seeds)
    b = ddpm.extract(x, [50, 150], [], noise_seeds=seeds)
    for k in a:
        assert torch.equal(a[k], b[k])
    # image 2 alone, with its own seed, gets the same features as inside the batch
    c = ddpm.extract(x[2:3], [50, 150], [], noise_seeds=seeds[2:3])
    for k in a:
        torch.testing.assert_close(a[k][2:3], c[k], atol=1e-4, rtol=1e-4)
    # a different seed is different noise
    d = ddpm.extract(x, [50, 150], [], noise_seeds=[noise_seed_for(1, i) for i in range(4)])
    assert not torch.allclose(a["up1.res1@t150"], d["up1.res1@t150"])
    # default generator (no seeds) is deterministic as well
    e1, e2 = ddpm.extract(x, [50], []), ddpm.extract(x, [50], [])
    assert all(torch.equal(e1[k], e2[k]) for k in e1)


def test_ddpm_rejects_bad_requests(ddpm):
    with pytest.raises(ConfigError, match="no layer"):
        ddpm.extract(images(1, 32), [50], ["up9.res0"])
    with pytest.raises(ConfigError, match="timesteps"):
        ddpm.extract(images(1, 32), [1000], [])
    with pytest.raises(ConfigError, match="divisible"):
        ddpm.extract(images(1, 30), [50], [])
    with pytest.raises(ConfigError, match="float"):
        ddpm.extract(torch.zeros((1, 3, 32, 32), dtype=torch.uint8), [50], [])
    with pytest.raises(ConfigError, match="one seed per image"):
        ddpm.extract(images(2, 32), [50], [], noise_seeds=[1])


def test_ddpm_save_load_round_trip(ddpm, tmp_path):
    out = ddpm.save_pretrained(tmp_path / "m", extra_meta={"training": {"steps": 0}})
    meta = json.loads((out / "uld_backbone.json").read_text())
    assert meta["kind"] == "ddpm" and meta["default_layers"] == ddpm.default_layers() and meta["image_size"] == 32
    assert detect_layout(out) == "ddpm"
    loaded = load_backbone(str(out))
    assert isinstance(loaded, CategoryDDPM)
    assert loaded.identity() == ddpm.identity()
    x = images(2, 32, seed=3)
    a, b = ddpm.extract(x, [50], [], noise_seeds=[1, 2]), loaded.extract(x, [50], [], noise_seeds=[1, 2])
    assert all(torch.equal(a[k], b[k]) for k in a)
    # float16 on disk: half the bytes, features within fp16 rounding
    half = ddpm.save_pretrained(tmp_path / "h", dtype=torch.float16)
    size = lambda p: (p / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.6 * size(out)
    h = load_backbone(str(half)).extract(x, [50], [], noise_seeds=[1, 2])
    for k in a:
        torch.testing.assert_close(h[k], a[k], atol=2e-2, rtol=2e-2)
    # saving again over an existing folder keeps other files (model card) and stays loadable
    (out / "MODEL_CARD.md").write_text("card")
    ddpm.save_pretrained(out)
    assert (out / "MODEL_CARD.md").read_text() == "card"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_feature_spec_bytes_and_identity_hash(ddpm):
    spec = FeatureSpec(image_size=32, timesteps=(50, 150))
    shapes = ddpm.feature_shapes(spec.image_size, list(spec.layers))
    assert sum(c * h * w for c, h, w in shapes.values()) * 2 * 2 == (16 * 64 + 8 * 256) * 4
    h1 = spec.config_hash(ddpm.identity())
    other = CategoryDDPM.create(image_size=32, **TINY_DDPM)  # different random weights
    assert spec.config_hash(other.identity()) != h1


# --- loading --------------------------------------------------------------------

def test_load_errors(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        load_backbone(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="not a backbone folder"):
        load_backbone(str(tmp_path / "empty"))
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(BackboneError, match="is a file"):
        load_backbone(str(tmp_path / "f.bin"))
    # a DDPM folder without its weights: layout is recognised, loading says what is wrong
    broken = tmp_path / "broken"
    (broken / "unet").mkdir(parents=True)
    (broken / "scheduler").mkdir()
    with pytest.raises(BackboneError, match="could not load"):
        load_backbone(str(broken))
    # an SD folder missing a part
    sd = tmp_path / "sd"
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        (sd / part).mkdir(parents=True)
    (sd / "uld_backbone.json").write_text(json.dumps({"kind": "stable-diffusion"}))
    with pytest.raises(BackboneError, match="missing scheduler/"):
        load_backbone(str(sd))


def test_hub_id_offline_is_an_actionable_error(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(BackboneError, match="could not be fetched") as info:
        load_backbone("someone/some-model")
    assert "local directory" in str(info.value)


def test_backbone_names(tmp_path):
    assert backbone_name("shipped") == "shipped"
    assert backbone_name("runwayml/stable-diffusion-v1-5") == "runwayml--stable-diffusion-v1-5"
    (tmp_path / "my model").mkdir()
    assert backbone_name(str(tmp_path / "my model")) == "my_model"
    assert backbone_name(str(tmp_path / "m1") + "/") == "m1"


def test_workspace_backbone_name_resolves(ddpm, tmp_path):
    from storage.layout import Workspace

    ws = Workspace(tmp_path / "ws")
    ddpm.save_pretrained(ws.backbone_dir("mine"))
    kind, source = resolve_spec("mine", home=ws.home)
    assert kind == "ddpm" and Path(source) == ws.backbone_dir("mine")
    assert isinstance(load_backbone("mine", home=ws.home), CategoryDDPM)


def test_shipped_backbone_loads_and_is_small():
    if not (shipped_dir() / "uld_backbone.json").is_file():
        pytest.skip("shipped backbone not committed yet")
    model = load_backbone("shipped")
    assert isinstance(model, CategoryDDPM) and model.image_size == 64
    from pipeline.backbones.defaults import default_timesteps

    # The demo's store (800 images + 2 augmented views per train image) stays well under 1 GB.
    spec = FeatureSpec(timesteps=default_timesteps("shipped"))
    shapes = model.feature_shapes(spec.image_size, model.default_layers())
    per_image = sum(c * h * w for c, h, w in shapes.values()) * len(spec.timesteps) * 2
    assert per_image <= 256 * 1024
    size = sum(p.stat().st_size for p in shipped_dir().rglob("*") if p.is_file())
    assert size < 8 * 2**20
    feats = model.extract(images(2, 64), list(spec.timesteps), [])
    assert all(torch.isfinite(v).all() for v in feats.values())


# --- Stable Diffusion ---------------------------------------------------------

def test_sd_extract_through_the_real_loading_path(tiny_sd_dir, tmp_path):
    from pipeline.backbones.stable_diffusion import StableDiffusionBackbone

    assert detect_layout(tiny_sd_dir) == "stable-diffusion"
    sd = load_backbone(str(tiny_sd_dir))
    assert isinstance(sd, StableDiffusionBackbone)
    assert sd.layer_names() == ["up0.res0", "up0.res1", "up1.res0", "up1.res1"]
    assert sd.default_layers() == ["up0.res1"]  # 1/2 latent resolution (no 1/4 level in 2 blocks)
    emb = sd.empty_prompt_embedding()
    assert tuple(emb.shape) == (1, 12, 16)
    x = images(2, 32, seed=4)
    feats = sd.extract(x, [100, 500], sd.layer_names(), noise_seeds=[7, 8])
    shapes = sd.feature_shapes(32, sd.layer_names())
    # VAE /2 -> latent 16; up0 at 8x8 (32 ch), up1 at 16x16 (16 ch)
    assert shapes == {"up0.res0": (32, 8, 8), "up0.res1": (32, 8, 8), "up1.res0": (16, 16, 16), "up1.res1": (16, 16, 16)}
    for key, f in feats.items():
        assert f.dtype == torch.float32 and tuple(f.shape) == (2, *shapes[key.split("@")[0]])
    again = sd.extract(x, [100, 500], sd.layer_names(), noise_seeds=[7, 8])
    assert all(torch.equal(feats[k], again[k]) for k in feats)
    single = sd.extract(x[1:], [100], ["up1.res1"], noise_seeds=[8])
    torch.testing.assert_close(single["up1.res1@t100"], feats["up1.res1@t100"][1:], atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="divisible"):
        sd.extract(images(1, 18), [100], [])
    # save/load round trip keeps the identity (weights, VAE, text encoder, scheduler betas)
    copy = sd.save_pretrained(tmp_path / "sd-copy")
    assert load_backbone(str(copy)).identity() == sd.identity()
    assert sd.identity()["scheduler"]["beta_schedule"] == "scaled_linear"


def test_unet_widths_are_checked_before_the_model_is_built():
    from pipeline.backbones.ddpm import CategoryDDPM, unet_arch
    from pipeline.errors import ConfigError

    for bad in ((16,), (16, 20), (8, 16)):  # one level; not a multiple of 8; attention level narrower than a head
        with pytest.raises(ConfigError) as err:
            unet_arch(bad)
        assert err.value.where == "--channels"
    with pytest.raises(ConfigError, match="heads are 32 channels wide") as err:
        unet_arch((8, 16))
    assert "8,32" in err.value.fix
    # the narrowest usable design builds and runs
    unet = CategoryDDPM.create(16, **unet_arch((8, 32))).unet
    assert tuple(unet.config.block_out_channels) == (8, 32)
    with torch.no_grad():
        assert unet(torch.zeros(1, 3, 16, 16), 10).sample.shape == (1, 3, 16, 16)
