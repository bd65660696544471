"""Real tokentape processes for the client to read from, under the test's key prefix."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.client import Entry
from app.keys import check_generation_id
from app.store import GenerationLog
from tests.conftest import REDIS_URL, free_port

ROOT = Path(__file__).resolve().parents[2]
# A reconnecting client waits this long at first (the server's `retry:`).
RETRY_MILLISECONDS = 100


class TokentapeProcess:
    """`python -m app <command>`, ready once it printed its first line."""

    def __init__(self, process: asyncio.subprocess.Process, port: int | None) -> None:
        self.process = process
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def kill(self) -> None:
        """SIGKILL: open connections are cut at once, as when a machine dies."""
        self.process.kill()
        await self.process.wait()


StartProcess = Callable[..., Awaitable[TokentapeProcess]]


@pytest.fixture
async def start_process(key_prefix: str, redis: Redis) -> AsyncIterator[StartProcess]:
    """Start `python -m app` processes under this test's prefix; killed after the test,
    and then the prefix's keys deleted (by the `redis` fixture, torn down after this one).

    `serve` gets a free port unless given one (a restarted reader takes its old one).
    """
    started: list[TokentapeProcess] = []

    async def start(
        command: str, *args: str, port: int | None = None, **env: str
    ) -> TokentapeProcess:
        argv = [command, "--redis", REDIS_URL, *args]
        if command == "serve":
            port = port or free_port()
            argv += ["--port", str(port)]
        environment = {
            **os.environ,
            "TOKENTAPE_KEY_PREFIX": key_prefix,
            "TOKENTAPE_RETRY_MILLISECONDS": str(RETRY_MILLISECONDS),
            **env,
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app", *argv,
            cwd=ROOT, env=environment, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        started.append(TokentapeProcess(process, port))
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line.startswith(b"tokentape "), f"{command} did not start: {line!r}"
        return started[-1]

    yield start
    for process in started:
        if process.process.returncode is None:
            process.signal(signal.SIGCONT)  # a frozen process cannot die of SIGKILL otherwise
            await process.kill()


async def log_of(log: GenerationLog, generation_id: str) -> list[Entry]:
    """Every event the log holds for the generation, as the client hands them out."""
    entries: list[Entry] = []
    async for page in log.pages(check_generation_id(generation_id)):
        entries += [Entry(entry.seq, entry.event()) for entry in page]
    return entries


class ClientLog(logging.Handler):
    """The client's log records, each also waking whoever waits for one that matches."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self._waiters: list[tuple[str, asyncio.Future[None]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        for text, waiter in self._waiters:
            if text in message and not waiter.done():
                waiter.set_result(None)

    async def wait_for(self, text: str, count: int = 1) -> None:
        while sum(text in message for message in self.messages) < count:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append((text, waiter))
            try:
                await waiter
            finally:
                self._waiters.remove((text, waiter))


@pytest.fixture
def client_log() -> Iterator[ClientLog]:
    handler = ClientLog()
    logger = logging.getLogger("app.client")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)
