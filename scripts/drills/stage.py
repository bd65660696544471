"""What a drill runs on: its own redis-server, real reader and worker processes, and a
client that reads a generation the way a browser's EventSource does."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import aiohttp
import msgspec

from app.client import Client, Generation
from app.embedded import RedisProcess, find_server, free_port
from app.events import TERMINAL_TYPES
from app.generations import SimParams
from app.sse import Parser

ROOT = Path(__file__).resolve().parents[2]

# The service's settings in every drill: faults a few seconds long must be ridden out
# (and a lease given up, and taken over) within them.
SETTINGS = {
    "TOKENTAPE_LEASE_SECONDS": "5",
    "TOKENTAPE_REDIS_TIMEOUT_SECONDS": "1",
    "TOKENTAPE_HEARTBEAT_SECONDS": "1",
    "TOKENTAPE_RETRY_MILLISECONDS": "250",
    "TOKENTAPE_READER_RECHECK_SECONDS": "1",
    "TOKENTAPE_SHUTDOWN_GRACE_SECONDS": "1",
}
# Redis as the drills run it unless one says otherwise: every write on disk before it
# is acknowledged.
DURABLE = ("--appendonly", "yes", "--appendfsync", "always")
WORKERS = 2
# A connection silent for this long (no event, no heartbeat) counts as a hang: a
# browser's EventSource would wait on it forever.
SILENCE_SECONDS = 4.0

Say = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Received:
    """One event as the client got it: its `id:` (the position after it), type and data."""

    id: int
    type: str
    data: str


class ServiceProcess:
    """`python -m app <command>`, ready once it printed its start-up line; its stderr in a file."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log

    @classmethod
    async def start(
        cls, name: str, argv: list[str], env: Mapping[str, str], log: Path
    ) -> ServiceProcess:
        with log.open("ab") as errors:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "app", *argv,
                cwd=ROOT, env={**os.environ, **env},
                stdout=asyncio.subprocess.PIPE, stderr=errors,
            )  # fmt: skip
        started = cls(name, process, log)
        assert process.stdout is not None
        async with asyncio.timeout(30):
            line = await process.stdout.readline()
        if not line.startswith(b"tokentape "):
            await started.stop()
            raise RuntimeError(f"{name} did not start ({line!r}); see {log}")
        return started

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


class Stage:
    """A redis-server on a free port with its files in `directory`, a reader process and
    `WORKERS` worker processes on it."""

    def __init__(self, directory: Path, say: Say, redis_config: tuple[str, ...]) -> None:
        binary = find_server()
        if binary is None:
            raise RuntimeError("the drills need redis-server on PATH")
        self.directory = directory
        self.say = say
        self.redis = RedisProcess(
            binary, directory / "redis", config=redis_config, log_file=directory / "redis.log"
        )
        self.port = free_port()
        self.processes: list[ServiceProcess] = []
        self._began = time.monotonic()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def elapsed(self) -> float:
        return time.monotonic() - self._began

    async def start(self) -> None:
        self.redis.start()
        redis_url = self.redis.url
        for i in range(1, WORKERS + 1):
            self.processes.append(
                await ServiceProcess.start(
                    f"worker-{i}",
                    ["worker", "--redis", redis_url],
                    {**SETTINGS, "TOKENTAPE_WORKER_ID": f"worker-{i}"},
                    self.directory / f"worker-{i}.log",
                )
            )
        self.processes.append(
            await ServiceProcess.start(
                "reader",
                ["serve", "--redis", redis_url, "--port", str(self.port)],
                SETTINGS,
                self.directory / "reader.log",
            )
        )
        self.say(
            f"started redis-server {' '.join(self.redis.config)} on port {self.redis.port}, "
            f"{WORKERS} workers and a reader on port {self.port} "
            f"(lease {SETTINGS['TOKENTAPE_LEASE_SECONDS']} s, "
            f"Redis timeout {SETTINGS['TOKENTAPE_REDIS_TIMEOUT_SECONDS']} s, "
            f"heartbeat {SETTINGS['TOKENTAPE_HEARTBEAT_SECONDS']} s)"
        )

    async def stop(self) -> None:
        for process in self.processes:
            await process.stop()
        self.redis.thaw()
        self.redis.kill()

    async def create(self, sim: SimParams) -> Generation:
        async with Client(self.url) as client:
            return await client.create(
                "sim", [{"role": "user", "content": "a drill"}], sim=msgspec.to_builtins(sim)
            )

    def logs(self) -> str:
        """Where each process's log is, for a drill that failed."""
        return ", ".join(str(p.log) for p in self.processes)


@contextlib.asynccontextmanager
async def staged(
    directory: Path, say: Say, redis_config: tuple[str, ...] = DURABLE
) -> AsyncIterator[Stage]:
    stage = Stage(directory, say, redis_config)
    try:
        await stage.start()
        yield stage
    finally:
        await stage.stop()


class EventSource:
    """A browser's EventSource, recorded: reconnects after `retry:` with `Last-Event-ID`
    whenever a 200 response ends or the network fails, stops at a 204, and gives up for
    good on any other status (as a browser does). Nothing is repaired: every event the
    server sent is kept, so a drill checks the server, not a client's own fixes.

    Unlike a browser it stops after the terminal event (a page closes its source then),
    and it takes a connection silent for `SILENCE_SECONDS` for a hang, which it records.
    """

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.last_event_id = ""
        self.retry_seconds = 3.0  # a browser's usual default until the server says
        self.received: list[Received] = []
        self.statuses: list[int] = []
        self.hangs = 0
        self.network_errors = 0
        self.gave_up: str | None = None  # what made it stop for good, as a browser would
        self._counted = asyncio.Event()
        self._wanted = 0

    async def run(self) -> None:
        """Read until the terminal event, a 204, or a status a browser gives up on."""
        while True:
            headers = {"Accept": "text/event-stream"}
            if self.last_event_id:
                headers["Last-Event-ID"] = self.last_event_id
            timeout = aiohttp.ClientTimeout(sock_connect=2, sock_read=SILENCE_SECONDS)
            try:
                async with self.session.get(self.url, headers=headers, timeout=timeout) as response:
                    self.statuses.append(response.status)
                    if response.status == 204:
                        return
                    content_type = response.headers.get("Content-Type", "")
                    if response.status != 200 or not content_type.startswith("text/event-stream"):
                        self.gave_up = f"HTTP {response.status} {content_type}"
                        return
                    if await self._read(response):
                        return
            except TimeoutError:
                self.hangs += 1
            except aiohttp.ClientError:
                self.network_errors += 1
            # The browser's reconnection time: the pace of a reconnect, not a stand-in
            # for an event.
            await asyncio.sleep(self.retry_seconds)

    async def _read(self, response: aiohttp.ClientResponse) -> bool:
        """Record one response's events; True at the terminal event."""
        parser = Parser()
        async for chunk in response.content.iter_any():
            for message in parser.feed(chunk):
                # The parser's id is the one in force: the event's own, or the last before it.
                self.last_event_id = message.id or self.last_event_id
                self.received.append(
                    Received(int(self.last_event_id or 0), message.event, message.data)
                )
                if len(self.received) >= self._wanted:
                    self._counted.set()
                if message.event in TERMINAL_TYPES:
                    return True
            if parser.retry is not None:
                self.retry_seconds = parser.retry / 1000
        return False

    async def until_received(self, count: int) -> None:
        """Until `count` events have arrived."""
        self._wanted = count
        if len(self.received) < count:
            self._counted.clear()
            await self._counted.wait()
