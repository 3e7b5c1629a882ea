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
        port: int = typer.Option(4200, "--port", help="Port on 127.0.0.1 for the server and its UI."),
        stop: bool = typer.Option(False, "--stop", help="Stop the server this workspace started instead."),
    ) -> None:
        """Start a local Prefect server (UI + API on 127.0.0.1) that every later `uld` command reports to.

        The server keeps running after this command returns (until `uld ui --stop`
        or a reboot). While it answers, commands of this workspace use it instead of
        starting Prefect's temporary server each time (10-15 s saved per command), and
        its UI shows every flow run, each stage's tasks and each D-ULD round.
        """
        from flows.cli import settings
        from flows.local_server import start_server, stop_server

        prefect_home = prefect_home_of(settings(ctx).home)
        if stop:
            info = stop_server(prefect_home)
            typer.echo(f"stopped the Prefect server on {info.url}" if info else "no Prefect server recorded for this workspace")
            return
        info, started = start_server(prefect_home, port=port)
        typer.echo(f"Prefect UI: {info.url}" + ("" if started else " (already running)"))
        typer.echo(f"uld commands of this workspace now report to {info.api_url}; stop it with `uld ui --stop`")
