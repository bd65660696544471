"""The `tokentape` CLI: arguments into Settings, and the serve/worker process lifecycle."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from app import cli
from app.settings import Settings
from tests.cli import stubs
from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parents[2]
SERVING = re.compile(rb"^tokentape serving on (http://\S+)(?: \(embedded Redis at (redis://\S+) )?")

# Runs the real CLI with the stand-in web app and worker, so the process runtime is
# tested on its own: signals, the embedded Redis, shutdown order, exit code.
STUBBED_CLI = """
import sys
from app import cli
from tests.cli import stubs
cli.create_app = stubs.create_app
cli.Worker = stubs.Worker
sys.exit(cli.main(sys.argv[1:]))
"""


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
    settings = cli.serve_settings(parse("serve"))
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
        "--with-worker",
    )
    settings = cli.serve_settings(args)
    assert settings.redis_url == "redis://flag:6379/1"
    assert settings.host == "0.0.0.0"
    assert settings.port == 0
    assert settings.heartbeat_seconds == 5.0  # no flag: the environment still counts
    assert args.with_worker is True


def test_serve_takes_redis_url_from_environment(environ: pytest.MonkeyPatch) -> None:
    environ.setenv("TOKENTAPE_REDIS_URL", "redis://env:6379/0")
    environ.setenv("TOKENTAPE_PORT", "9000")
    settings = cli.serve_settings(parse("serve"))
    assert settings.redis_url == "redis://env:6379/0"
    assert settings.port == 9000


def test_worker_flag_beats_environment(environ: pytest.MonkeyPatch) -> None:
    environ.setenv("TOKENTAPE_REDIS_URL", "redis://env:6379/0")
    assert cli.worker_settings(parse("worker")).redis_url == "redis://env:6379/0"
    assert cli.worker_settings(parse("worker", "--redis", "redis://flag/2")).redis_url == (
        "redis://flag/2"
    )


def test_worker_without_redis_says_how_to_give_one(
    environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["worker"]) == 2
    assert "--redis URL or set TOKENTAPE_REDIS_URL" in capsys.readouterr().err


def test_bad_setting_in_environment_is_a_usage_error(
    environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environ.setenv("TOKENTAPE_PORT", "eighty")
    assert cli.main(["worker", "--redis", REDIS_URL]) == 2
    assert "TOKENTAPE_PORT must be a number" in capsys.readouterr().err


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def test_serve_and_worker_run_on_uvloop_unless_told_otherwise() -> None:
    import uvloop

    assert isinstance(cli.run_loop(Settings(), _running_loop()), uvloop.Loop)
    standard = cli.run_loop(Settings(event_loop="asyncio"), _running_loop())
    assert not isinstance(standard, uvloop.Loop)
    assert isinstance(standard, asyncio.BaseEventLoop)


def test_unknown_event_loop_is_a_usage_error(
    environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environ.setenv("TOKENTAPE_EVENT_LOOP", "trio")
    assert cli.main(["worker", "--redis", REDIS_URL]) == 2
    assert "TOKENTAPE_EVENT_LOOP must be uvloop or asyncio" in capsys.readouterr().err


def test_unknown_command_and_missing_command_exit_2() -> None:
    for argv in ([], ["frobnicate"]):
        with pytest.raises(SystemExit) as exc:
            parse(*argv)
        assert exc.value.code == 2


def test_commands_are_registered_by_appending_to_the_list() -> None:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("generation")

    def run(args: argparse.Namespace) -> int:
        return 7 if args.generation == "g1" else 0

    extra = cli.Command("greet", "say hello to one generation", add_arguments, run)
    args = cli.build_parser([*cli.COMMANDS, extra]).parse_args(["greet", "g1"])
    assert args.run(args) == 7


@pytest.mark.parametrize(
    "argv",
    [["ls"], ["export", "ID"], ["inspect", "ID"], ["replay", "FILE"], ["tail", "ID"]],
    ids=lambda argv: argv[0],
)
def test_incident_tools_are_subcommands(argv: list[str]) -> None:
    assert callable(parse(*argv).run)


# -- serve and worker in this process -------------------------------------------


async def test_serve_answers_http_and_stops_its_worker(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stop = asyncio.Event()
    settings = Settings(redis_url=REDIS_URL, port=0)
    stubs.Worker.instances.clear()
    task = asyncio.create_task(
        cli.serve(
            settings,
            with_worker=True,
            stop=stop,
            app_factory=stubs.create_app,
            worker_factory=stubs.Worker,
        )
    )
    url = await _printed_url(capsys)
    async with aiohttp.ClientSession() as session, session.get(f"{url}/ping") as response:
        assert response.status == 200
        assert (await response.json())["redis"] is True
    stop.set()
    assert await asyncio.wait_for(task, 10) == 0
    [worker] = stubs.Worker.instances
    assert worker.stopped


async def test_serve_exits_1_when_its_worker_dies() -> None:
    settings = Settings(redis_url=REDIS_URL, port=0)
    code = await asyncio.wait_for(
        cli.serve(
            settings,
            with_worker=True,
            app_factory=stubs.create_app,
            worker_factory=stubs.FailingWorker,
        ),
        10,
    )
    assert code == 1


async def test_serve_exits_1_when_redis_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    settings = Settings(redis_url=f"redis://127.0.0.1:{closed_port}/0", port=0)
    code = await cli.serve(settings, with_worker=False, app_factory=stubs.create_app)
    assert code == 1


async def test_worker_command_runs_until_stopped(capsys: pytest.CaptureFixture[str]) -> None:
    stop = asyncio.Event()
    stubs.Worker.instances.clear()
    task = asyncio.create_task(
        cli.work(Settings(redis_url=REDIS_URL), stop=stop, worker_factory=stubs.Worker)
    )
    for _ in range(200):
        if "tokentape worker consuming from" in capsys.readouterr().out:
            break
        await asyncio.sleep(0.01)
    stop.set()
    assert await asyncio.wait_for(task, 10) == 0
    assert stubs.Worker.instances[0].stopped


async def _printed_url(capsys: pytest.CaptureFixture[str]) -> str:
    for _ in range(500):
        match = SERVING.search(capsys.readouterr().out.encode())
        if match:
            return match.group(1).decode()
        # The server prints once it listens; nothing to await but the output.
        await asyncio.sleep(0.01)
    raise AssertionError("serve printed no URL")


# -- serve as a real process -----------------------------------------------------


@pytest.fixture
async def cli_process() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    processes: list[asyncio.subprocess.Process] = []
    yield processes
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def start_cli(
    processes: list[asyncio.subprocess.Process],
    *argv: str,
    stubbed: bool,
    embed: str,
    cwd: Path,
) -> tuple[asyncio.subprocess.Process, str, str | None]:
    """Start `python -m app …` in `cwd` with no TOKENTAPE_* set; return it, its URL and
    embedded Redis (whose data goes to `cwd`/.tokentape).

    `embed="fakeredis"` leaves redis-server off PATH, forcing the in-process fallback.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENTAPE_")}
    env["PYTHONPATH"] = str(ROOT)
    if embed == "fakeredis":
        env["PATH"] = str(Path(sys.executable).parent)
    code = ["-c", STUBBED_CLI] if stubbed else ["-m", "app"]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *code,
        *argv,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    processes.append(process)
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    match = SERVING.match(line)
    if match is None:
        stderr = await process.stderr.read() if process.stderr else b""
        raise AssertionError(f"unexpected first line {line!r}; stderr: {stderr.decode()}")
    redis_url = match.group(2).decode() if match.group(2) else None
    if redis_url is not None:
        assert f"via {embed}".encode() in line
    return process, match.group(1).decode(), redis_url


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


