"""ops/systemd units: systemd accepts them, they run commands tokentape accepts with settings
that exist, and systemd waits longer than a graceful stop takes."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import build_parser
from app.settings import Settings

UNITS = Path(__file__).resolve().parents[2] / "ops" / "systemd"
INSTALLED = "/opt/tokentape/bin/tokentape"
# (template, an instance: the reader's port or the worker's metrics port, the command)
TEMPLATES = [
    ("tokentape-reader@.service", "8080", "serve"),
    ("tokentape-worker@.service", "9101", "worker"),
]


def directives(template: str) -> dict[str, list[str]]:
    """`Key=value` lines of a unit by key (a key may repeat), all sections together."""
    found: dict[str, list[str]] = {}
    for line in (UNITS / template).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def environment(template: str) -> dict[str, str]:
    return dict(line.partition("=")[::2] for line in directives(template)["Environment"])


def seconds(value: str) -> float:
    match = re.fullmatch(r"([0-9]+)s", value)
    assert match is not None, f"{value!r} is not in seconds"
    return float(match[1])


@pytest.mark.parametrize(("template", "instance", "command"), TEMPLATES)
def test_systemd_accepts_the_unit(
    tmp_path: Path, template: str, instance: str, command: str
) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # systemd checks that ExecStart's program exists: point it at this checkout's.
    installed = Path(sys.executable).with_name("tokentape")
    (tmp_path / template).write_text(
        (UNITS / template).read_text().replace(INSTALLED, str(installed))
    )
    instance_unit = tmp_path / template.replace("@.", f"@{instance}.")
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(instance_unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Unknown keys and bad values are warnings on stderr, with exit status 0.
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize(("template", "instance", "command"), TEMPLATES)
def test_the_unit_runs_a_command_tokentape_accepts(
    template: str, instance: str, command: str
) -> None:
    [exec_start] = directives(template)["ExecStart"]
    program, *arguments = shlex.split(exec_start.replace("%i", instance))
    assert program == INSTALLED
    args = build_parser().parse_args(arguments)
    assert args.command == command


@pytest.mark.parametrize("template", [template for template, _, _ in TEMPLATES])
def test_every_tokentape_variable_is_a_setting_with_a_valid_value(template: str) -> None:
    # A misspelt variable would be ignored without a word.
    fields = {f"TOKENTAPE_{field.name.upper()}" for field in dataclasses.fields(Settings)}
    named = {key for key in environment(template) if key.startswith("TOKENTAPE_")}
    assert named - fields == set()
    Settings.from_env(environment(template))  # raises on a value that is not a number


def test_systemd_waits_longer_than_a_reader_drains() -> None:
    [timeout] = directives("tokentape-reader@.service")["TimeoutStopSec"]
    settings = Settings.from_env(environment("tokentape-reader@.service"))
    assert seconds(timeout) > settings.stream_drain_seconds


def test_systemd_waits_longer_than_a_worker_hands_its_generations_off() -> None:
    [timeout] = directives("tokentape-worker@.service")["TimeoutStopSec"]
    settings = Settings.from_env(environment("tokentape-worker@.service"))
    # What the CLI gives a stopping worker before it cancels its generations.
    assert seconds(timeout) > settings.shutdown_grace_seconds + settings.lease_seconds
