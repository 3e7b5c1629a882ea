"""`uld deploy`: the entry flows as deployments, served by a local process against a real `uld ui` server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_entry_flows_have_plain_parameter_forms_and_unknown_names_are_refused(tmp_path):
    from flows.deployments import ENTRY_FLOWS, build_deployments
    from pipeline.errors import ConfigError

    deps = build_deployments(tmp_path / "ws", "cpu")
    assert sorted(d.flow_name for d in deps) == sorted(f.name for f in ENTRY_FLOWS.values())
    train = next(d for d in deps if d.flow_name == "uld-train")
    props = train._parameter_openapi_schema.properties
    # The UI form: what a user sets per run.
    assert {"dataset", "method", "k", "rounds", "backbone", "home"} <= set(props)
    assert train.parameters == {"home": str((tmp_path / "ws").resolve()), "device": "cpu"}
    assert train.entrypoint.endswith("flows/deployments.py:train_entry")
    with pytest.raises(ConfigError, match="unknown deployment"):
        build_deployments(tmp_path, only=["nope"])


@pytest.mark.slow
def test_served_features_deployment_runs_from_the_api_and_writes_its_store(tmp_path):
    from pipeline.datasets.registry import get_loader
    from pipeline.datasets.synthetic import generate_synthetic
    from storage.layout import Workspace

    home = tmp_path / "ws"
    ws = Workspace(home)
    root = generate_synthetic(tmp_path / "synthetic", 6, 2, 32, 0)
    for split in ("train", "test"):
        get_loader("synthetic").load(root, split)[0].save(ws.manifest("synthetic", split))

    port = _free_port()
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "ULD_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    uld = [sys.executable, "-c", "from flows.cli import main; main()"]
    up = subprocess.run([*uld, "ui", "--port", str(port)], capture_output=True, text=True, env=env, timeout=400, cwd=REPO)
    assert up.returncode == 0, up.stderr
    import urllib.request

    # The browser UI must call the API on this port, not Prefect's default 4200.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as resp:
        assert json.load(resp)["api_url"] == f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen([*uld, "deploy", "--only", "features"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    try:
        # A client in another process: wait for the deployment, start a run with UI-style parameters, wait for it.
        code = (
            "import json, time, asyncio\n"
            "from prefect.client.orchestration import get_client\n"
            "from prefect.deployments import run_deployment\n"
            "async def wait():\n"
            "    async with get_client() as c:\n"
            "        for _ in range(300):\n"
            "            try:\n"
            "                return await c.read_deployment_by_name('uld-features/local')\n"
            "            except Exception:\n"
            "                await asyncio.sleep(1)\n"
            "asyncio.run(wait())\n"
            "run = run_deployment('uld-features/local', parameters={'dataset': 'synthetic', 'backbone': 'pixels', 'size': 32, 'shard_size': 4},"
            " timeout=400, poll_interval=2)\n"
            "print(json.dumps({'state': run.state.type.value, 'name': run.name}))\n"
        )
        client_env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=client_env, timeout=500, cwd=REPO)
        assert child.returncode == 0, child.stderr[-3000:]
        result = json.loads(child.stdout.strip().splitlines()[-1])
        assert result["state"] == "COMPLETED", result
        stores = list((home / "features" / "synthetic").glob("pixels.zarr/*/zarr.json"))
        assert len(stores) == 1
        from storage.features import FeatureStore

        store = FeatureStore.open(stores[0].parent)
        assert store.is_complete() and len(store) == 8 and store.n_shards() == 2
    finally:
        server.terminate()  # the serve process this test started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        subprocess.run([*uld, "ui", "--stop"], capture_output=True, text=True, env=env, timeout=120, cwd=REPO)


def test_zeroshot_and_train_entry_flows_run_the_stage_flows_with_form_parameters(prefect_harness, tmp_path):
    """What a UI form sends reaches the real stage flows: a ZeroShot run and a one-round D-ULD run."""
    from flows.deployments import train_entry, zeroshot_entry
    from pipeline.datasets.registry import get_loader
    from pipeline.datasets.synthetic import generate_synthetic
    from storage.layout import Workspace

    home = tmp_path / "ws"
    ws = Workspace(home)
    root = generate_synthetic(tmp_path / "synthetic", 12, 4, 32, 0)
    for split in ("train", "test"):
        get_loader("synthetic").load(root, split)[0].save(ws.manifest("synthetic", split))
    run = zeroshot_entry("synthetic", k=3, backbone="pixels", size=32, run_id="zs-form", n_samples_per_image=20, device="cpu", home=str(home))
    assert run == "zs-form" and (ws.run_dir("zs-form") / "keypoints.parquet").is_file()
    folder = train_entry("synthetic", method="mallis-d", k=3, rounds=1, steps_per_round=2, bootstrap_steps=2, backbone="pixels", size=32,
                         run_id="md-form", device="cpu", home=str(home))
    assert folder == str(ws.run_dir("md-form"))
    import json

    assert json.loads((ws.run_dir("md-form") / "config.json").read_text())["method"] == "mallis-d"
    assert (ws.run_dir("md-form") / "metrics.parquet").is_file()
