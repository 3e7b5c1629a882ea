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


def _no_op_cli(home: Path, bb: str, tmp_path: Path) -> tuple[str, dict]:
    """Run the no-op `uld features` in a fresh process: its stdout (less the time line) and which heavy modules it imported."""
    code = (
        "import sys, json\nfrom flows.cli import main\n"
        f"sys.argv = ['uld', '--home', {str(home)!r}, 'features', '-d', 'toy', '-b', {bb!r}, '--size', '32', '--timesteps', '10', '--crop-margin', '0.1']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(json.dumps({m: m in sys.modules for m in ('torch', 'prefect', 'pandas', 'zarr', 'numpy')}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(tmp_path / "p")})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    return "\n".join(line for line in lines[:-1] if not line.startswith("time:")), json.loads(lines[-1])


def test_recorded_no_op_needs_neither_pandas_nor_zarr_and_still_sees_damage(prefect_harness, tmp_path):
    import os

    from flows.feature_plan import recorded_no_op
    from flows.features import extract_features
    from storage.completion_cache import recorded_manifest

    home = tmp_path / "ws"
    _toy(home, tmp_path / "images")
    bb = make_backbone(tmp_path / "bb", seed=0)
    path = extract_features("toy", bb, SPEC, home=home, shard_size=4)  # records manifests and the finished store
    cache = home / "cache"
    assert (cache / "complete-stores.json").is_file() and (cache / "manifest-fingerprints.json").is_file()

    fast, modules = _no_op_cli(home, bb, tmp_path)
    assert "nothing to do" in fast and str(path) in fast
    assert modules == {"torch": False, "prefect": False, "pandas": False, "zarr": False, "numpy": False}
    found = recorded_no_op("toy", bb, SPEC, home=home)
    assert found is not None and found[0] == path and found[1] is not None  # answered by the record

    # Without the records, the ordinary check prints the same lines (and writes the records again).
    (cache / "complete-stores.json").unlink()
    (cache / "manifest-fingerprints.json").unlink()
    slow, modules = _no_op_cli(home, bb, tmp_path)
    assert slow == fast and modules["zarr"] and modules["pandas"] and not modules["torch"]
    assert recorded_no_op("toy", bb, SPEC, home=home)[1] is not None

    # A shard index damaged in place, size and mtime put back: the stat matches, its CRC32C does not.
    shard = next((path / "features").rglob("c/1/0/0/0"))
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    with open(shard, "r+b") as fh:  # in place: same inode
        fh.write(data)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert recorded_no_op("toy", bb, SPEC, home=home) is None  # the ordinary check finds it damaged
    data[-10] ^= 0xFF
    with open(shard, "r+b") as fh:
        fh.write(data)
    # A deleted shard file: not finished.
    saved = shard.read_bytes()
    shard.unlink()
    assert recorded_no_op("toy", bb, SPEC, home=home) is None
    shard.write_bytes(saved)
    assert recorded_no_op("toy", bb, SPEC, home=home) is not None

    # A rewritten manifest (a new file, even with the same content) is not trusted from the record.
    from storage.layout import Workspace

    train = Workspace(home).manifest("toy", "train")
    paths = [train, Workspace(home).manifest("toy", "test")]
    assert recorded_manifest(home, "toy", paths) is not None
    body = train.read_bytes()
    train.unlink()
    train.write_bytes(body)
    assert recorded_manifest(home, "toy", paths) is None
    assert recorded_no_op("toy", bb, SPEC, home=home) is not None  # same content: the ordinary path agrees
    assert recorded_manifest(home, "toy", paths) is not None  # and records it again


def test_invoked_command_skips_root_options_and_their_values():
    from flows.cli import invoked_command

    assert invoked_command(["--home", "features", "features", "-d", "toy"]) == "features"  # --home's value is not the command
    assert invoked_command(["--home=/w", "--seed", "3", "zeroshot"]) == "zeroshot"
    assert invoked_command(["--help"]) is None and invoked_command([]) is None


def test_store_url_as_a_local_folder_gives_the_same_bytes_and_records_the_no_op(prefect_harness, tmp_path):
    from flows.feature_plan import recorded_no_op
    from flows.features import extract_features
    from storage.features import FeatureStore

    home = tmp_path / "ws"
    _toy(home, tmp_path / "images")
    bb = make_backbone(tmp_path / "bb", seed=0)
    default = extract_features("toy", bb, SPEC, home=home, shard_size=4)
    elsewhere = extract_features("toy", bb, SPEC, home=home, shard_size=4, store_url=str(tmp_path / "elsewhere"))
    # Same layout below the folder as below <home>/features, same hash, same bytes in every file.
    assert elsewhere == tmp_path / "elsewhere" / default.relative_to(home / "features")
    files = sorted(p.relative_to(default) for p in default.rglob("*") if p.is_file() and p.name != "zarr.json")
    assert files == sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*") if p.is_file() and p.name != "zarr.json")
    assert all((default / f).read_bytes() == (elsewhere / f).read_bytes() for f in files)
    a, b = FeatureStore.open(default), FeatureStore.open(elsewhere)
    assert a.config == b.config and a.config_hash == b.config_hash
    found = recorded_no_op("toy", bb, SPEC, home=home, store_url=str(tmp_path / "elsewhere"))
    assert found is not None and found[0] == elsewhere and found[1] is not None  # answered by the completion record
