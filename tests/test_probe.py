"""Feature probe (transfer PCK): known answers on constructed features, the train-only
validation subset, ZeroShot-identical descriptors, and the flow + CLI end to end."""

from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.errors import ConfigError  # noqa: E402
from pipeline.evaluation.probe import (  # noqa: E402
    TransferProbe,
    is_grid,
    landmark_box_size,
    pck_grid,
    sample_pairs,
    standard_combinations,
    top_combinations,
    validation_subset,
)
from pipeline.methods.zeroshot import describe_points  # noqa: E402

torch.set_num_threads(1)

S = 32
TEMPLATE = np.array([[10, 10], [22, 10], [16, 16], [11, 22], [21, 22]], np.float64)  # 12 x 12 landmark box


def make_parts(n: int = 24, seed: int = 0):
    """Landmarks at pixel centres: the template shifted by a per-image integer offset."""
    rng = np.random.default_rng(seed)
    offset = rng.integers(-4, 5, size=(n, 1, 2)).astype(np.float64)
    lm = TEMPLATE[None] + offset + 0.5
    visible = np.ones(lm.shape[:2], bool)
    return lm, visible, offset[:, 0]


def positional_code(offset: np.ndarray, res: int, shift: np.ndarray | None = None) -> np.ndarray:
    """(n, 8, res, res) features: a low-frequency Fourier code of the position in the object's frame
    (pixel position minus the image's offset). A perfect correspondence code: the descriptor at a point
    of A equals B's at the same object-frame point, and cosine similarity peaks only there."""
    c = (np.arange(res) + 0.5) * (S / res)  # feature cell centres in crop pixels
    yy, xx = np.meshgrid(c, c, indexing="ij")
    freqs = 2 * np.pi / (2.5 * S) * np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.7, -0.7]])
    out = np.zeros((len(offset), 2 * len(freqs), res, res), np.float32)
    for i, o in enumerate(offset):
        o = o + (shift[i] if shift is not None else 0.0)
        ph = [w[0] * (xx - o[0]) + w[1] * (yy - o[1]) for w in freqs]
        out[i] = np.concatenate([np.cos(ph), np.sin(ph)])
    return out


