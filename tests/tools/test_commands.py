"""The subcommands through argparse, as `tokentape` will run them once `register` is wired."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from app import events
from app.settings import Settings
from app.store import GenerationLog
from app.tools import recording
from app.tools.commands import register
from tests.tools.builders import tokens, write_generation


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="tokentape")
    register(root.add_subparsers(dest="command", required=True))
    return root


def run(*argv: str) -> int:
    """One command, with its own event loop as under the console script."""
    args = parser().parse_args(argv)
    status: int = args.run(args)
    return status


@pytest.fixture
def redis_options(settings: Settings) -> list[str]:
    assert settings.redis_url is not None
    return ["--redis", settings.redis_url, "--prefix", settings.key_prefix]


def test_register_adds_the_five_commands() -> None:
    for command in ("ls", "export", "inspect", "replay", "tail"):
        assert callable(parser().parse_args([command, "x"] if command != "ls" else [command]).run)


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


async def _in_thread(call: Callable[[], int]) -> int:
    return await asyncio.to_thread(call)
