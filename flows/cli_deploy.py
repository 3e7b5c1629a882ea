"""``uld deploy``: serve the main flows as Prefect deployments, started from the UI of ``uld ui``."""

from __future__ import annotations

import os
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the ``deploy`` command to the ``uld`` app."""

    @app.command("deploy")
    def deploy(
        ctx: typer.Context,
        only: Optional[List[str]] = typer.Option(None, "--only", help="Serve only these deployments (features, zeroshot, train, demo); repeatable."),
        limit: int = typer.Option(1, "--limit", help="Flow runs executed at the same time by this process (1: one run uses the machine)."),
        port: int = typer.Option(4200, "--port", help="Port of the `uld ui` server to start when none runs for this workspace."),
    ) -> None:
        """Serve the features / zeroshot / train / demo flows as deployments until Ctrl-C.

        Uses the workspace's `uld ui` server (starting it when none answers). In its
        UI, Deployments -> e.g. `uld-train/local` -> Run -> Custom run sets the
        method, dataset, K, rounds, ...; this process picks the run up and executes
        it in a subprocess, reporting every stage and round to the same UI.
        """
        from flows.cli import settings
        from flows.cli_ui import prefect_home_of
        from flows.local_server import start_server

        s = settings(ctx)
        if limit < 1:
            from pipeline.errors import ConfigError

            raise ConfigError(f"--limit must be >= 1, got {limit}", where="--limit", fix="use 1 (one run at a time) or more")
        api = os.environ.get("PREFECT_API_URL")
        if not api:  # no `uld ui` server answered in the CLI callback: start one, served runs must outlive this command's view
            info, _ = start_server(prefect_home_of(s.home), port=port)
            os.environ["PREFECT_API_URL"] = api = info.api_url
        from prefect import serve

        from flows.deployments import build_deployments

        deployments = build_deployments(s.home, s.device, only)
        typer.echo(f"serving {len(deployments)} deployment(s) on {api.removesuffix('/api')} (Deployments page); Ctrl-C stops")
        serve(*deployments, limit=limit, print_starting_message=False)
