"""The ``uld`` command line: a thin layer over the flows.

Global options (workspace, device, seed) live on the top-level callback and
reach every command through ``ctx.obj`` as :class:`pipeline.settings.Settings`.
Errors the user can fix (:class:`pipeline.errors.ULDError`, and the OS errors
of a full disk or a read-only / non-writable workspace, see
:mod:`flows.cli_errors`) are printed as "what / where / fix" without a
traceback, exit code 2; Prefect's own traceback of such an error is dropped too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from flows.cli_errors import as_user_error, install_log_filter
from pipeline.errors import ULDError
from pipeline.settings import Settings

app = typer.Typer(
    name="uld",
    help=(
        "Unsupervised landmark discovery with diffusion features.\n\n"
        "Stages: datasets -> features -> zeroshot / duld -> evaluate. "
        "Every stage writes under the workspace (--home, $ULD_HOME, default ./workspace) "
        "and can be re-run or resumed on its own. `uld demo` runs them all on the "
        "embedded synthetic dataset with the shipped backbone."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _main(
    ctx: typer.Context,
    home: Optional[Path] = typer.Option(None, "--home", help="Workspace root (env ULD_HOME; default ./workspace)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Where user datasets live (env ULD_DATA; default ./data)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (env ULD_DEVICE; default auto)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Global seed (env ULD_SEED; default 0)."),
    runs_url: Optional[str] = typer.Option(None, "--runs-url", help="Also keep run folders at this fsspec URL (s3://bucket/runs, ...), for `train` (and its aliases), `zeroshot`, `evaluate` and `evaluate-baseline`: copied after every self-training round and when the command ends, fetched by --resume where the local folder is missing (env ULD_RUNS_URL)."),
) -> None:
    ctx.obj = Settings.from_env(home=home, data_root=data_root, device=device, seed=seed, runs_url=runs_url)
    # Here, not at start-up: `uld --help` never gets here, and --home is known. Prefect
    # is first imported inside a command, after this.
    _prefect_defaults(ctx.obj.home)


def settings(ctx: typer.Context) -> Settings:
    """The Settings built by the top-level callback."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Settings) else Settings.from_env()


# Commands registered alone when they are the one invoked: a no-op `uld features` must not
# pay for importing every other command (the dataset loaders' pandas alone is ~1 s on 2 busy
# cores). Anything else (`uld --help`, other commands, unparsed argv) registers them all.
_ALONE = {"features": "cli_features"}
_VALUE_OPTIONS = ("--home", "--data-root", "--device", "--seed", "--runs-url")  # the root options that take a value


def invoked_command(argv: list[str]) -> str | None:
    """The command name in ``argv`` (the first word after the root options), or None."""
    args = iter(argv)
    for arg in args:
        if arg in _VALUE_OPTIONS:
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def _register_commands(argv: list[str] | None = None) -> None:
    alone = _ALONE.get(invoked_command(argv)) if argv is not None else None
    if alone is not None:
        import importlib

        importlib.import_module(f"flows.{alone}").register(app)
        return
    # Each stage's commands live beside its flow; the order here is the order in --help.
    from flows import cli_ablation, cli_backbone, cli_datasets, cli_demo, cli_deploy, cli_discover, cli_duld, cli_evaluate, cli_features, cli_predict, cli_report, cli_train, cli_ui, cli_zeroshot

    for module in (cli_demo, cli_datasets, cli_backbone, cli_features, cli_zeroshot, cli_train, cli_duld, cli_ablation, cli_evaluate, cli_predict, cli_report, cli_discover, cli_ui, cli_deploy):
        module.register(app)


def _prefect_defaults(home: Optional[Path] = None) -> None:
    # Prefect keeps its database (flow-run history shown by the UI) in PREFECT_HOME.
    # Unless the user chose one, keep it inside the workspace (``home``, else $ULD_HOME)
    # so `prefect server start` with the same PREFECT_HOME shows every run of this
    # workspace. Done before any Prefect import reads its settings.
    if "PREFECT_HOME" not in os.environ:
        base = Path(home) if home is not None else Path(os.environ.get("ULD_HOME", "workspace"))
        prefect_home = base.expanduser().resolve() / ".prefect"
        try:
            # Prefect creates only the last level of PREFECT_HOME; on a fresh clone the
            # workspace itself does not exist yet.
            prefect_home.mkdir(parents=True, exist_ok=True)
            writable = os.access(prefect_home, os.W_OK)
        except OSError:
            writable = False
        # A read-only, full or not-creatable workspace must not crash every command here
        # with a traceback: Prefect keeps its own default (~/.prefect), read-only commands
        # work, and a command that writes into the workspace stops with a clean message.
        if writable:
            os.environ["PREFECT_HOME"] = str(prefect_home)
    # A server started by `uld ui` for this workspace is reused when it answers (one
    # local HTTP request), saving the temporary server's start-up; otherwise Prefect
    # starts its temporary one as before.
    from flows.local_server import use_running_server

    base = Path(home) if home is not None else Path(os.environ.get("ULD_HOME", "workspace"))
    use_running_server(Path(os.environ.get("PREFECT_HOME") or base.expanduser().resolve() / ".prefect"))
    # The temporary server Prefect starts when no PREFECT_API_URL is set needs ~10 s on
    # 2 busy cores; its default 20 s start-up limit fails under load, so allow more.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Offline machines otherwise log a telemetry failure per run; users can opt back in.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main() -> None:
    _register_commands(sys.argv[1:])
    install_log_filter()
    try:
        app()
    except (ULDError, OSError, RuntimeError) as exc:  # RuntimeError: Prefect's server start-up timeout
        err = as_user_error(exc)
        if err is None:
            raise  # not the user's to fix: keep the traceback
        try:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        except OSError:
            pass  # stderr itself unwritable (closed pipe, full disk): the exit code still says it
        sys.exit(2)
