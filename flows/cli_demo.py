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
        flip: bool = typer.Option(True, "--flip/--no-flip", help="D-ULD learns from mirrored views too (on these heads: Hungarian 0.45 -> 0.65 over 3 seeds; off in `uld train`, where it hurts box-aligned real faces)."),
        min_coherence: float = typer.Option(0.2, "--min-coherence", help="Motion-coherence floor of the extra ZeroShot row (0.2 on these heads: Hungarian 0.43 -> 0.55 over 3 seeds)."),
    ) -> None:
        """Run every stage on the synthetic heads and print NME per method and round.

        Generates the synthetic dataset, caches features of the backbone, runs the
        reference baselines, ZeroShot (the paper's K-means, the cluster choice, and the
        cluster choice with motion coherence) and D-ULD (with mirrored views, see
        --flip), and prints forward/backward NME (%) and Hungarian accuracy.
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
                         bootstrap_steps=bootstrap_steps, backbone=backbone, duld_flip=flip, zeroshot_min_coherence=min_coherence)
        t0 = time.perf_counter()
        table = demo(home=s.home, cfg=cfg, device=s.device)
        typer.echo("\nForward / backward NME (%, lower is better) and per-landmark Hungarian accuracy (higher is better) on the synthetic test split:")
        typer.echo(table.drop(columns=["run_id"]).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        for fig in table.attrs.get("figures", []):
            typer.echo(f"figure: {fig}")
        for report in table.attrs.get("reports", []):
            typer.echo(f"report: {report}")
        typer.echo(f"runs under {s.home / 'runs'}; total {time.perf_counter() - t0:.0f} s")
