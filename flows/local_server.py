"""One local Prefect server per workspace, shared by every ``uld`` command.

Without ``PREFECT_API_URL`` Prefect starts a temporary server inside every
command (10-15 s on a loaded 2-core machine) and stops it at the end. ``uld ui``
(``make ui``) instead starts ``prefect server start`` on 127.0.0.1 as a detached
process, with the workspace's ``PREFECT_HOME`` (so the UI shows every run of the
workspace), and records where it listens in ``<PREFECT_HOME>/uld-server.json``.

Every later command reads that file (one small read; none when the file does not
exist) and, if ``GET <url>/health`` answers within a fraction of a second, sets
``PREFECT_API_URL`` to it before Prefect is imported. A stale file (server
killed, machine rebooted) just fails the health check and the command falls
back to the temporary server. Nothing here imports Prefect: the check runs in
the CLI's callback, before any command's imports.

``uld ui --host ADDR`` listens on another interface, for Dask workers or browsers
on other machines (``--host 0.0.0.0``: every interface). Prefect's open-source
server has no users, so anyone who reaches the port could read the runs and
start deployments: a non-loopback host is refused unless the server gets a
Basic-auth string (``PREFECT_SERVER_API_AUTH_STRING=user:password`` in the
environment, never on the command line); clients send it as
``PREFECT_API_AUTH_STRING`` (a command whose environment has only the server's
variable sends that). The record says whether the server demands a string (never
the string): a command without one falls back to the temporary server with a
note instead of failing every API call with 401.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import WorkspaceError

SERVER_FILE = "uld-server.json"
LOG_FILE = "uld-server.log"
DEFAULT_PORT = 4200
HOST = "127.0.0.1"
WILDCARD_HOSTS = ("0.0.0.0", "::")  # listen on every interface
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SERVER_AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"  # user:password the server demands (Prefect's setting)
CLIENT_AUTH_ENV = "PREFECT_API_AUTH_STRING"  # what clients send
# Connection refused comes back at once; a live but busy server answers /health in
# milliseconds. The limit only bounds the case of a port held by something that never answers.
HEALTH_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class ServerInfo:
    """Where a server started by ``uld ui`` listens (the content of ``uld-server.json``)."""

    pid: int
    port: int
    host: str = HOST
    auth: bool = False  # the server demands a Basic-auth string (never the string itself)

    @property
    def url(self) -> str:
        """The UI's address on this machine (loopback when the server listens on every interface)."""
        return _http(HOST if self.host in WILDCARD_HOSTS else self.host, self.port)

    @property
    def remote_url(self) -> str:
        """The address other machines use: the host name when listening on every interface."""
        return _http(socket.gethostname() if self.host in WILDCARD_HOSTS else self.host, self.port)

    @property
    def api_url(self) -> str:
        """The value for ``PREFECT_API_URL``."""
        return f"{self.url}/api"