EMBEDDED = [
    pytest.param(
        "redis-server",
        marks=pytest.mark.skipif(
            shutil.which("redis-server") is None, reason="no redis-server on PATH"
        ),
    ),
    "fakeredis",
]


@pytest.mark.parametrize("embed", EMBEDDED)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_serve_with_no_redis_embeds_one_and_exits_0_on_signal(
    cli_process: list[asyncio.subprocess.Process],
    signum: signal.Signals,
    embed: str,
    tmp_path: Path,
) -> None:
    process, url, redis_url = await start_cli(
        cli_process, "serve", "--port", "0", stubbed=True, embed=embed, cwd=tmp_path
    )
    assert redis_url is not None
    async with aiohttp.ClientSession() as session, session.get(f"{url}/ping") as response:
        assert response.status == 200
        assert await response.json() == {"redis": True, "url": redis_url}
    process.send_signal(signum)
    assert await asyncio.wait_for(process.wait(), 20) == 0
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    assert not _port_open(redis_port)
    assert _processes_mentioning(f"--port\0{redis_port}\0") == []


@pytest.mark.parametrize("embed", EMBEDDED)
async def test_tokentape_serve_with_nothing_configured_streams_a_generation(
    cli_process: list[asyncio.subprocess.Process], embed: str, tmp_path: Path
) -> None:
    _, url, redis_url = await start_cli(
        cli_process, "serve", "--port", "0", stubbed=False, embed=embed, cwd=tmp_path
    )
    assert redis_url is not None
    body = {
        "model": "sim",
        "messages": [{"role": "user", "content": "hi"}],
        "sim": {"tokens": 5, "tokens_per_second": 1e9, "seed": 1},
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/generations", json=body) as response:
            assert response.status == 201
            created = await response.json()
        events_url = URL(url).join(URL(created["events_url"]))
        async with session.get(events_url) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            text = await asyncio.wait_for(response.text(), 30)
    assert "event: started" in text
    assert "event: done" in text


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
