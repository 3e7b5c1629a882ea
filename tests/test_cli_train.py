"""`uld train --method`: the method registry, method-only options, `--param`, and the `uld duld` alias."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from flows import cli_duld, cli_train
from pipeline.errors import ConfigError, ULDError
from tests.tiny_runs import invoke_cli


def _register(app) -> None:
    cli_train.register(app)
    cli_duld.register(app)


def test_duld_alias_has_the_train_options_minus_the_method_only_ones():
    train = set(inspect.signature(cli_train.train_cmd).parameters)
    alias = set(inspect.signature(cli_train.alias_command("duld", "doc")).parameters)
    # the engine's own method-only options (the Dask fan-out of its rounds) stay on the alias
    assert alias == train - {"method", "param", *cli_train.METHOD_ONLY_OPTIONS} | set(cli_train.ENGINE_OPTIONS)


def test_help_lists_registered_methods(tmp_path: Path):
    res = invoke_cli(tmp_path, _register, "train", "--help")
    assert res.exit_code == 0
    assert "duld:" in res.output and "--method" in res.output and "--param" in res.output
    res = invoke_cli(tmp_path, _register, "duld", "--help")
    assert res.exit_code == 0 and "--rounds" in res.output and "--param" not in res.output


def test_unknown_method_and_foreign_option_are_user_errors(tmp_path: Path, prefect_harness):
    res = invoke_cli(tmp_path, _register, "train", "--method", "nope", "-d", "synthetic")
    assert isinstance(res.exception, ConfigError) and "duld" in res.exception.fix
    res = invoke_cli(tmp_path, _register, "train", "--method", "duld", "--m", "50", "-d", "synthetic")
    assert isinstance(res.exception, ConfigError) and "--m" in str(res.exception)
    # a real run on an empty workspace stops with a ULDError naming the fix, not a traceback
    res = invoke_cli(tmp_path, _register, "train", "--method", "duld", "-d", "synthetic", "--no-progress")
    assert isinstance(res.exception, ULDError) and res.exception.fix


def test_register_method_and_params():
    seen = {}

    @cli_train.register_method("echo-test", "records its request")
    def run(req: cli_train.TrainRequest):
        seen["steps"] = req.param("steps", int, default=0)
        seen["k"] = req.option("k")
        return None

    try:
        with pytest.raises(ValueError, match="twice"):
            cli_train.register_method("echo-test", "again")(lambda req: None)
        with pytest.raises(ValueError, match="unknown method-only"):
            cli_train.register_method("other-test", "x", own_options=("nonsense",))
        assert cli_train.parse_params(["steps=5", " a = b "]) == {"steps": "5", "a": "b"}
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            cli_train.parse_params(["steps"])
        req = cli_train.TrainRequest("echo-test", None, {"k": 3}, {"steps": "x"})  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="steps"):
            req.param("steps", int)
        run(cli_train.TrainRequest("echo-test", None, {"k": 3}, {"steps": "7"}))  # type: ignore[arg-type]
        assert seen == {"steps": 7, "k": 3}
    finally:
        cli_train.METHODS.pop("echo-test", None)