def test_perfect_positional_code_gives_pck_one_and_random_features_give_chance():
    lm, vis, off = make_parts(30)
    rng = np.random.default_rng(1)
    feats = {
        "code@t1": positional_code(off, S),  # at crop resolution
        "code@t2": positional_code(off, S // 2),  # half resolution: bilinear sampling must recover it
        "noise@t1": rng.normal(size=(30, 16, 8, 8)).astype(np.float32),
    }
    probe = TransferProbe(alpha=0.1, n_pairs=300, seed=0).fit(lm, vis, S)
    assert len(probe.pairs_) == 300 and (probe.pairs_[:, 0] != probe.pairs_[:, 1]).all()
    res = {r.name: r for r in probe.sweep(feats, progress=False) if r.kind == "single"}
    for key in ("code@t1", "code@t2"):
        assert res[key].pck == 1.0, key
        np.testing.assert_array_equal(res[key].per_landmark, 1.0)
        assert res[key].n_points == 300 * 5
    assert res["code@t1"].errors.max() == pytest.approx(0.0, abs=1e-5)  # landmarks sit on pixel centres
    noise = res["noise@t1"]
    # 0.1 x 12 px radius on a 32 x 32 crop: 5 of 1024 pixels -> chance ~0.005
    assert noise.chance == pytest.approx(5 / 1024, rel=0.05)
    assert noise.pck < 0.05 and abs(noise.pck - noise.chance) < 0.03
    # combinations: the code survives being averaged with itself, the noise pulls it down
    both = probe.score(feats, ["code@t1", "code@t2"])
    assert both.pck == 1.0
    assert probe.score(feats).pck < 1.0


def test_threshold_object_size_and_normaliser():
    # Targets' features are rendered 3 px to the right of their landmarks: every transfer is off by 3 px.
    lm, vis, off = make_parts(20, seed=2)
    shift = np.zeros((20, 2))
    shift[10:, 0] = 3.0
    feats = {"code@t1": positional_code(off, S, shift)}
    pairs = np.array([[a, b] for a in range(10) for b in range(10, 20)])
    norm = np.full(20, 40.0)  # e.g. an inter-ocular distance in crop px
    size = landmark_box_size(lm, vis)
    np.testing.assert_allclose(size, 12.0)  # max side of the landmark box
    np.testing.assert_allclose(landmark_box_size(lm, vis, "sqrt_area"), 12.0)
    r = TransferProbe(alpha=0.2).fit(lm, vis, S, normalisers=norm, pairs=pairs).score(feats)  # 2.4 px < 3 px
    np.testing.assert_allclose(r.errors, 3.0, atol=1e-5)
    assert r.pck == 0.0 and r.pck_norm == 1.0  # 0.2 x 40 = 8 px > 3 px
    assert TransferProbe(alpha=0.26).fit(lm, vis, S, pairs=pairs).score(feats).pck == 1.0  # 3.12 px
    # only landmarks visible in both images count
    vis2 = vis.copy()
    vis2[0, 0] = False  # source image 0 lacks landmark 0
    vis2[15, 1] = False  # target image 15 lacks landmark 1
    r2 = TransferProbe(alpha=0.26).fit(lm, vis2, S, pairs=pairs).score(feats)
    assert r2.n_points == 100 * 5 - 10 - 10 and r2.n_points_per_landmark.tolist() == [90, 90, 100, 100, 100]


def test_combinations_match_zeroshot_descriptors():
    # The sweep sums per-key cosines; ZeroShot's descriptor concatenates normalised keys.
    # Both must pick the same pixels (the probe measures what ZeroShot clusters).
    rng = np.random.default_rng(3)
    n = 8
    lm = rng.uniform(4, S - 4, size=(n, 4, 2))
    vis = np.ones((n, 4), bool)
    feats = {"a@t1": rng.normal(size=(n, 6, 8, 8)).astype(np.float32), "b@t1": rng.normal(size=(n, 5, 16, 16)).astype(np.float32),
             "a@t2": rng.normal(size=(n, 6, 8, 8)).astype(np.float32)}
    probe = TransferProbe(alpha=0.3, n_pairs=20, stride=2).fit(lm, vis, S)
    combo = ("a@t1", "a@t2", "b@t1")
    res = probe.score(feats, combo)
    pp, pl = probe.point_pair_, probe.point_landmark_
    a, b = probe.pairs_[pp, 0], probe.pairs_[pp, 1]
    q = describe_points(feats, lm.astype(np.float32), S)  # (n, L, D): ZeroShot's descriptor
    cand = describe_points(feats, np.broadcast_to(probe.grid_, (n, *probe.grid_.shape)), S)  # (n, G, D)
    pick = np.einsum("qd,qgd->qg", q[a, pl], cand[b]).argmax(1)
    err = np.linalg.norm(probe.grid_[pick] - lm[b, pl], axis=-1)
    np.testing.assert_allclose(res.errors, err, atol=1e-5)
    swept = {(r.kind, r.keys): r for r in probe.sweep(feats, progress=False)}
    assert swept[("all", combo)].pck == res.pck
    assert swept[("layer", ("a@t1", "a@t2"))].pck == probe.score(feats, ["a@t1", "a@t2"]).pck
    kinds = {k for k, _ in swept}
    base = {"single", "layer", "timestep", "all", "best2", "best3"}
    assert base <= kinds <= base | {"grid2"}  # grid2 only when best2 is not a layers x timesteps product
    grid, layers, ts = pck_grid(list(swept.values()))
    assert layers == ["a", "b"] and ts == [1, 2] and np.isnan(grid[1, 1])


def test_standard_combinations_and_grid_helpers():
    keys = [f"{l}@t{t}" for l in ("up1.res1", "up2.res1") for t in (50, 150)]
    single = {"up1.res1@t50": 0.3, "up2.res1@t150": 0.5, "up1.res1@t150": 0.1, "up2.res1@t50": 0.2}
    combos = standard_combinations(keys, single)
    by = {}
    for kind, c in combos:
        by.setdefault(kind, []).append(c)
    assert by["layer"] == [("up1.res1@t150", "up1.res1@t50"), ("up2.res1@t150", "up2.res1@t50")]
    assert by["timestep"] == [("up1.res1@t50", "up2.res1@t50"), ("up1.res1@t150", "up2.res1@t150")]  # ascending t
    assert by["all"] == [tuple(sorted(keys))]
    assert by["best2"] == [("up1.res1@t50", "up2.res1@t150")] and not is_grid(by["best2"][0])
    assert by["grid2"] == [tuple(sorted(keys))] and is_grid(by["grid2"][0])
    assert by["best3"] == [("up1.res1@t50", "up2.res1@t150", "up2.res1@t50")]


def test_validation_subset_is_train_only_fixed_and_order_free():
    ids = np.array([f"img{i:04d}" for i in range(300)])
    splits = np.where(np.arange(300) % 3 == 0, "test", "train")
    sub = validation_subset(ids, splits, 50, seed=0)
    assert len(sub) == 50 and (splits[sub] == "train").all()
    np.testing.assert_array_equal(sub, validation_subset(ids, splits, 50, seed=0))  # fixed
    perm = np.random.default_rng(0).permutation(300)  # row order does not matter, only ids
    assert set(ids[perm][validation_subset(ids[perm], splits[perm], 50, seed=0)]) == set(ids[sub])
    assert set(ids[validation_subset(ids, splits, 50, seed=1)]) != set(ids[sub])  # the seed picks another subset
    # more than there are: all train images, still no test image
    everything = validation_subset(ids, splits, 1000)
    assert len(everything) == 200 and (splits[everything] == "train").all()
    with pytest.raises(ConfigError, match="no 'train' images"):
        validation_subset(ids[:1], ["test"], 5)
    pairs = sample_pairs(5, 100, seed=0)
    assert len(pairs) == 20 and len({tuple(p) for p in pairs}) == 20 and (pairs[:, 0] != pairs[:, 1]).all()
    np.testing.assert_array_equal(sample_pairs(50, 30, 4), sample_pairs(50, 30, 4))


def test_default_timesteps_are_picked_up_only_when_recorded(tmp_path):
    from flows.cli_options import feature_spec
    from pipeline.backbones.defaults import default_timesteps, write_backbone_defaults
    from pipeline.backbones.loading import shipped_dir

    folder = tmp_path / "mine"
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    (folder / "uld_backbone.json").write_text(json.dumps({"kind": "ddpm", "default_layers": ["up1.res1"], "image_size": 32}))
    assert default_timesteps(str(folder)) == (50, 150)  # nothing recorded: FeatureSpec's default, as before
    assert feature_spec(32, None, None, 0.15, None, 0, backbone=str(folder)).timesteps == (50, 150)
    write_backbone_defaults(folder, ["up2.res0"], [25, 100], {"tool": "test"})
    meta = json.loads((folder / "uld_backbone.json").read_text())
    assert meta["default_layers"] == ["up2.res0"] and meta["default_timesteps"] == [25, 100] and meta["image_size"] == 32
    assert feature_spec(32, None, None, 0.15, None, 0, backbone=str(folder)).timesteps == (25, 100)
    assert feature_spec(32, "50", None, 0.15, None, 0, backbone=str(folder)).timesteps == (50,)  # explicit wins
    assert default_timesteps("owner/some-hub-model") == (50, 150)  # no network, no local defaults
    with pytest.raises(ConfigError, match="refusing to change the shipped"):
        write_backbone_defaults(shipped_dir(), ["up1.res1"], [50], {})


# ------------------------------------------------------------------ flow and CLI, end to end

N_TRAIN, N_TEST, SIZE = 16, 4, 32


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory, prefect_harness):
    """Synthetic heads -> manifests, and a small random-init DDPM saved as a backbone folder."""
    from pipeline.backbones.ddpm import CategoryDDPM
    from pipeline.datasets.registry import get_loader
    from pipeline.datasets.synthetic import generate_synthetic
    from storage.layout import Workspace

    home = tmp_path_factory.mktemp("probe") / "ws"
    ws = Workspace(home)
    root = generate_synthetic(ws.generated_dataset("synthetic"), N_TRAIN, N_TEST, SIZE, 0)
    for split in ("train", "test"):
        manifest, _ = get_loader("synthetic").load(root, split)
        manifest.save(ws.manifest("synthetic", split))
    torch.manual_seed(0)
    backbone = CategoryDDPM.create(image_size=SIZE, name="tinyddpm", block_out_channels=(8, 8, 16, 16), attention_head_dim=8, norm_num_groups=4)
    bdir = home.parent / "tinyddpm"
    backbone.save_pretrained(bdir)
    return home, bdir


