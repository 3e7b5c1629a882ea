"""`uld report`: one self-contained HTML page per finished run (tests/tiny_runs.py's runs)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pandas as pd
import pytest

pytest.importorskip("faiss")

from tiny_runs import invoke_cli, DULD_RUN, K, ZEROSHOT_RUN, tiny_runs  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_harness):
    return tiny_runs(tmp_path_factory)


def _cli(home: Path, *args: str):
    from flows import cli_report

    return invoke_cli(home, cli_report.register, *args)


def _embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(d) for d in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def _test_means(home: Path, run_id: str) -> pd.DataFrame:
    from storage.tables import read_table

    m = read_table(home / "runs" / run_id / "metrics.parquet", "metrics")
    return m[(m["repeat"] == -1) & (m["split"] == "test")]


@pytest.mark.parametrize("run_id", [ZEROSHOT_RUN, DULD_RUN])
def test_report_shows_the_runs_metrics_and_embeds_its_figures(runs, tmp_path, run_id):
    from pipeline.report import fmt

    out = tmp_path / "r.html"
    res = _cli(runs.home, "report", run_id, "--out", str(out))
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert "src='file:" not in page and "<img src='figures" not in page  # self-contained: no links to files
    m = _test_means(runs.home, run_id)
    for metric in ("nme_forward", "nme_backward", "acc0.2_hungarian", "fallback_fraction"):
        for value in m[m["metric"] == metric]["value"]:
            assert f"<td>{fmt(value)}</td>" in page, (metric, fmt(value))
    pngs = _embedded_pngs(page)
    assert pngs and all(p.startswith(PNG_MAGIC) for p in pngs)
    # the run's own contact sheet is embedded byte for byte
    sheet = (runs.home / "runs" / run_id / "figures" / f"{run_id.split('-')[0]}-test-landmarks.png").read_bytes()
    assert sheet in pngs
    assert "per-landmark Hungarian accuracy" in page and "landmark presence" in page and "NME per yaw bin" in page
    assert "crop_margin" in page and "timesteps" in page  # the feature spec, read from the run's store
    if run_id == DULD_RUN:
        assert "NME per round" in page  # bootstrap + one self-training round
    else:
        assert "silhouette" in page  # ZeroShot's cluster quality
    assert page.count("<tr><td>") >= K  # one presence row per discovered landmark (and the metric rows)


def test_report_default_path_is_inside_the_run_folder_and_takes_a_folder(runs, tmp_path):
    home = tmp_path / "workspace"
    shutil.copytree(runs.home / "runs" / ZEROSHOT_RUN, home / "runs" / ZEROSHOT_RUN)
    res = _cli(tmp_path / "elsewhere", "report", str(home / "runs" / ZEROSHOT_RUN))
    assert res.exit_code == 0, res.output
    assert (home / "runs" / ZEROSHOT_RUN / "report.html").is_file()


def test_report_of_a_run_without_its_feature_store_or_metrics_still_renders(runs, tmp_path):
    from flows.report import write_report

    run = tmp_path / "workspace" / "runs" / DULD_RUN
    shutil.copytree(runs.home / "runs" / DULD_RUN, run)
    cfg = (run / "config.json").read_text()
    (run / "config.json").write_text(re.sub(r'"feature_store": "[^"]*"', '"feature_store": "gone/features/x.zarr/abc"', cfg))
    (run / "metrics.parquet").unlink()
    page = write_report(run, tmp_path / "r.html").read_text()
    assert "feature spec not shown" in page and "no metrics.parquet" in page
    assert _embedded_pngs(page)  # the contact sheet and the presence plot are still there


def test_report_of_a_folder_that_is_not_a_run_exits_2_without_traceback(tmp_path):
    (tmp_path / "notarun").mkdir()
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "ULD_HOME": str(tmp_path / "ws"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", "report", str(tmp_path / "notarun")],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert out.returncode == 2, out.stderr
    assert "not a run folder" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "notarun" / "report.html").exists()


def test_report_of_two_runs_writes_html_and_markdown_twin(runs, tmp_path):
    out = tmp_path / "compare"
    res = _cli(runs.home, "report", ZEROSHOT_RUN, DULD_RUN, "--out", str(out))
    assert res.exit_code == 0, res.output
    page, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    for text in (page, md):
        assert ZEROSHOT_RUN in text and DULD_RUN in text
    assert "src='file:" not in page and _embedded_pngs(page)
    # the comparison table carries each run's last-stage forward NME (as the report formats it)
    from pipeline.report import fmt

    for run_id in (ZEROSHOT_RUN, DULD_RUN):
        m = _test_means(runs.home, run_id)
        assert f"<td>{fmt(m[m['metric'] == 'nme_forward']['value'].iloc[-1])}</td>" in page
    # every image the Markdown names is a PNG beside it
    names = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert {"ced.png", "hungarian.png", "regressor_images.png", "landmarks_0.png", "landmarks_1.png"} <= set(names)
    for name in names:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    assert "NME against the number of regressor images" in page and "CED curves" in page and "NME per round" in page


def test_regressor_size_curve_of_a_run(runs):
    from flows.results import regressor_size_curve

    curve = regressor_size_curve(runs.home, ZEROSHOT_RUN, "synthetic", "zeroshot", "zeroshot", 0, (10, 300))
    assert set(curve["direction"]) == {"forward", "backward"}
    # 300 is more than the 24 training images: fitted on the whole pool once
    assert curve[curve["n_images"] == 300]["n_fit"].tolist() == [24, 24]
    assert curve[curve["n_images"] == 10]["n_repeats"].tolist() == [5, 5] and curve["nme"].notna().all()


def test_report_of_several_runs_needs_an_out_folder(runs):
    res = _cli(runs.home, "report", ZEROSHOT_RUN, DULD_RUN)
    assert "needs a folder" in str(res.exception)


def test_demo_report_task_writes_the_run_reports_and_their_comparison(runs):
    from flows.demo import report_task

    paths = report_task.fn(runs.home, {"ZeroShot": ZEROSHOT_RUN, "D-ULD": DULD_RUN}, "demo-tiny")
    assert [p.name for p in paths] == ["report.html", "report.html", "report.html", "report.md"]
    assert paths[2] == runs.home / "reports" / "demo-tiny" / "report.html"
    assert ZEROSHOT_RUN in paths[3].read_text() and DULD_RUN in paths[3].read_text()
