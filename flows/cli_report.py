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
        runs: list[str] = typer.Argument(..., help="One or more run folders (under <home>/runs/) or run ids under --home."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="One run: the HTML file to write (default: <run folder>/report.html). Several runs: the folder for report.html, report.md and the PNGs (required)."),
    ) -> None:
        """Write a self-contained HTML report of a finished run, or compare several runs.

        One run: the metrics table (NME forward/backward, Hungarian accuracy, with and without
        fallbacks), NME per round, per-landmark Hungarian accuracy, landmark presence, the run's
        contact sheets and CED curves, the feature spec and the run's configuration.

        Several runs (`uld report R1 R2 --out DIR`): DIR/report.html with a comparison table, CED
        curves (forward / backward) drawn from each run's per-image errors, per-yaw-bin bars,
        per-round curves, per-landmark Hungarian accuracy, NME against the number of regressor
        images (10/30/100/300), each run's landmark contact sheet and configuration; and its
        Markdown twin DIR/report.md with the plots as PNG files beside it.
        Images in the HTML are embedded, so the one file is all there is to copy.
        """
        from flows.cli import settings
        from flows.report import write_comparison, write_report
        from pipeline.errors import ConfigError

        home = settings(ctx).home
        if len(runs) == 1:
            path = write_report(runs[0], out, home=home)
            typer.echo(f"report written to {path}")
            return
        if out is None:
            raise ConfigError("comparing several runs needs a folder to write to", where="--out", fix="add --out DIR (created if missing)")
        html_path, md_path = write_comparison(runs, out, home=home)
        typer.echo(f"comparison of {len(runs)} runs written to {html_path} (Markdown twin: {md_path})")
