"""`uld ablation` on the tiny workspace: every Table 2 row written to Parquet and Markdown; a re-run resumes without training."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from tests.tiny_runs import K, SIZE, invoke_cli, tiny_runs

ABLATION = "tiny"


def _register(app) -> None:
    from flows import cli_ablation

    cli_ablation.register(app)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_harness):
    return tiny_runs(tmp_path_factory)


def _invoke(runs, out):
    return invoke_cli(runs.home, _register, "ablation", "--dataset", "synthetic", "--store", str(runs.store), "--backbone", runs.backbone,
                      "--seeds", "0", "-k", str(K), "--size", str(SIZE), "--rounds", "1", "--steps-per-round", "2", "--bootstrap-steps", "2",
                      "--batch-size", "6", "--q", "2", "--proxy-steps", "2", "--tsc-rounds", "1", "--views", "0", "--ablation-id", ABLATION,
                      "--out", str(out))


def _run_files(home) -> dict[str, int]:
    """mtime (ns) of every checkpoint and ZeroShot model file of the ablation's runs."""
    files = {}
    for run in (home / "runs").glob(f"abl-{ABLATION}-*"):
        for path in list(run.glob("checkpoints/*/*")) + list(run.glob("zeroshot/model/*")) + list(run.glob("zeroshot/*.npy")):
            files[str(path.relative_to(home))] = path.stat().st_mtime_ns
    return files


def test_ablation_writes_every_row_and_resumes(runs, tmp_path):
    from flows.ablation_table import ROWS
    from storage.layout import Workspace
    from storage.tables import read_table

    out = tmp_path / "table.md"
    t0 = time.perf_counter()
    res = _invoke(runs, out)
    first = time.perf_counter() - t0
    assert res.exit_code == 0, res.output

    folder = Workspace(runs.home).ablation_dir(ABLATION)
    frame = read_table(folder / "ablation.parquet", "ablation")
    assert [r for r in frame["row"].drop_duplicates()] == [r.label for r in ROWS]
    assert set(frame["pick"]) == {"last", "best"} and set(frame["seed"]) == {0}
    from flows.ablation_table import METRICS

    assert (frame["note"] == "").all()  # every row is run, "+ TSC w/ full VAE" included
    ran = frame
    main = ran[ran["metric"].isin(METRICS)]
    assert main["value"].notna().all() and (main["value"] >= 0).all()
    # each row reads its own stage: the proxy row is D-ULD++'s proxy stage (round rounds + 1), the TSC row its last TSC round
    last = ran[ran["pick"] == "last"].drop_duplicates("row").set_index("row")
    assert last.loc["D-ULD", ["stage", "round"]].tolist() == ["round", 1]
    assert last.loc["D-ULD + PP (pose proxy)", ["stage", "round"]].tolist() == ["proxy", 2]
    assert last.loc["+ TSC (D-ULD++)", ["stage", "round"]].tolist() == ["duldpp", 3]
    assert last.loc["+ TSC w/ full VAE", ["stage", "round", "method"]].tolist() == ["duldpp", 3, "duld++"]
    assert last.loc["+ TSC w/ full VAE", "run_id"] == f"abl-{ABLATION}-duldpp-fullvae-s0"
    assert last.loc["Mallis (D)", "method"] == "mallis-d"
    # the best round is never worse than the last one in forward NME
    fwd = ran[ran["metric"] == "nme_forward"].pivot_table(index="row", columns="pick", values="value")
    assert len(fwd) == len(ROWS)
    assert (fwd["best"] <= fwd["last"] + 1e-12).all()
    # the two ZeroShot rows differ in their cluster rule (paper: M = K)
    import json

    for key, m in (("zeroshot-paper", K), ("zeroshot", 4 * K)):
        cfg = json.loads((Workspace(runs.home).run_dir(f"abl-{ABLATION}-{key}-s0") / "config.json").read_text())
        assert cfg["model"]["n_candidates"] == m
    # the ablation is incremental: D-ULD++'s D-ULD rounds are the D-ULD run's (same engine path, seeds and schedule)
    from flows.results import metrics_table

    def round_nme(key: str) -> float:
        m = metrics_table(runs.home, f"abl-{ABLATION}-{key}-s0")
        return float(m[(m["round"] == 1) & (m["split"] == "test") & (m["metric"] == "nme_forward")]["value"].iloc[0])

    assert round_nme("duldpp") == round_nme("duld")
    # the two TSC rows are one D-ULD++ schedule up to its proxy stage, then Eq. 3 vs the full VAE's ELBO
    def proxy_nme(key: str) -> float:
        m = metrics_table(runs.home, f"abl-{ABLATION}-{key}-s0")
        return float(m[(m["stage"] == "proxy") & (m["split"] == "test") & (m["metric"] == "nme_forward")]["value"].iloc[0])

    assert proxy_nme("duldpp-fullvae") == proxy_nme("duldpp")
    for key, loss in (("duldpp", "eq3"), ("duldpp-fullvae", "elbo")):
        cfg = json.loads((Workspace(runs.home).run_dir(f"abl-{ABLATION}-{key}-s0") / "config.json").read_text())
        assert cfg["duldpp"]["tsc_loss"] == loss
    # NME per yaw bin for every row (the synthetic heads have yaw)
    from pipeline.evaluation import yaw_bin_labels

    yaw = ran[ran["metric"].str.startswith("nme_forward_yaw") & (ran["pick"] == "last")]
    assert set(yaw["row"]) == {r.label for r in ROWS}
    assert set(yaw["metric"]) == {f"nme_forward_yaw{b}" for b in yaw_bin_labels()}
    assert yaw["value"].notna().any()

    text = (folder / "ablation.md").read_text()
    assert out.read_text() == text
    for row in ROWS:
        assert f"| {row.label} |" in text
    assert "not run:" not in text and "| D-ULD | " in text and "D-ULD" in res.output
    yaw_part = text.split("Forward NME per yaw bin", 1)[1]
    assert "Backward NME per yaw bin" in yaw_part
    assert all(f"| {row.label} |" in yaw_part for row in ROWS) and "| row | " + " | ".join(yaw_bin_labels()) + " |" in yaw_part

    before = _run_files(runs.home)
    assert any("/checkpoints/duldpp-003/" in p for p in before) and any("zeroshot/model" in p for p in before)
    assert any("-duldpp-fullvae-s0/checkpoints/duldpp-003/" in p for p in before)
    t0 = time.perf_counter()
    again = _invoke(runs, out)
    second = time.perf_counter() - t0
    assert again.exit_code == 0, again.output
    assert _run_files(runs.home) == before  # nothing re-trained or re-clustered
    assert "| + TSC (D-ULD++) |" in again.output
    frame2 = read_table(folder / "ablation.parquet", "ablation")
    pd.testing.assert_frame_equal(frame2, frame)
    print(f"ablation: first run {first:.1f} s, re-run {second:.1f} s")
    assert second < first, (first, second)


