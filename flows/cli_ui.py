"""``uld ui``: start (or stop) the workspace's local Prefect server, which later commands reuse."""

from __future__ import annotations

import os
from pathlib import Path

import typer


def prefect_home_of(home: Path) -> Path:
    """The PREFECT_HOME the CLI uses for workspace ``home`` (see ``flows.cli._prefect_defaults``)."""
    return Path(os.environ.get("PREFECT_HOME") or Path(home).expanduser().resolve() / ".prefect")


def register(app: typer.Typer) -> None:
    """Add the ``ui`` command to the ``uld`` app."""

    @app.command("ui")
    def ui(
        ctx: typer.Context,
        port: int = typer.Option(4200, "--port", help="Port for the server and its UI."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 = every interface, for Dask workers and browsers on other machines (needs PREFECT_SERVER_API_AUTH_STRING=user:password in the environment: Prefect's server has no users)."),
        stop: bool = typer.Option(False, "--stop", help="Stop the server this workspace started instead."),
    ) -> None:
        """Start a local Prefect server (UI + API on 127.0.0.1) that every later `uld` command reports to.

        The server keeps running after this command returns (until `uld ui --stop`
        or a reboot). While it answers, commands of this workspace use it instead of
        starting Prefect's temporary server each time (10-15 s saved per command), and
        its UI shows every flow run, each stage's tasks and each D-ULD round.
        """
        from flows.cli import settings
        from flows.local_server import LOOPBACK_HOSTS, start_server, stop_server

        prefect_home = prefect_home_of(settings(ctx).home)
        if stop:
            info = stop_server(prefect_home)
            typer.echo(f"stopped the Prefect server on {info.url}" if info else "no Prefect server recorded for this workspace")
            return
        info, started = start_server(prefect_home, port=port, host=host)
        typer.echo(f"Prefect UI: {info.url}" + ("" if started else " (already running)"))
        typer.echo(f"uld commands of this workspace now report to {info.api_url}; stop it with `uld ui --stop`")
        if info.host not in LOOPBACK_HOSTS:
            typer.echo(f"other machines (Dask workers, browsers): PREFECT_API_URL={info.remote_url}/api with PREFECT_API_AUTH_STRING set to the same user:password")
