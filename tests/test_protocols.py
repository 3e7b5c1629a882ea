"""Named evaluation protocols (paper / mallis / lstsq) and the box rule, on hand-checkable cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import ConfigError
from pipeline.evaluation import EvalData, evaluate_nme
from pipeline.evaluation.protocols import PROTOCOLS, LeastSquares, Ridge, get_protocol


def test_ridge_by_hand():
    # x = 1, 3 -> centred -1, 1; y = 3, 7 -> centred -2, 2. XtX = 2, XtY = 4, lambda = rel * 2.
    X, Y = np.array([[1.0], [3.0]]), np.array([[3.0], [7.0]])
    r = Ridge(1.0).fit(X, Y)
    assert r.lambda_ == pytest.approx(2.0)
    assert r.coef_[0, 0] == pytest.approx(4.0 / (2.0 + 2.0))  # shrunk slope 1 instead of 2
    assert r.predict(np.array([[2.0]]))[0, 0] == pytest.approx(5.0)  # the means are the bias
    assert Ridge(1e-3).fit(X, Y).coef_[0, 0] == pytest.approx(4.0 / 2.002)


def test_least_squares_has_no_intercept():
    # y = 2x + 1 cannot be fitted through the origin: the best slope for x = 1, 2 is (3+10)/5.
    X, Y = np.array([[1.0], [2.0]]), np.array([[3.0], [5.0]])
    ls = LeastSquares().fit(X, Y)
    assert ls.coef_[0, 0] == pytest.approx(13.0 / 5.0)
    assert ls.predict(np.array([[0.0]]))[0, 0] == 0.0
    # an exactly linear map through the origin is recovered
    X2 = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert np.allclose(LeastSquares().fit(X2, X2 @ np.array([[1.0], [2.0]])).coef_, [[1.0, 2.0]])


def test_registry_settings():
    paper, mallis, lstsq = (get_protocol(n) for n in ("paper", "mallis", "lstsq"))
    assert get_protocol(None) is paper and set(PROTOCOLS) == {"paper", "mallis", "lstsq"}
    assert (paper.forward.rel_lambda, paper.backward.rel_lambda, paper.forward.n_images, paper.forward.repeats) == (1e-3, 0.1, 300, 5)
    assert mallis.forward.rel_lambda == mallis.backward.rel_lambda == 0.1 and mallis.backward.repeats == 10
    assert mallis.fit_for("forward", 5).n_images is None  # 5-point sets: every training image
    assert mallis.fit_for("forward", 68).n_images == 300 and mallis.fit_for("backward", 5).n_images == 300
    assert lstsq.forward.rel_lambda is None and lstsq.forward.n_images is None
    assert isinstance(lstsq.forward.regressor(), LeastSquares) and isinstance(paper.forward.regressor(), Ridge)
    with pytest.raises(ConfigError, match="unknown evaluation protocol"):
        get_protocol("jakab")
    with pytest.raises(ConfigError, match="no forward lambda"):
        lstsq.with_overrides(forward_lambda=0.1)
    o = paper.with_overrides(n_regressor_images=0, repeats=2)
    assert o.forward.n_images is None and o.backward.repeats == 2 and o.name == "paper"


def _through_origin(n: int, seed: int) -> tuple[EvalData, np.ndarray]:
    """5 GT points that are an exact linear map (no offset) of 5 discovered points."""
    disc = np.random.default_rng(seed).uniform(0.2, 0.8, (n, 5, 2))
    M = np.eye(10) + np.random.default_rng(99).normal(0, 0.05, (10, 10))  # one map for every split
    gt = (disc.reshape(n, 10) @ M.T).reshape(n, 5, 2)
    return EvalData(disc, np.ones((n, 5), bool), gt, np.full(n, 0.3)), M


def test_lstsq_recovers_an_exact_map_and_uses_every_image():
    train, _ = _through_origin(40, 0)
    test, _ = _through_origin(20, 1)
    rep = evaluate_nme(train, test, protocol="lstsq")
    assert rep.forward.mean < 1e-8 and rep.backward.mean < 1e-8
    assert rep.counts["n_regressor_images"] == 40 and rep.forward.n_repeats == 1 and rep.protocol == "lstsq"
    # the ridge protocols shrink: a small but non-zero error on the same data
    paper = evaluate_nme(train, test, protocol="paper")
    assert paper.forward.mean > 1e-4 and paper.protocol == "paper"


def test_mallis_sizes_and_lambdas():
    train, _ = _through_origin(400, 2)
    test, _ = _through_origin(30, 3)
    rep = evaluate_nme(train, test, protocol="mallis")
    assert rep.counts["n_regressor_images"] == 400 and rep.forward.n_repeats == 1  # forward: all (5 points)
    assert rep.counts["n_regressor_images_backward"] == 300 and rep.backward.n_repeats == 10
    assert rep.forward.rel_lambda == rep.backward.rel_lambda == 0.1
    # paper's defaults are what evaluate_nme did before protocols existed
    p = evaluate_nme(train, test)
    assert p.counts["n_regressor_images"] == 300 and p.forward.n_repeats == 5 and p.forward.rel_lambda == 1e-3


def test_box_rule_of_the_normaliser():
    from pipeline.datasets.base import DatasetMeta, Manifest, manifest_row

    lm = np.array([[10.0, 10.0], [30.0, 10.0], [20.0, 40.0]])
    rows = [manifest_row("a", "test", "a.png", 100, 64, lm)]
    box = Manifest(pd.DataFrame(rows), DatasetMeta("t", ("a", "b", "c"), normalisation="landmark_box", norm_points=None))
    assert box.normalisers()[0] == pytest.approx(np.sqrt(20 * 30))
    assert box.normalisers("image")[0] == pytest.approx(np.sqrt(100 * 64))
    io = Manifest(pd.DataFrame(rows), DatasetMeta("t", ("a", "b", "c"), normalisation="interocular", norm_points=(0, 1)))
    assert io.normalisers("image")[0] == io.normalisers("landmarks")[0] == pytest.approx(20.0)
    with pytest.raises(ConfigError, match="unknown box rule"):
        box.normalisers("crop")


def test_evaluate_keypoints_records_protocol_and_box(workspace):
    from flows.results import evaluate_keypoints, metrics_table, write_keypoints
    from pipeline.methods.landmarks import LandmarkSet
    from storage.tables import read_table
    from test_zeroshot import build_workspace, make_toy

    toy = make_toy(40, 20, seed=1)
    store = build_workspace(workspace, toy, shard_size=16)
    home = workspace.home
    for split in ("train", "test"):
        idx = store.indices(split)
        lms = LandmarkSet(toy["centres"][idx].astype(np.float32), np.ones((len(idx), 4), bool), np.ones((len(idx), 4), np.float32))
        write_keypoints(home, "r", "m", "s", 0, store, idx, lms)
    a = evaluate_keypoints(home, "r", "toyparts", "m", "s", 0, n_regressor_images=30, repeats=2, plot=False)
    b = evaluate_keypoints(home, "r", "toyparts", "m", "s", 0, protocol="lstsq", box="image", plot=False)
    assert set(a["protocol"]) == {"paper"} and set(b["protocol"]) == {"lstsq"} and set(b["box"]) == {"image"}
    m = metrics_table(home, "r")
    # both evaluations are kept side by side (protocol and box are part of the row key)
    fwd = m[m["metric"] == "nme_forward"].set_index(["protocol", "box"])["value"]
    assert set(fwd.index) == {("paper", "landmarks"), ("lstsq", "image")}
    err = read_table(workspace.run_file("r", "errors.parquet"), "errors")
    assert set(err["protocol"]) == {"paper", "lstsq"}
    assert int(b[(b["metric"] == "nme_forward") & (b["repeat"] == -1)]["n_regressor_images"].iloc[0]) == len(store.indices("train"))
    # every row says how the evaluated images' boxes were made (the toy manifests' own boxes)
    rows = read_table(workspace.run_file("r", "metrics.parquet"), "metrics")
    assert set(rows["box_source"]) == {"file"}


def test_box_source_label():
    from flows.results import box_source_label

    assert box_source_label(np.array(["landmarks"] * 3, dtype=object)) == "landmarks"
    assert box_source_label(np.array(["image", "file", "image"], dtype=object)) == "file+image"
    assert box_source_label(np.array([], dtype=object)) == "none"


def test_metrics_written_before_the_protocol_column_read_as_paper(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.tables import read_table

    df = pd.DataFrame({"run_id": ["old"], "method": ["m"], "stage": ["s"], "round": [0], "dataset": ["d"], "split": ["test"],
                       "metric": ["nme_forward"], "value": [5.0], "k": [10], "n_regressor_images": [300], "repeat": [-1]})
    path = tmp_path / "metrics.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    m = read_table(path, "metrics")
    assert m["protocol"].tolist() == ["paper"] and m["box"].tolist() == ["landmarks"]
    assert m["box_source"].isna().all()  # not recorded then: unknown, not guessed


def test_cli_evaluate_protocol_option_and_summary(workspace):
    import flows.cli_evaluate as cli_evaluate
    from flows.results import write_keypoints
    from pipeline.methods.landmarks import LandmarkSet
    from test_zeroshot import build_workspace, make_toy
    from tiny_runs import invoke_cli

    toy = make_toy(30, 12, seed=2)
    store = build_workspace(workspace, toy, shard_size=16)
    for split in ("train", "test"):
        idx = store.indices(split)
        lms = LandmarkSet(toy["centres"][idx].astype(np.float32), np.ones((len(idx), 4), bool), np.ones((len(idx), 4), np.float32))
        write_keypoints(workspace.home, "r", "m", "s", 0, store, idx, lms)
    res = invoke_cli(workspace.home, cli_evaluate.register, "evaluate", "--run", "r", "--dataset", "toyparts", "--protocol", "lstsq", "--box", "image")
    assert res.exit_code == 0, res.output
    assert "lstsq" in res.output and "image" in res.output and "acc0.2_hungarian" in res.output
    bad = invoke_cli(workspace.home, cli_evaluate.register, "evaluate", "--run", "r", "--dataset", "toyparts", "--protocol", "jakab")
    # refused before anything is evaluated (the real CLI prints this ULDError and exits 2)
    assert isinstance(bad.exception, ConfigError) and "unknown evaluation protocol" in str(bad.exception)


def test_zeroshot_rerun_under_another_protocol_adds_its_rows(workspace, prefect_harness):
    from flows.results import metrics_table
    from flows.zeroshot import zeroshot
    from test_zeroshot import N_PARTS, build_workspace, make_toy

    store = build_workspace(workspace, make_toy(30, 12, seed=4))
    common = dict(home=workspace.home, seed=0, run_id="zs", store_path=store.path, n_init=1, batch_size=8)
    zeroshot("toyparts", "toy", None, N_PARTS + 1, 60, eval_cfg={"n_regressor_images": 20, "repeats": 2}, **common)
    # evaluation settings (and progress bars) are not part of the method's configuration: the same run, more rows
    zeroshot("toyparts", "toy", None, N_PARTS + 1, 60, eval_cfg={"protocol": "mallis", "box": "image"}, progress=False, **common)
    m = metrics_table(workspace.home, "zs")
    fwd = m[m["metric"] == "nme_forward"]
    assert set(zip(fwd["protocol"], fwd["box"])) == {("paper", "landmarks"), ("mallis", "image")}
