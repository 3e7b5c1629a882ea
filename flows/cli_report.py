"""``uld report``: a run's results as one HTML page you can open or share."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the ``report`` command to the ``uld`` app."""

    @app.command("report")
    def report_cmd(
        ctx: typer.Context,
        run: str = typer.Argument(..., help="A run folder (under <home>/runs/) or a run id under --home."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default: <run folder>/report.html)."),
    ) -> None:
        """Write a self-contained HTML report of a finished ZeroShot or D-ULD run.

        It shows the metrics table (NME forward/backward, Hungarian accuracy, with and without
        fallbacks), NME per round, per-landmark Hungarian accuracy, landmark presence, the run's
        contact sheets and CED curves, the feature spec and the run's configuration. Images are
        embedded, so the one file is all there is to copy.
        """
        from flows.cli import settings
        from flows.report import write_report

        path = write_report(run, out, home=settings(ctx).home)
        typer.echo(f"report written to {path}")