def _cli(home: Path, *args: str):
    import typer
    from typer.testing import CliRunner

    from flows import cli, cli_backbone

    app = typer.Typer()
    app.callback()(cli._main)
    cli_backbone.register(app)
    return CliRunner().invoke(app, ["--home", str(home), "--seed", "0", *args])


@pytest.mark.slow
def test_probe_cli_end_to_end_writes_table_figure_and_defaults(tiny_home):
    from storage.layout import Workspace
    from storage.tables import read_metadata, read_table

    home, bdir = tiny_home
    res = _cli(home, "backbone", "probe", "--dataset", "synthetic", "--backbone", str(bdir), "--timesteps", "50,150",
               "--size", str(SIZE), "--n-images", "8", "--n-pairs", "30", "-k", "4", "--zeroshot-top", "1",
               "--n-regressor-images", "0", "--write-default")
    assert res.exit_code == 0, res.output
    assert "chance PCK" in res.output and "defaults written" in res.output
    probes = list(Workspace(home).home.glob("probes/synthetic/tinyddpm/*/probe.parquet"))
    assert len(probes) == 1
    table = read_table(probes[0], "probe")
    png = probes[0].with_name("probe.png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    overall = table[table["landmark"] == -1]
    singles = overall[overall["kind"] == "single"]
    assert len(singles) == 8 * 2  # 8 layers x 2 timesteps
    assert set(singles["timestep"]) == {50, 150} and (singles["n_keys"] == 1).all()
    assert set(overall["kind"]) >= {"single", "layer", "timestep", "all", "best2", "best3", "default"}
    assert ((overall["pck"] >= 0) & (overall["pck"] <= 1)).all() and (overall["pck_chance"] > 0).all()
    assert (table[table["landmark"] >= 0]["landmark_name"] != "all").all()
    # ZeroShot ran on the best key set and the default spec, nowhere else
    zs = overall.dropna(subset=["nme_forward"]).drop_duplicates("features")
    assert 1 <= len(zs) <= 2 and zs["nme_forward"].gt(0).all() and zs["hungarian_acc"].between(0, 1).all()
    assert table[table["landmark"] >= 0]["nme_forward"].isna().all()
    # the validation subset is train images only
    meta = read_metadata(probes[0])
    assert len(meta["validation_ids"]) == 8 and all(i.startswith("train_") for i in meta["validation_ids"])
    # --write-default stored the best grid spec, which later stages now pick up
    bj = json.loads((bdir / "uld_backbone.json").read_text())
    best = overall[overall["features"].map(lambda f: is_grid(f.split("+")))].sort_values(["pck", "n_keys", "features"], ascending=[False, True, True]).iloc[0]
    layers = sorted({k.split("@t")[0] for k in best["features"].split("+")})
    ts = sorted({int(k.split("@t")[1]) for k in best["features"].split("+")})
    assert sorted(bj["default_layers"]) == layers and bj["default_timesteps"] == ts
    assert bj["defaults_from"]["tool"] == "uld backbone probe"
    from flows.cli_options import feature_spec

    assert feature_spec(SIZE, None, None, 0.15, None, 0, backbone=str(bdir)).timesteps == tuple(ts)
    # the store is complete: a re-run (or any stage with this spec) reuses it instead of extracting
    from flows.features import complete_store_path
    from pipeline.backbones.base import FeatureSpec

    layer_names = sorted(singles["layer"].unique())
    spec = FeatureSpec(image_size=SIZE, timesteps=(50, 150), layers=tuple(layer_names))
    assert complete_store_path("synthetic", str(bdir), spec, home=home) is not None


def test_probe_cli_refuses_shipped_defaults_and_bad_options(tiny_home):
    home, _ = tiny_home
    res = _cli(home, "backbone", "probe", "--dataset", "nosuch", "--backbone", "shipped")
    assert res.exit_code != 0 and "no train manifest" in str(res.exception)
    from flows.probe import write_default_spec
    from pipeline.evaluation.probe import ProbeResult

    best = ProbeResult(keys=("up1.res1@t50",), pck=0.5, per_landmark=np.zeros(1), n_points_per_landmark=np.zeros(1), pck_norm=0.5,
                       per_landmark_norm=np.zeros(1), chance=0.01, n_pairs=1, n_points=1, alpha=0.1, errors=np.zeros(1),
                       point_landmark=np.zeros(1), point_pair=np.zeros(1))
    with pytest.raises(ConfigError, match="refusing to change the shipped"):
        write_default_spec("shipped", home, None, best, {})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="alpha"):
        TransferProbe(alpha=0)
    assert top_combinations([best], 1, grid_only=True)[0] is best
