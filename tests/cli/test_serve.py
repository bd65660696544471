"""`tokentape serve`: HTTP, the worker beside it, signals and the embedded Redis, in this
process and as a real process."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from app import serve
from app.settings import Settings
from tests.cli import stubs
from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parents[2]
SERVING = re.compile(rb"^tokentape serving on (http://\S+)(?: \(embedded Redis at (redis://\S+) )?")

# Runs the real CLI with the stand-in web app and worker, so the process runtime is
# tested on its own: signals, the embedded Redis, shutdown order, exit code.
STUBBED_CLI = """
import sys
from app import cli, serve, work
from tests.cli import stubs
serve.create_app = stubs.create_app
serve.Worker = work.Worker = stubs.Worker
sys.exit(cli.main(sys.argv[1:]))
"""


# -- serve in this process -------------------------------------------------------


async def test_serve_answers_http_and_stops_its_worker(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stop = asyncio.Event()
    settings = Settings(redis_url=REDIS_URL, port=0)
    stubs.Worker.instances.clear()
    task = asyncio.create_task(
        serve.serve(
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
        serve.serve(
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
    code = await serve.serve(settings, with_worker=False, app_factory=stubs.create_app)
    assert code == 1


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
