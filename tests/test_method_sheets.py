"""Every method run writes a landmark contact sheet of test crops (ZeroShot, D-ULD, the reference baselines)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from PIL import Image

pytest.importorskip("faiss")

from tiny_runs import DULD_RUN, ZEROSHOT_RUN, tiny_runs  # noqa: E402


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