def _http(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"  # IPv6 literals in brackets


def client_auth() -> str | None:
    """The Basic-auth string this process sends (``PREFECT_API_AUTH_STRING``, else the server's own)."""
    return os.environ.get(CLIENT_AUTH_ENV) or os.environ.get(SERVER_AUTH_ENV) or None


def server_file(prefect_home: Path) -> Path:
    """The record of the workspace's server: ``<PREFECT_HOME>/uld-server.json``."""
    return Path(prefect_home) / SERVER_FILE


def read_server(prefect_home: Path) -> ServerInfo | None:
    """The recorded server, or None when there is no record or it cannot be read."""
    try:
        raw = json.loads(server_file(prefect_home).read_text())
        return ServerInfo(pid=int(raw["pid"]), port=int(raw["port"]), host=str(raw.get("host", HOST)), auth=bool(raw.get("auth", False)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_healthy(api_url: str, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    """True when ``GET <api_url>/health`` answers 200 within ``timeout`` seconds. Prefect exempts
    /health from Basic auth, so this says nothing about whether this process may use the API
    (see :func:`use_running_server`); the string is sent anyway when there is one."""
    req = urllib.request.Request(f"{api_url.rstrip('/')}/health")
    auth = client_auth()
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):  # refused, timed out, not HTTP: no usable server
        return False


def running_server(prefect_home: Path) -> ServerInfo | None:
    """The workspace's server when it is recorded *and* answers its health check, else None."""
    info = read_server(prefect_home)
    if info is None or not is_healthy(info.api_url):
        return None
    return info


def start_server(prefect_home: Path, port: int = DEFAULT_PORT, wait_s: float = 180.0, host: str = HOST) -> tuple[ServerInfo, bool]:
    """Start ``prefect server start`` on ``host``:``port`` (default 127.0.0.1) detached, or find the running one.

    A ``host`` other than loopback needs ``PREFECT_SERVER_API_AUTH_STRING`` in the environment
    (see the module's docstring); without it this raises :class:`WorkspaceError` before starting.

    Returns ``(info, started)``; ``started`` is False when a healthy server was
    already recorded. Waits up to ``wait_s`` for the health check (the server
    needs ~10 s on an idle machine, much more on a loaded one). Raises
    :class:`WorkspaceError` when the record cannot be written, the port is held
    by something else, or the server does not come up (its log is named).
    """
    prefect_home = Path(prefect_home)
    current = running_server(prefect_home)
    if current is not None:
        if current.host != host:
            raise WorkspaceError(f"this workspace's Prefect server already runs on {current.host} (port {current.port}), not on {host}",
                                 where="--host", fix="stop it with `uld ui --stop`, then start it again with this --host")
        return current, False
    if not 0 < int(port) < 65536:
        raise WorkspaceError(f"port {port} is not a TCP port", where="--port", fix="use e.g. --port 4200")
    if host not in LOOPBACK_HOSTS and not os.environ.get(SERVER_AUTH_ENV):
        raise WorkspaceError(
            f"a Prefect server on {host} would let anyone who reaches port {port} read the runs and start deployments",
            where="--host",
            fix=f"export {SERVER_AUTH_ENV}=user:password first (and {CLIENT_AUTH_ENV} with the same value on the other machines), "
                "or keep the default --host 127.0.0.1",
        )
    probe = ServerInfo(pid=0, port=int(port))
    if is_healthy(probe.api_url):
        raise WorkspaceError(
            f"another Prefect server already answers on {probe.url} (not one started for this workspace)",
            where="--port",
            fix=f"use it with `export PREFECT_API_URL={probe.api_url}`, or pick another --port",
        )
    try:
        prefect_home.mkdir(parents=True, exist_ok=True)
        log = open(prefect_home / LOG_FILE, "ab")
    except OSError as exc:
        raise WorkspaceError(
            f"cannot write the server's files ({exc.strerror or exc})",
            where=str(prefect_home),
            fix="use a writable workspace (--home) or set PREFECT_HOME to a writable folder",
        ) from None
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)  # the server itself must not try to report to a server
    # The UI (JavaScript in the browser) calls the API at PREFECT_UI_API_URL, which otherwise
    # defaults to port 4200 whatever --port says: with another port every page showed
    # "Can't connect to Server API" (seen in headless Chromium).
    listening = ServerInfo(pid=0, port=int(port), host=host)
    env["PREFECT_UI_API_URL"] = f"{listening.url if host in LOOPBACK_HOSTS else listening.remote_url}/api"
    with log:
        # A new session: the server outlives this command and ignores its terminal's Ctrl-C.
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
    info = ServerInfo(pid=proc.pid, port=int(port), host=host, auth=bool(os.environ.get(SERVER_AUTH_ENV)))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise WorkspaceError(
                f"the Prefect server exited at start-up (code {proc.returncode})",
                where=str(prefect_home / LOG_FILE),
                fix="read the log; a port in use needs another --port",
            )
        if is_healthy(info.api_url):
            _write_record(prefect_home, info)
            return info, True
        time.sleep(0.5)
    _terminate(proc.pid)
    raise WorkspaceError(
        f"the Prefect server did not answer within {wait_s:.0f} s",
        where=str(prefect_home / LOG_FILE),
        fix="the machine may be busy: run `uld ui` again",
    )


def _write_record(prefect_home: Path, info: ServerInfo) -> None:
    from storage.atomic import write_json

    write_json(server_file(prefect_home), {"pid": info.pid, "port": info.port, "host": info.host, "auth": info.auth})


def _terminate(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)  # the server's whole session (uvicorn + services)
    except (ProcessLookupError, PermissionError):
        pass


def stop_server(prefect_home: Path, wait_s: float = 30.0) -> ServerInfo | None:
    """Stop the workspace's recorded server and remove its record; None when none was recorded."""
    info = read_server(prefect_home)
    if info is None:
        return None
    _terminate(info.pid)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and is_healthy(info.api_url, timeout=0.2):
        time.sleep(0.2)
    try:
        server_file(prefect_home).unlink()
    except OSError:
        pass
    return info


def use_running_server(prefect_home: Path) -> str | None:
    """Point ``PREFECT_API_URL`` at the workspace's running server; returns the URL set, or None.

    Leaves a user's own ``PREFECT_API_URL`` alone. Costs one missing-file check
    when no server was ever started, one local HTTP request otherwise.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    if not server_file(prefect_home).is_file():
        return None
    info = running_server(prefect_home)
    if info is None:
        return None
    if info.auth and client_auth() is None:
        # Every API call would be refused (401) with a traceback; the temporary server works.
        print(f"note: the workspace's Prefect server ({info.url}) needs {CLIENT_AUTH_ENV}; this command uses a temporary "
              f"server instead (export {CLIENT_AUTH_ENV}=user:password to report to it)", file=sys.stderr)
        return None
    os.environ["PREFECT_API_URL"] = info.api_url
    if info.auth:
        os.environ.setdefault(CLIENT_AUTH_ENV, client_auth() or "")  # the server demands it
    return info.api_url
