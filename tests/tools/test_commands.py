"""The incident tools through `tokentape`'s own entry point, as a user runs them."""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from rich.text import Text

from app import cli, events
from app.settings import Settings
from app.store import GenerationLog
from app.tools import recording
from tests.conftest import ON_EVERY_BACKEND
from tests.tools.builders import tokens, write_generation


def run(*argv: str) -> int:
    """One command, with its own event loop as under the console script."""
    return cli.main(argv)


@pytest.fixture
def redis_options(settings: Settings) -> list[str]:
    assert settings.redis_url is not None
    cluster = ["--cluster"] if settings.redis_cluster else []
    return ["--redis", settings.redis_url, *cluster, "--prefix", settings.key_prefix]


@ON_EVERY_BACKEND
async def test_export_inspect_replay_ls_from_the_command_line(
    log: GenerationLog,
    redis_options: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    generation_id = await write_generation(
        log, [[events.Started()], tokens("Hello there."), [events.Done(reason="stop")]]
    )
    path = tmp_path / "incident.jsonl"
    assert (
        await _in_thread(lambda: run("export", generation_id, "-o", str(path), *redis_options)) == 0
    )
    assert recording.read_file(path).generation.id == generation_id

    assert await _in_thread(lambda: run("inspect", str(path), "--json")) == 0
    timeline = msgspec.json.decode(capsys.readouterr().out)
    assert timeline["generation_id"] == generation_id

    assert (
        await _in_thread(lambda: run("replay", str(path), "--as-fast-as-possible", *redis_options))
        == 0
    )
    replay_id, url = capsys.readouterr().out.split()
    assert url == f"http://127.0.0.1:8080/v1/generations/{replay_id}/events"
    replayed = await recording.fetch(log, replay_id)
    assert [e.data for e in replayed.events] == [e.data for e in recording.read_file(path).events]

    assert await _in_thread(lambda: run("ls", "--json", *redis_options)) == 0
    listed = [msgspec.json.decode(line) for line in capsys.readouterr().out.splitlines()]
    assert {g["id"] for g in listed} == {generation_id, replay_id}


async def test_user_errors_exit_with_their_code(
    redis_options: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _in_thread(lambda: run("inspect", "Zm9vYmFyYmF6cXV4cXV1eA", *redis_options)) == 1
    assert "generation_not_found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "tokentape.recording", "version": 9}\n')
    assert await _in_thread(lambda: run("inspect", str(bad))) == 2
    assert "unsupported_recording_version" in capsys.readouterr().err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_export_shows_progress_on_a_terminal_and_pipes_the_recording_as_is(
    log: GenerationLog,
    redis_options: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generation_id = await write_generation(
        log, [[events.Started()], tokens("Hello there."), [events.Done(reason="stop")]]
    )
    count = len(await log.read(generation_id, 0, 100))
    path = tmp_path / "incident.jsonl"
    terminal = Terminal()
    with monkeypatch.context() as patched:
        patched.setattr(sys, "stderr", terminal)
        export = ["export", generation_id, *redis_options]
        assert await _in_thread(lambda: run(*export, "-o", str(path))) == 0
    shown = Text.from_ansi(terminal.getvalue()).plain
    assert f"export {generation_id}" in shown
    assert f"{count}/{count} events" in shown
    capsys.readouterr()

    assert await _in_thread(lambda: run(*export)) == 0  # stdout and stderr are not terminals
    piped = capsys.readouterr()
    header, *lines = piped.out.encode().splitlines(keepends=True)
    assert lines == path.read_bytes().splitlines(keepends=True)[1:]  # the header has a time
    assert msgspec.json.decode(header)["generation"]["id"] == generation_id
    assert piped.err == ""  # no progress bar into a pipe


async def _in_thread(call: Callable[[], int]) -> int:
    return await asyncio.to_thread(call)
