"""A finished store is found from the backbone's recorded identity without building the model;
a changed backbone file still names a new store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.backbones.base import FeatureSpec
from pipeline.datasets.base import DatasetMeta, Manifest, manifest_row
from storage.layout import Workspace
from tests.tiny_runs import make_backbone

REPO = Path(__file__).resolve().parents[1]
SPEC = FeatureSpec(image_size=32, timesteps=(10,), crop_margin=0.1)


def _toy(home: Path, images: Path, n: int = 6) -> None:
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = images / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(path)
        split = "train" if i < n - 2 else "test"
        rows.append(manifest_row(f"im{i}", split, str(path), 36, 40, np.array([[10.0, 12.0]], np.float32), bbox=(4.0, 4.0, 30.0, 34.0)))
    frame = pd.DataFrame(rows)
    ws = Workspace(home)
    for split in ("train", "test"):
        Manifest(frame[frame["split"] == split].reset_index(drop=True), DatasetMeta(name="toy", landmark_names=("a",))).save(ws.manifest("toy", split))


def _flow_run_names() -> list[str]:
    import urllib.request

    from prefect.settings import get_current_settings

    req = urllib.request.Request(f"{get_current_settings().api.url}/flow_runs/filter", data=json.dumps({"limit": 50, "offset": 0}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return [r["name"] for r in json.load(resp)]


def _no_model(monkeypatch) -> None:
    """Building any backbone now fails the test."""
    from pipeline.backbones import ddpm, loading

    def refuse(*a, **k):
        raise AssertionError("the no-op path built the backbone model")

    monkeypatch.setattr(ddpm.CategoryDDPM, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(loading, "load_backbone", refuse)


def test_no_op_skips_the_model_and_a_changed_backbone_gets_a_new_store(prefect_harness, tmp_path, monkeypatch):
    from flows.feature_plan import recorded_store_path
    from flows.features import complete_store_path, extract_features
    from storage.backbone_identities import identity_cache

    home = tmp_path / "ws"
    _toy(home, tmp_path / "images")
    bb = make_backbone(tmp_path / "bb", seed=0)
    assert recorded_store_path("toy", bb, SPEC, home=home) is None  # nothing recorded yet
    first = extract_features("toy", bb, SPEC, home=home, shard_size=4)
    assert identity_cache(home).lookup(Path(bb)) is not None
    assert "features-toy" in _flow_run_names()  # the UI lists the run by stage and dataset

    with monkeypatch.context() as m:
        _no_model(m)
        assert recorded_store_path("toy", bb, SPEC, home=home) == first
        assert complete_store_path("toy", bb, SPEC, home=home) == first
        # Another spec has no store yet: not found (the ordinary path would decide).
        assert recorded_store_path("toy", bb, FeatureSpec(image_size=32, timesteps=(20,), crop_margin=0.1), home=home) is None
        # A store with a deleted shard file is not "finished".
        shard = next((first / "features").rglob("c/0/0/0/0"))
        data = shard.read_bytes()
        shard.unlink()
        assert recorded_store_path("toy", bb, SPEC, home=home) is None
        shard.write_bytes(data)
        assert recorded_store_path("toy", bb, SPEC, home=home) == first

    # New weights in the same folder: the record no longer applies, the model is loaded, new store.
    make_backbone(Path(bb), seed=1)
    assert recorded_store_path("toy", bb, SPEC, home=home) is None
    assert complete_store_path("toy", bb, SPEC, home=home) is None
    second = extract_features("toy", bb, SPEC, home=home, shard_size=4)
    assert second != first and second.parent == first.parent


def test_cli_no_op_imports_neither_torch_nor_prefect(prefect_harness, tmp_path):
    from flows.features import extract_features

    home = tmp_path / "ws"
    _toy(home, tmp_path / "images")
    bb = make_backbone(tmp_path / "bb", seed=0)
    extract_features("toy", bb, SPEC, home=home, shard_size=4)
    code = (
        "import sys\nfrom flows.cli import main\n"
        f"sys.argv = ['uld', '--home', {str(home)!r}, 'features', '-d', 'toy', '-b', {bb!r}, '--size', '32', '--timesteps', '10', '--crop-margin', '0.1']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules, 'prefect': 'prefect' in sys.modules}))\n"
    ).replace("import sys", "import sys, json", 1)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(tmp_path / "p")})
    assert out.returncode == 0, out.stderr
    assert "nothing to do" in out.stdout
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "torch": False, "prefect": False}
