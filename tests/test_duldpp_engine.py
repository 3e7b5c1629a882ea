"""`uld train --method duld++` end to end on the tiny workspace: the schedule, the pose columns, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.tiny_runs import K, SIZE, invoke_cli, tiny_runs

Q = 2
# bootstrap (0), one D-ULD round (1), the proxy stage (2), two TSC rounds (3, 4): the second
# TSC round continues the first one's Adam state, the path a resume must restore too.
STAGES = ["bootstrap-000", "round-001", "proxy-002", "duldpp-003", "duldpp-004"]
PARAMS = {"q": Q, "duld_rounds": 1, "proxy_steps": 2}


def _register(app) -> None:
    from flows import cli_train

    cli_train.register(app)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_harness):
    return tiny_runs(tmp_path_factory)


def _duld(runs, run_id: str, **kw):
    from flows.duld import duld
    from pipeline.backbones.base import FeatureSpec

    args = dict(k=K, rounds=2, steps_per_round=2, bootstrap_steps=2, batch_size=6, home=runs.home, run_id=run_id, progress=False,
                views=None, store_path=runs.store, threads=1, method="duld++", method_params=PARAMS)
    return duld("synthetic", runs.backbone, FeatureSpec(image_size=SIZE), **{**args, **kw})


def _checkpoint_arrays(run, stage: str) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    ck = run / "checkpoints" / stage
    out = {f"heads/{k}": v.numpy() for k, v in load_file(str(ck / "model.safetensors")).items()}
    out.update({f"vae/{k}": v.numpy() for k, v in load_file(str(ck / "vae.safetensors")).items()})
    for name in ("labeller.npz", "train-codes.npz", "train-keypoints.npz"):
        with np.load(ck / name) as z:
            out.update({f"{name}/{n}": z[n] for n in z.files})
    return out


def test_duldpp_cli_runs_the_schedule_and_writes_pose_columns(runs):
    from storage.layout import Workspace
    from storage.tables import read_table

    res = invoke_cli(runs.home, _register, "--seed", "0", "train", "--method", "duld++", "--dataset", "synthetic", "--backbone", runs.backbone,
                     "--store", str(runs.store), "-k", str(K), "--size", str(SIZE), "--steps-per-round", "2", "--bootstrap-steps", "2",
                     "--batch-size", "6", "--views", "0", "--no-progress", "--q", str(Q), "--duld-rounds", "1", "--proxy-steps", "2",
                     "--rounds", "2", "--run-id", "duldpp-cli")
    assert res.exit_code == 0, res.output
    assert "duld++ per-round NME" in res.output
    run = Workspace(runs.home).run_dir("duldpp-cli")
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "duld++" and config["duldpp"] == {"q": Q, "proxy_steps": 2, "duld_rounds": 1, "tsc_loss": "eq3"}
    for stage in STAGES:
        assert (run / "checkpoints" / stage / "state.json").is_file(), stage
    for stage in STAGES[2:]:
        ck = run / "checkpoints" / stage
        assert (ck / "vae.safetensors").is_file() and (ck / "train-codes.npz").is_file()
        with np.load(ck / "labeller.npz") as z:  # the TSC labeller: Q x K stage-2 centroids and the identity table
            assert z["centers"].shape[:2] == (Q, K) and sorted(z["identities"][0]) == list(range(K))

    pl = read_table(run / "pseudolabels.parquet", "pseudolabels")
    assert set(pl["method"]) == {"duld++"} and sorted(pl["round"].unique()) == [1, 2, 3, 4]
    tsc = pl[pl["round"] >= 3]
    assert set(tsc["stage"]) == {"duldpp"} and tsc["pose_cluster"].between(0, Q - 1).all()
    assert all(len(c) == 64 and np.isfinite(c).all() for c in tsc["pose_code"])
    assert tsc["label"].between(0, Q * K - 1).all() and tsc["landmark_id"].between(0, K - 1).all()
    # one pose cluster and one code per image
    per_image = tsc[tsc["round"] == 3].groupby("image_id")
    assert (per_image["pose_cluster"].nunique() == 1).all()
    # the label's pose part is the row's pose cluster (r = u * K + c)
    assert (tsc["label"] // K == tsc["pose_cluster"]).all()
    early = pl[pl["round"] <= 2]
    assert (early["pose_cluster"] == -1).all() and early["pose_code"].isna().all()
    assert set(early.loc[early["round"] == 2, "stage"]) == {"proxy"}

    metrics = read_table(run / "metrics.parquet", "metrics")
    stages = metrics.groupby("round")["stage"].first().to_dict()
    assert stages == {0: "bootstrap", 1: "round", 2: "proxy", 3: "duldpp", 4: "duldpp"}
    kp = read_table(run / "keypoints.parquet", "keypoints")
    assert sorted(kp["round"].unique()) == [0, 1, 2, 3, 4] and kp.groupby(["round", "image_id"]).size().eq(K).all()
    import pandas as pd

    tl = pd.read_parquet(run / "train-log.parquet")
    assert {"elbo", "reconstruction", "kl"} <= set(tl.loc[tl["stage"] == "proxy"].dropna(axis=1).columns)
    assert "latent" in tl.loc[tl["stage"] == "duldpp"].dropna(axis=1).columns

    # Fig. 7's pose analysis: every proxy / TSC evaluation, both splits, 5 yaw bins + overall
    pose = read_table(run / "pose-clusters.parquet", "pose_clusters")
    assert sorted(pose["round"].unique()) == [2, 3, 4] and set(pose["split"]) == {"train", "test"}
    assert set(pose["pose_source"]) == {"yaw"} and set(pose["q"]) == {Q}
    assert pose.groupby(["round", "split"]).size().eq(6).all()
    overall = pose[pose["bin_index"] == -1]
    per_bin = pose[pose["bin_index"] >= 0].groupby(["round", "split"])[["n_images", "n_correct"]].sum()
    np.testing.assert_array_equal(per_bin.to_numpy(), overall.set_index(["round", "split"]).loc[per_bin.index, ["n_images", "n_correct"]].to_numpy())
    assert overall.set_index(["round", "split"]).loc[(3, "train"), "n_images"] == 24  # every tiny train head has a yaw
    assert overall["accuracy"].between(0, 1).all()
    # the train mapping is the majority bin of each cluster: at least one image per cluster that has any is right
    tr = overall[overall["split"] == "train"]
    assert (tr["n_correct"] >= tr["clusters"].map(len)).all()
    assert (run / "figures" / "pose-clusters.png").read_bytes()[:4] == b"\x89PNG"
    # `uld report` shows it: the table and the figure
    from flows.report import write_report

    page = write_report(run).read_text()
    assert "Pose clusters against known poses" in page and "figures/pose-clusters.png" in page
    section = page.split("Pose clusters against known poses", 1)[1]
    assert section.index("[-90,-54)") < section.index("[54,90]") < section.index("overall")


def test_duldpp_resumes_after_a_crash_in_any_stage_like_an_uninterrupted_run(runs, monkeypatch):
    import flows.duldpp_stages as stages
    from storage.layout import Workspace

    _duld(runs, "duldpp-full")
    full = Workspace(runs.home).run_dir("duldpp-full")

    # interrupted after the D-ULD round, then crashes inside the proxy stage and inside the second TSC round
    _duld(runs, "duldpp-crash", max_rounds=1)
    crash = Workspace(runs.home).run_dir("duldpp-crash")
    assert (crash / "checkpoints" / "round-001" / "state.json").is_file() and not (crash / "checkpoints" / "proxy-002").exists()

    real_proxy, real_eval = stages.train_proxy_task, stages.evaluate_tsc_task

    def proxy_then_crash(ctx, round_, *a):
        real_proxy(ctx, round_, *a)  # the stage's training ran and logged, then the process dies
        raise RuntimeError("simulated crash in the proxy stage")

    monkeypatch.setattr(stages, "train_proxy_task", proxy_then_crash)
    with pytest.raises(RuntimeError, match="proxy stage"):
        _duld(runs, "duldpp-crash", resume=True)
    assert not (crash / "checkpoints" / "proxy-002" / "state.json").exists()
    monkeypatch.setattr(stages, "train_proxy_task", real_proxy)

    def eval_crash_in_round_4(ctx, round_, *a):
        if round_ == 4:
            raise RuntimeError("simulated crash in a TSC round")
        return real_eval(ctx, round_, *a)

    monkeypatch.setattr(stages, "evaluate_tsc_task", eval_crash_in_round_4)
    with pytest.raises(RuntimeError, match="TSC round"):
        _duld(runs, "duldpp-crash", resume=True)
    assert (crash / "checkpoints" / "duldpp-003" / "state.json").is_file()
    assert not (crash / "checkpoints" / "duldpp-004" / "state.json").exists()
    monkeypatch.setattr(stages, "evaluate_tsc_task", real_eval)

    _duld(runs, "duldpp-crash", resume=True)
    for stage in STAGES[2:]:
        a, b = _checkpoint_arrays(full, stage), _checkpoint_arrays(crash, stage)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{stage}: {name}")
    import torch

    oa = torch.load(full / "checkpoints" / "duldpp-004" / "optimizer.pt", weights_only=True)
    ob = torch.load(crash / "checkpoints" / "duldpp-004" / "optimizer.pt", weights_only=True)
    assert all(torch.equal(oa["state"][i]["exp_avg"], ob["state"][i]["exp_avg"]) for i in oa["state"])

    from storage.tables import read_table

    pa_, pb = (read_table(r / "pseudolabels.parquet", "pseudolabels").sort_values(["round", "image_id", "label"]).reset_index(drop=True)
               for r in (full, crash))
    assert len(pa_) == len(pb) and (pa_["pose_cluster"].to_numpy() == pb["pose_cluster"].to_numpy()).all()

    # a D-ULD++ run cannot be resumed with another Q
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="duldpp"):
        _duld(runs, "duldpp-crash", resume=True, method_params={**PARAMS, "q": Q + 1})


def _vae_part(run, stage: str, part: str) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.numpy() for k, v in load_file(str(run / "checkpoints" / stage / "vae.safetensors")).items() if k.startswith(part)}


def test_full_vae_variant_trains_the_decoder_and_resumes_bit_identically(runs, monkeypatch):
    """Table 2's "+ TSC w/ full VAE": the TSC rounds train the whole VAE with the ELBO; everything before them is D-ULD++'s."""
    import flows.duldpp_stages as stages
    from pipeline.errors import ConfigError
    from storage.layout import Workspace
    from storage.tables import read_table

    params = {**PARAMS, "tsc_loss": "elbo"}
    _duld(runs, "fullvae-full", method_params=params)
    _duld(runs, "fullvae-eq3")  # the same run with Eq. 3 (D-ULD++)
    full, eq3 = (Workspace(runs.home).run_dir(r) for r in ("fullvae-full", "fullvae-eq3"))
    assert json.loads((full / "config.json").read_text())["duldpp"]["tsc_loss"] == "elbo"
    # up to the proxy stage both runs are one computation
    a, b = _checkpoint_arrays(full, "proxy-002"), _checkpoint_arrays(eq3, "proxy-002")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=f"proxy-002: {name}")
    # Eq. 3 leaves the decoder as the proxy stage left it; the full-VAE variant trains it
    for run, trained in ((eq3, False), (full, True)):
        before, after = _vae_part(run, "proxy-002", "decoder"), _vae_part(run, "duldpp-004", "decoder")
        assert any(not np.array_equal(before[k], after[k]) for k in before) == trained, run.name
    import pandas as pd

    tl = pd.read_parquet(full / "train-log.parquet")
    tsc_log = tl[tl["stage"] == "duldpp"].dropna(axis=1)
    assert {"elbo", "reconstruction", "kl", "detector"} <= set(tsc_log.columns) and "latent" not in tsc_log.columns
    assert np.isfinite(tsc_log["elbo"]).all() and len(tsc_log) == 2 * 2

    # interrupted after the first TSC round, then a crash in the second one's evaluation
    _duld(runs, "fullvae-crash", method_params=params, max_rounds=3)
    crash = Workspace(runs.home).run_dir("fullvae-crash")
    real_eval = stages.evaluate_tsc_task

    def eval_crash_in_round_4(ctx, round_, *a):
        if round_ == 4:
            raise RuntimeError("simulated crash in a full-VAE TSC round")
        return real_eval(ctx, round_, *a)

    monkeypatch.setattr(stages, "evaluate_tsc_task", eval_crash_in_round_4)
    with pytest.raises(RuntimeError, match="full-VAE"):
        _duld(runs, "fullvae-crash", method_params=params, resume=True)
    monkeypatch.setattr(stages, "evaluate_tsc_task", real_eval)
    _duld(runs, "fullvae-crash", method_params=params, resume=True)
    for stage in STAGES[2:]:
        a, b = _checkpoint_arrays(full, stage), _checkpoint_arrays(crash, stage)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{stage}: {name}")
    import torch

    oa = torch.load(full / "checkpoints" / "duldpp-004" / "optimizer.pt", weights_only=True)
    ob = torch.load(crash / "checkpoints" / "duldpp-004" / "optimizer.pt", weights_only=True)
    assert oa["state"].keys() == ob["state"].keys()
    assert all(torch.equal(oa["state"][i]["exp_avg"], ob["state"][i]["exp_avg"]) for i in oa["state"])
    # the variant's Adam holds the decoder too: more parameter tensors than the Eq. 3 run's
    oe = torch.load(eq3 / "checkpoints" / "duldpp-004" / "optimizer.pt", weights_only=True)
    assert len(oa["state"]) > len(oe["state"])
    pa_, pb = (read_table(r / "pose-clusters.parquet", "pose_clusters").sort_values(["round", "split", "bin_index"]).reset_index(drop=True)
               for r in (full, crash))
    np.testing.assert_array_equal(pa_["n_correct"].to_numpy(), pb["n_correct"].to_numpy())

    # the loss is part of the resume check
    with pytest.raises(ConfigError, match="duldpp"):
        _duld(runs, "fullvae-crash", resume=True, method_params={**params, "tsc_loss": "eq3"})
    with pytest.raises(ConfigError, match="unknown TSC loss"):
        _duld(runs, "fullvae-bad", method_params={**params, "tsc_loss": "mse"})
    assert not Workspace(runs.home).run_dir("fullvae-bad").exists()


def test_runs_made_before_the_tsc_loss_was_recorded_still_resume_and_get_the_pose_analysis(runs):
    from storage.layout import Workspace

    _duld(runs, "duldpp-old", max_rounds=3)
    run = Workspace(runs.home).run_dir("duldpp-old")
    cfg = json.loads((run / "config.json").read_text())
    del cfg["duldpp"]["tsc_loss"]  # as config.json was written before the setting existed
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "pose-clusters.parquet").unlink()  # nor was the pose analysis
    (run / "figures" / "pose-clusters.png").unlink()
    _duld(runs, "duldpp-old", resume=True)
    assert (run / "checkpoints" / "duldpp-004" / "state.json").is_file()
    from storage.tables import read_table

    assert sorted(read_table(run / "pose-clusters.parquet", "pose_clusters")["round"].unique()) == [2, 3, 4]
    assert (run / "figures" / "pose-clusters.png").is_file()


def test_duldpp_only_options_are_refused_for_other_methods(runs):
    from pipeline.errors import ConfigError

    res = invoke_cli(runs.home, _register, "train", "--method", "duld", "--dataset", "synthetic", "--store", str(runs.store),
                     "--q", "3", "--no-progress")
    assert isinstance(res.exception, ConfigError) and "--q does not apply" in str(res.exception)
    res = invoke_cli(runs.home, _register, "train", "--method", "duld", "--dataset", "synthetic", "--store", str(runs.store),
                     "--tsc-loss", "elbo", "--no-progress")
    assert isinstance(res.exception, ConfigError) and "--tsc-loss does not apply" in str(res.exception)
    res = invoke_cli(runs.home, _register, "train", "--method", "duld++", "--dataset", "synthetic", "--store", str(runs.store),
                     "--backbone", runs.backbone, "--size", str(SIZE), "-k", str(K), "--views", "0", "--tsc-loss", "mse", "--no-progress",
                     "--run-id", "duldpp-bad-loss")
    assert isinstance(res.exception, ConfigError) and "unknown TSC loss" in str(res.exception)
    from storage.layout import Workspace

    assert not Workspace(runs.home).run_dir("duldpp-bad-loss").exists()  # refused before any run folder exists


# ------------------------------------------------------------------ the engine's new pipeline pieces (no flows)


def test_tsc_assign_and_identity_centers_agree_with_predict():
    from pipeline.labelling.two_stage import TwoStageLabeller
    from tests.test_duldpp import _one_to_one, _tsc_case

    Kp = 4
    kps, codes, rows, _, part_of, kept = _tsc_case(3, Kp)
    tsc = TwoStageLabeller(q=3, k=Kp).fit(kps, codes, rows, seed=0)
    pose = tsc.predict_pose(codes)
    C = tsc.identity_centers(codes)
    assert C.shape == (len(rows), Kp, tsc.centers_.shape[-1])
    for i, u in enumerate(pose):
        for c in range(Kp):
            np.testing.assert_array_equal(C[i, tsc.identities_[u, c]], tsc.centers_[u, c])
    labels, sq = tsc.assign(kps, codes, rows)
    tl = tsc.predict(kps, codes, rows)
    img, col = np.nonzero(tl.present)
    np.testing.assert_array_equal(labels[tl.keypoint[img, col]], tl.labels[img, col])  # the exemplar's label is its column
    np.testing.assert_allclose(sq[tl.keypoint[img, col]], tl.distance[img, col])
    # through the identities every keypoint's label names its true part, in every pose
    identity = tsc.identities_.reshape(-1)[labels]
    _one_to_one(identity[kept], part_of[kept])


def test_predict_landmarks_with_per_image_centroids():
    import torch

    from pipeline.heads.model import ULDHeads, ULDHeadsConfig
    from pipeline.methods.duld import DULDConfig, predict_landmarks
    from tests.test_duldpp import _SHAPES

    torch.manual_seed(0)
    heads = ULDHeads(ULDHeadsConfig.from_feature_shapes(_SHAPES, crop_size=32, channels=8, hidden=8, descriptor_dim=6))
    g = torch.Generator().manual_seed(1)
    batches = [{"index": torch.arange(b * 3, b * 3 + 3), "features": {k: torch.randn(3, *s, generator=g) for k, s in _SHAPES.items()}}
               for b in range(2)]
    centers = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    cfg = DULDConfig(k=4, views=None)
    shared = predict_landmarks(heads, batches, centers, cfg, progress=False)
    # every image its own order of the same centroids: its landmark columns come out in that order
    perms = np.stack([np.random.default_rng(i).permutation(4) for i in range(6)])
    per = predict_landmarks(heads, batches, centers, cfg, progress=False, image_centers=lambda r: centers[perms[r]])
    rows = np.arange(6)[:, None]
    np.testing.assert_allclose(per.landmarks.coords, shared.landmarks.coords[rows, perms], atol=1e-5)
    np.testing.assert_array_equal(per.fallback, shared.fallback[rows, perms])
