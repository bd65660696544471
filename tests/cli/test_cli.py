"""The `tokentape` CLI: one registry of subcommands, arguments into Settings, typed errors."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app import cli
from app.settings import Settings
from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("TOKENTAPE_"):
            monkeypatch.delenv(name)
    return monkeypatch


# -- arguments into Settings ----------------------------------------------------


def test_serve_defaults_leave_redis_unset_for_the_embedded_server(
    environ: pytest.MonkeyPatch,
) -> None:
    settings = cli.settings_from(parse("serve"))
    assert settings == Settings()
    assert settings.redis_url is None
    assert parse("serve").with_worker is False


def test_serve_flags_beat_environment(environ: pytest.MonkeyPatch) -> None:
    environ.setenv("TOKENTAPE_REDIS_URL", "redis://env:6379/0")
    environ.setenv("TOKENTAPE_PORT", "9000")
    environ.setenv("TOKENTAPE_HEARTBEAT_SECONDS", "5")
    args = parse(
        "serve",
        "--redis",
        "redis://flag:6379/1",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        "--data-dir",
        "/srv/tokentape",
        "--with-worker",
    )
    settings = cli.settings_from(args)
    assert settings.redis_url == "redis://flag:6379/1"
    assert settings.host == "0.0.0.0"
    assert settings.port == 0
    assert settings.data_dir == "/srv/tokentape"
    assert settings.heartbeat_seconds == 5.0  # no flag: the environment still counts
    assert args.with_worker is True


def test_serve_takes_redis_url_from_environment(environ: pytest.MonkeyPatch) -> None:
    environ.setenv("TOKENTAPE_REDIS_URL", "redis://env:6379/0")
    environ.setenv("TOKENTAPE_PORT", "9000")
    settings = cli.settings_from(parse("serve"))
    assert settings.redis_url == "redis://env:6379/0"
    assert settings.port == 9000


def test_worker_flag_beats_environment(environ: pytest.MonkeyPatch) -> None:
    environ.setenv("TOKENTAPE_REDIS_URL", "redis://env:6379/0")
    assert cli.settings_from(parse("worker")).redis_url == "redis://env:6379/0"
    assert cli.settings_from(parse("worker", "--redis", "redis://flag/2")).redis_url == (
        "redis://flag/2"
    )


def test_tool_flags_set_redis_prefix_and_data_dir(environ: pytest.MonkeyPatch) -> None:
    environ.setenv("TOKENTAPE_KEY_PREFIX", "env")
    args = parse("ls", "--redis", "redis://flag/3", "--prefix", "flag", "--data-dir", "d")
    settings = cli.settings_from(args)
    assert (settings.redis_url, settings.key_prefix, settings.data_dir) == (
        "redis://flag/3",
        "flag",
        "d",
    )


@pytest.mark.parametrize("command", ["serve", "worker", "ls", "export", "inspect", "replay"])
def test_every_command_that_reaches_redis_takes_cluster(
    environ: pytest.MonkeyPatch, command: str
) -> None:
    operands = {"export": ["ID"], "inspect": ["ID"], "replay": ["FILE"]}.get(command, [])
    argv = [command, "--redis", "redis://node:7000", *operands]
    assert cli.settings_from(parse(*argv)).redis_cluster is False
    assert cli.settings_from(parse(*argv, "--cluster")).redis_cluster is True
    environ.setenv("TOKENTAPE_REDIS_CLUSTER", "true")
    assert cli.settings_from(parse(*argv)).redis_cluster is True


# -- errors ---------------------------------------------------------------------


def test_worker_without_redis_says_how_to_give_one(
    environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], root_logging: None
) -> None:
    assert cli.main(["worker"]) == 2
    assert "--redis URL or set TOKENTAPE_REDIS_URL" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TOKENTAPE_PORT", "eighty", "TOKENTAPE_PORT must be an integer, got 'eighty'"),
        ("TOKENTAPE_LEASE_SECONDS", "10s", "TOKENTAPE_LEASE_SECONDS must be a number, got '10s'"),
        ("TOKENTAPE_EVENT_LOOP", "trio", "TOKENTAPE_EVENT_LOOP must be uvloop or asyncio"),
        ("TOKENTAPE_LOG_LEVEL", "loud", "TOKENTAPE_LOG_LEVEL must be one of DEBUG, INFO"),
    ],
    ids=["integer", "number", "event-loop", "log-level"],
)
def test_a_bad_setting_exits_2_naming_the_variable(
    environ: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    message: str,
) -> None:
    environ.setenv(variable, value)
    assert cli.main(["worker", "--redis", REDIS_URL]) == 2
    assert capsys.readouterr().err.startswith(f"tokentape worker: invalid_setting: {message}")


def test_the_log_level_comes_from_settings(
    environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], root_logging: None
) -> None:
    environ.setenv("TOKENTAPE_LOG_LEVEL", "warning")
    assert cli.main(["worker"]) == 2  # no Redis: stops after configuring logging
    assert logging.getLogger().level == logging.WARNING


def test_a_bad_argument_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["serve", "--processes", "0"],
        ["ls", "--limit", "0"],
        ["tail", "x", "--after", "-1"],
    ):
        with pytest.raises(SystemExit) as exc:
            parse(*argv)
        assert exc.value.code == 2
        assert "must be at least" in capsys.readouterr().err


def test_unknown_command_and_missing_command_exit_2() -> None:
    for argv in ([], ["frobnicate"]):
        with pytest.raises(SystemExit) as exc:
            parse(*argv)
        assert exc.value.code == 2


# -- one registry -------------------------------------------------------------------


def test_commands_are_registered_by_appending_to_the_list() -> None:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("generation")

    def run(args: argparse.Namespace, settings: Settings) -> int:
        return 7 if args.generation == "g1" else 0

    extra = cli.Command("greet", "say hello to one generation", add_arguments, run)
    args = cli.build_parser([*cli.COMMANDS, extra]).parse_args(["greet", "g1"])
    assert args.run(args, Settings()) == 7


def test_every_subcommand_is_one_command_in_the_list() -> None:
    names = [command.name for command in cli.COMMANDS]
    assert names == ["serve", "worker", "ls", "export", "inspect", "replay", "tail"]


@pytest.mark.parametrize(
    "argv",
    [["ls"], ["export", "ID"], ["inspect", "ID"], ["replay", "FILE"], ["tail", "ID"]],
    ids=lambda argv: argv[0],
)
def test_incident_tools_are_subcommands(argv: list[str]) -> None:
    assert callable(parse(*argv).run)


def test_python_dash_m_app_is_the_same_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: tokentape")
    for command in cli.COMMANDS:
        assert command.name in result.stdout