def test_ablation_refuses_other_settings_under_the_same_id(runs, tmp_path):
    from pipeline.errors import ConfigError
    from storage.layout import Workspace
    from flows.ablation import _check_settings

    ws = Workspace(tmp_path / "ws")
    _check_settings(ws, "a", {"k": 4, "rounds": 1})
    _check_settings(ws, "a", {"k": 4, "rounds": 1})  # same settings: fine
    with pytest.raises(ConfigError, match="rounds"):
        _check_settings(ws, "a", {"k": 4, "rounds": 2})


def test_ablation_cli_refuses_repeated_seeds(tmp_path):
    from flows.ablation import check_seeds
    from pipeline.errors import ConfigError

    assert check_seeds([2, 0]) == (2, 0)
    with pytest.raises(ConfigError, match="distinct"):
        check_seeds([0, 0])
    res = invoke_cli(tmp_path / "ws", _register, "ablation", "--dataset", "synthetic", "--seeds", "1,1")
    assert res.exit_code != 0 and isinstance(res.exception, ConfigError)


def test_markdown_mean_and_std_over_seeds():
    from flows.ablation_table import BEST, LAST, METRICS, ROWS, render_markdown

    recs = []
    for row in ROWS:
        for seed, base in ((0, 1.0), (1, 3.0)):
            for pick in (LAST, BEST):
                for metric in METRICS:
                    recs.append({"row": row.label, "seed": seed, "pick": pick, "stage": "round", "round": 1, "metric": metric,
                                 "value": np.nan if row.not_run else base})
    text = render_markdown(pd.DataFrame(recs), "t")
    # mean 2, sample std sqrt(2) = 1.41
    assert "| D-ULD | 2.00 +- 1.41 | 2.00 +- 1.41 | 2.000 +- 1.414 |" in text
    assert "per yaw bin" not in text  # no yaw metrics (e.g. MTFL): no yaw tables

    # yaw bins in yaw order, whatever order the rows come in; a bin only one seed has shows that seed's value
    bins = ["[54,90]", "[-90,-54)"]
    yaw = [{"row": row.label, "seed": seed, "pick": LAST, "stage": "round", "round": 1, "metric": f"nme_{d}_yaw{b}",
            "value": 10.0 * (seed + 1) if b == "[-90,-54)" else (5.0 if seed == 0 else np.nan)}
           for row in ROWS for seed in (0, 1) for b in bins for d in ("forward", "backward")]
    text = render_markdown(pd.DataFrame(recs + yaw), "t")
    fwd = text.split("Forward NME per yaw bin", 1)[1].split("Backward NME per yaw bin", 1)[0]
    assert "| row | [-90,-54) | [54,90] |" in fwd
    assert "| D-ULD | 15.00 +- 7.07 | 5.00 |" in fwd
