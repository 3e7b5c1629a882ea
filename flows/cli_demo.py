"""``uld demo``: every stage on the embedded synthetic dataset with the shipped backbone."""

from __future__ import annotations

import time

import typer


def register(app: typer.Typer) -> None:
    """Add the ``demo`` command to the ``uld`` app."""

    @app.command("demo")
    def demo_cmd(
        ctx: typer.Context,
        n_train: int = typer.Option(600, "--n-train", help="Synthetic training images."),
        n_test: int = typer.Option(200, "--n-test", help="Synthetic test images."),
        k: int = typer.Option(10, "-k", "--k", help="Number of landmarks to discover."),
        rounds: int = typer.Option(3, "--rounds", help="D-ULD self-training rounds."),
        steps_per_round: int = typer.Option(150, "--steps-per-round", help="D-ULD optimisation steps per round."),
        bootstrap_steps: int = typer.Option(300, "--bootstrap-steps", help="D-ULD bootstrapping steps."),
        backbone: str = typer.Option("shipped", "--backbone", help="Backbone: `shipped` (the DDPM in the package), a local directory, or a diffusers model id."),
    ) -> None:
        """Run every stage on the synthetic heads and print NME per method and round.

        Generates the synthetic dataset, caches features of the backbone, runs the
        reference baselines, ZeroShot and D-ULD, and prints forward/backward NME (%).
        Everything is written under the workspace (--home); a second run with the
        same options resumes and finishes at once.
        """
        from flows.cli import settings
        from flows.demo import DemoConfig, demo
        from pipeline.errors import ConfigError

        s = settings(ctx)
        for name, value in (("--n-train", n_train), ("--n-test", n_test), ("-k", k)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}", where=name)
        cfg = DemoConfig(n_train=n_train, n_test=n_test, seed=s.seed, k=k, rounds=rounds, steps_per_round=steps_per_round,
                         bootstrap_steps=bootstrap_steps, backbone=backbone)
        t0 = time.perf_counter()
        table = demo(home=s.home, cfg=cfg, device=s.device)
        typer.echo("\nForward / backward NME (%, lower is better) and per-landmark Hungarian accuracy (higher is better) on the synthetic test split:")
        typer.echo(table.drop(columns=["run_id"]).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        for fig in table.attrs.get("figures", []):
            typer.echo(f"figure: {fig}")
        for report in table.attrs.get("reports", []):
            typer.echo(f"report: {report}")
        typer.echo(f"runs under {s.home / 'runs'}; total {time.perf_counter() - t0:.0f} s")
