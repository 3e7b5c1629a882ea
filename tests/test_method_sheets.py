"""Every method run writes a landmark contact sheet of test crops (ZeroShot, D-ULD, the reference baselines)
and every method command prints the same summary columns (flows.summary)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from PIL import Image

pytest.importorskip("faiss")

from tiny_runs import DULD_RUN, K, SIZE, ZEROSHOT_RUN, invoke_cli, tiny_runs  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_harness):
    return tiny_runs(tmp_path_factory)


def test_every_method_run_has_a_contact_sheet(runs):
    from flows.zeroshot import reference_baseline

    rid = reference_baseline("synthetic", "mean-shape", runs.backbone, None, home=runs.home, run_id="baseline-sheet",
                             store_path=runs.store, eval_cfg={"n_regressor_images": 10, "repeats": 2})
    for run_id, method in ((ZEROSHOT_RUN, "zeroshot"), (DULD_RUN, "duld"), (rid, "baseline-mean-shape")):
        sheet = runs.home / "runs" / run_id / "figures" / f"{method}-test-landmarks.png"
        assert sheet.is_file(), sheet
        with Image.open(sheet) as im:
            assert im.format == "PNG" and min(im.size) > 100


def test_duld_prints_the_zeroshot_summary_columns_under_the_chosen_protocol(runs):
    from flows import cli_duld
    from flows.summary import summary_table

    res = invoke_cli(runs.home, cli_duld.register, "--seed", "0", "duld", "--dataset", "synthetic", "--backbone", runs.backbone,
                     "--store", str(runs.store), "-k", str(K), "--size", str(SIZE), "--steps-per-round", "2", "--bootstrap-steps", "2",
                     "--batch-size", "6", "--views", "0", "--no-progress", "--rounds", "0", "--run-id", "duld-lstsq",
                     "--protocol", "lstsq", "--box", "image")
    assert res.exit_code == 0, res.output
    assert "acc0.2_hungarian" in res.output and "lstsq" in res.output and "run: duld-lstsq" in res.output
    zs, dl = summary_table(runs.home, ZEROSHOT_RUN), summary_table(runs.home, "duld-lstsq")
    for col in ("nme_forward", "nme_backward", "acc0.2_hungarian", "n_regressor_images"):
        assert col in zs.columns and col in dl.columns
    assert set(dl.index.get_level_values("protocol")) == {"lstsq"} and set(dl.index.get_level_values("box")) == {"image"}
