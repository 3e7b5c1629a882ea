"""The reused local Prefect server: record, health check, fallback, and a real server end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from flows import local_server
from flows.local_server import ServerInfo, read_server, running_server, server_file, use_running_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    httpd = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()


def test_no_record_or_a_stale_one_falls_back_to_the_temporary_server(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert read_server(tmp_path) is None and use_running_server(tmp_path) is None
    server_file(tmp_path).write_text(json.dumps({"pid": 999999, "port": _free_port(), "host": "127.0.0.1"}))
    assert read_server(tmp_path) is not None
    assert running_server(tmp_path) is None  # nobody listens: refused at once
    assert use_running_server(tmp_path) is None and "PREFECT_API_URL" not in os.environ
    server_file(tmp_path).write_text("{not json")
    assert read_server(tmp_path) is None


def test_a_recorded_answering_server_is_used_and_a_users_url_is_kept(tmp_path, monkeypatch, health_server):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    server_file(tmp_path).write_text(json.dumps({"pid": os.getpid(), "port": health_server}))
    assert use_running_server(tmp_path) == f"http://127.0.0.1:{health_server}/api"
    assert os.environ["PREFECT_API_URL"] == f"http://127.0.0.1:{health_server}/api"
    monkeypatch.setenv("PREFECT_API_URL", "http://elsewhere:1/api")
    assert use_running_server(tmp_path) is None and os.environ["PREFECT_API_URL"] == "http://elsewhere:1/api"


def test_cli_defaults_pick_up_the_workspaces_server(tmp_path, monkeypatch, health_server):
    from flows import cli

    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    ws = tmp_path / "ws"
    (ws / ".prefect").mkdir(parents=True)
    server_file(ws / ".prefect").write_text(json.dumps({"pid": os.getpid(), "port": health_server}))
    cli._prefect_defaults(ws)
    assert os.environ["PREFECT_API_URL"] == f"http://127.0.0.1:{health_server}/api"


def test_a_port_held_by_a_foreign_server_is_a_user_error(tmp_path, health_server):
    from pipeline.errors import WorkspaceError

    with pytest.raises(WorkspaceError, match="another Prefect server"):
        local_server.start_server(tmp_path / "prefect", port=health_server)
    with pytest.raises(WorkspaceError, match="not a TCP port"):
        local_server.start_server(tmp_path / "prefect", port=70000)


def test_stop_without_a_record_does_nothing(tmp_path):
    assert local_server.stop_server(tmp_path) is None


@pytest.mark.slow
def test_uld_ui_starts_a_real_server_that_commands_report_to_then_stops_it(tmp_path):
    """`uld ui` -> a flow run of another process lands in that server -> `uld ui --stop`."""
    port = _free_port()
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "ULD_HOME": str(tmp_path / "ws"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    run = lambda *a: subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", *a], capture_output=True, text=True, env=env, timeout=400)  # noqa: E731
    out = run("ui", "--port", str(port))
    prefect_home = tmp_path / "ws" / ".prefect"
    try:
        assert out.returncode == 0, out.stderr
        assert f"http://127.0.0.1:{port}" in out.stdout
        assert read_server(prefect_home) == ServerInfo(pid=read_server(prefect_home).pid, port=port)
        again = run("ui", "--port", str(port))
        assert "already running" in again.stdout
        # A flow in a fresh process, with the CLI's defaults: it must report to the server.
        code = (
            "from flows import cli; cli._prefect_defaults(); import os; print(os.environ['PREFECT_API_URL'])\n"
            "from prefect import flow\n@flow(name='probe-flow')\ndef f(): return 1\nf()\n"
            "import json, urllib.request as u\n"
            "req = u.Request(os.environ['PREFECT_API_URL'] + '/flows/filter', data=b'{\"limit\": 10}', headers={'Content-Type': 'application/json'})\n"
            "print([r['name'] for r in json.load(u.urlopen(req))])"
        )
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=400, cwd=Path(__file__).parents[1])
        assert child.returncode == 0, child.stderr
        assert f"127.0.0.1:{port}/api" in child.stdout and "probe-flow" in child.stdout
    finally:
        stopped = run("ui", "--stop")
    assert "stopped" in stopped.stdout and not server_file(prefect_home).exists()
    assert not local_server.is_healthy(f"http://127.0.0.1:{port}/api")


def test_a_non_loopback_host_without_an_auth_string_is_refused_before_starting(tmp_path, monkeypatch):
    from pipeline.errors import WorkspaceError

    monkeypatch.delenv(local_server.SERVER_AUTH_ENV, raising=False)
    with pytest.raises(WorkspaceError, match="would let anyone who reaches port") as err:
        local_server.start_server(tmp_path / "prefect", port=_free_port(), host="0.0.0.0")
    assert local_server.SERVER_AUTH_ENV in err.value.fix
    assert not server_file(tmp_path / "prefect").exists()


@pytest.mark.slow
def test_uld_ui_on_every_interface_demands_the_auth_string_and_commands_send_it(tmp_path):
    """`uld ui --host 0.0.0.0` with PREFECT_SERVER_API_AUTH_STRING: a request without the string is
    refused (401), the workspace's commands send it and their flow runs land in the server."""
    import base64
    import json
    import urllib.error
    import urllib.request

    port = _free_port()
    auth = "uld:test-secret"
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "ULD_HOME": str(tmp_path / "ws"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           local_server.SERVER_AUTH_ENV: auth}
    run = lambda *a: subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", *a], capture_output=True, text=True, env=env, timeout=400)  # noqa: E731
    out = run("ui", "--port", str(port), "--host", "0.0.0.0")
    prefect_home = tmp_path / "ws" / ".prefect"
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert read_server(prefect_home).host == "0.0.0.0" and read_server(prefect_home).auth and f"http://127.0.0.1:{port}" in out.stdout
        assert auth not in server_file(prefect_home).read_text()  # the record says "auth", never the string
        again = run("ui", "--port", str(port))  # the default host, while it runs on 0.0.0.0: said, not reused silently
        assert again.returncode == 2 and "already runs on 0.0.0.0" in again.stderr, again.stdout + again.stderr
        assert "other machines" in out.stdout and "PREFECT_API_AUTH_STRING" in out.stdout and auth not in out.stdout
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/flows/filter", data=b"{}", timeout=30)
        assert refused.value.code == 401
        code = (
            "from flows import cli; cli._prefect_defaults(); import os; print(os.environ['PREFECT_API_URL'])\n"
            "from prefect import flow\n@flow(name='auth-probe-flow')\ndef f(): return 1\nf()\n"
        )
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=400, cwd=Path(__file__).parents[1])
        assert child.returncode == 0, child.stderr
        # A shell without the string: a note and the temporary server, not a 401 traceback.
        bare = {k: v for k, v in env.items() if k != local_server.SERVER_AUTH_ENV}
        lone = subprocess.run([sys.executable, "-c", code.replace("os.environ['PREFECT_API_URL']", "os.environ.get('PREFECT_API_URL')")], capture_output=True, text=True, env=bare, timeout=400, cwd=Path(__file__).parents[1])
        assert lone.returncode == 0 and "needs PREFECT_API_AUTH_STRING" in lone.stderr and f":{port}/api" not in lone.stdout, lone.stderr
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/flows/filter", data=b'{"limit": 10}',
                                     headers={"Content-Type": "application/json", "Authorization": "Basic " + base64.b64encode(auth.encode()).decode()})
        assert "auth-probe-flow" in [r["name"] for r in json.load(urllib.request.urlopen(req, timeout=30))]
    finally:
        stopped = run("ui", "--stop")
    assert "stopped" in stopped.stdout and not server_file(prefect_home).exists()
