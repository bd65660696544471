"""The benchmark's load generator: one asyncio loop per client process.

`scripts/bench.py` starts N of these (multiprocessing, spawn) and hands each a
`ClientJob`; each answers with a `ClientReport` of raw measurements that the
coordinator merges. The definitions of the figures (TTFT, drift, complete) live
here, where they are measured; docs/benchmarks.md explains them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import math
import os
import re
import resource
import signal
import time
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

import aiohttp
import uvloop

AS_FAST_AS_POSSIBLE = 1e9  # the sim's "no pacing" rate
TERMINAL_TYPES = (b"done", b"error")

JobKind = Literal["generate", "read", "idle"]


# -- reading SSE on the client side -----------------------------------------

# `app.sse.Parser` decodes and dispatches line by line in Python: about 220k
# events/s on a whole core here, below what scenario (d) must measure (300k/s)
# and too slow for 50k/s shared with everything else on a 2-core machine. This
# reader takes the complete events of a chunk and pulls out (id, type) with one
# C-level regex pass (millions of events/s). It relies on what both servers
# write: `id:` then `event:` as the first two lines of a numbered event, LF or
# CRLF line endings, and one-line JSON data (JSON escapes raw newlines).
# Comments, `retry:` and id-less events (tokentape's `gap`) are skipped.
# tests/test_bench_reader.py checks it against `app.sse.Parser`.
_EVENT_HEAD = re.compile(rb"^id: (\d+)\r?\nevent: ([A-Za-z_]+)\r?$", re.MULTILINE)


class EventReader:
    """Incremental (seq, type) extraction from an SSE byte stream."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        buffer = self._pending + chunk if self._pending else chunk
        cut = max(buffer.rfind(b"\n\n") + 2, buffer.rfind(b"\n\r\n") + 3)
        if cut < 3:  # neither found: no complete event yet
            self._pending = buffer
            return []
        self._pending = buffer[cut:]
        heads: list[tuple[bytes, bytes]] = _EVENT_HEAD.findall(buffer, 0, cut)
        return heads


# -- what one client process measures ---------------------------------------


@dataclasses.dataclass
class ClientJob:
    """One client process's share of a scenario."""

    kind: JobKind
    base_url: str
    streams: int
    deadline: float  # time.monotonic(); the job stops by itself then
    tokens: int = 0
    rate: float = AS_FAST_AS_POSSIBLE
    events_url: str = ""  # kind "read": the shared generation
    requested_at: float = 0.0  # kind "read": when its POST was sent
    seed: int = 0
    # Streams one after another per task: "read", the same generation again (catch-up
    # repeats); "generate", a new generation each time (first tokens, in a row).
    reads: int = 1
    connect_concurrency: int = 256
    create_concurrency: int = 64
    # Sent as `Authorization: Bearer` with every request (the reader then has API keys).
    api_key: str = ""


@dataclasses.dataclass
class ClientReport:
    """Raw measurements of one client process (merged by the coordinator)."""

    streams: int = 0
    complete: int = 0
    failures: Counter[str] = dataclasses.field(default_factory=Counter)
    events: int = 0
    ttft: array[float] = dataclasses.field(default_factory=lambda: array("d"))
    # (a), (b): from sending the POST to its response, and to the GET's response headers.
    created: array[float] = dataclasses.field(default_factory=lambda: array("d"))
    connected: array[float] = dataclasses.field(default_factory=lambda: array("d"))
    drift: array[float] = dataclasses.field(default_factory=lambda: array("d"))
    first_event_at: float = math.inf
    last_event_at: float = 0.0
    # The busiest client process's CPU share of one core: near 1.0, the client
    # itself was the bottleneck and the figures understate the reader.
    busiest_client_cpu: float = 0.0

    def merge(self, other: ClientReport) -> None:
        self.busiest_client_cpu = max(self.busiest_client_cpu, other.busiest_client_cpu)
        self.streams += other.streams
        self.complete += other.complete
        self.failures.update(other.failures)
        self.events += other.events
        self.ttft.extend(other.ttft)
        self.created.extend(other.created)
        self.connected.extend(other.connected)
        self.drift.extend(other.drift)
        self.first_event_at = min(self.first_event_at, other.first_event_at)
        self.last_event_at = max(self.last_event_at, other.last_event_at)


class StreamFailure(Exception):
    """Why one stream did not count as complete (the message is the failure's class)."""


def sim_body(tokens: int, rate: float, seed: int) -> dict[str, Any]:
    return {
        "model": "sim",
        "messages": [{"role": "user", "content": "bench"}],
        "sim": {"tokens": tokens, "tokens_per_second": rate, "seed": seed},
    }


class ClientRun:
    """Runs one ClientJob in one process: one aiohttp session, unlimited connector."""

    def __init__(self, job: ClientJob, session: aiohttp.ClientSession) -> None:
        self.job = job
        self.session = session
        self.report = ClientReport(streams=job.streams * job.reads)
        self.connect_gate = asyncio.Semaphore(job.connect_concurrency)
        self.create_gate = asyncio.Semaphore(job.create_concurrency)
        self.connected = 0
        self.all_connected = asyncio.Event()
        self.release = asyncio.Event()
        # Each ended stream's (token offsets, connected_at), turned into drift once every
        # stream has ended: the streams of one generation end together, and working
        # out one's drift (thousands of tokens) before reading the others' last chunks
        # would make theirs look late.
        self.live: list[tuple[array[float], float]] = []

    async def run(self) -> None:
        job = self.job
        tasks = [asyncio.create_task(self._stream(job.seed + i)) for i in range(job.streams)]
        try:
            async with asyncio.timeout_at(job.deadline):
                await asyncio.gather(*tasks)
        except TimeoutError:
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for offsets, connected_at in self.live:
                self.report.drift.extend(live_drift(offsets, job.rate, connected_at))

    async def _stream(self, seed: int) -> None:
        for _ in range(self.job.reads):
            await self._attempt(seed)

    async def _attempt(self, seed: int) -> None:
        job = self.job
        try:
            if job.kind == "read":
                # Fan-out: TTFT from the generation's POST; catch-up: from this GET.
                await self._read(job.events_url, job.requested_at or time.monotonic())
            else:
                async with self.create_gate:
                    # From the POST leaving this client, not from waiting for a slot.
                    requested_at = time.monotonic()
                    events_url = await self._create(seed)
                    self.report.created.append(time.monotonic() - requested_at)
                await self._read(events_url, requested_at)
            self.report.complete += 1
        except StreamFailure as failure:
            self.report.failures[str(failure)] += 1
        except asyncio.CancelledError:
            self.report.failures["timeout" if job.kind != "idle" else "not connected"] += 1
            raise
        except (aiohttp.ClientError, OSError) as exc:
            self.report.failures[f"client error: {type(exc).__name__}"] += 1
        finally:
            if job.kind == "idle":
                self._settle()

    async def _create(self, seed: int) -> str:
        body = sim_body(self.job.tokens, self.job.rate, seed)
        async with self.session.post(f"{self.job.base_url}/v1/generations", json=body) as resp:
            if resp.status != 201:
                raise StreamFailure(f"create answered {resp.status}")
            created = await resp.json()
        return str(created["events_url"])

    def _settle(self) -> None:
        """Idle jobs: every stream has either connected or failed."""
        if self.connected + sum(self.report.failures.values()) >= self.job.streams:
            self.all_connected.set()

    async def _read(self, events_url: str, requested_at: float) -> None:
        job = self.job
        async with self.connect_gate:
            resp = await self.session.get(f"{job.base_url}{events_url}")
        try:
            if resp.status != 200:
                raise StreamFailure(f"events answered {resp.status}")
            connected_at = time.monotonic()
            if job.kind == "generate":
                self.report.connected.append(connected_at - requested_at)
            if job.kind == "idle":
                self.connected += 1
                self._settle()
                await self.release.wait()
                return
            await self._consume(resp, requested_at, connected_at)
        finally:
            resp.release()

    async def _consume(
        self, resp: aiohttp.ClientResponse, requested_at: float, connected_at: float
    ) -> None:
        report, rate = self.report, self.job.rate
        reader = EventReader()
        expected_seq = 1
        token_index = 0
        # arrival - index/rate for each token: the schedule offset it was delivered at.
        offsets = array("d")
        first_token_at: float | None = None
        finished = False
        async for chunk in resp.content.iter_any():
            arrived_at = time.monotonic()
            heads = reader.feed(chunk)
            if not heads:
                continue
            report.first_event_at = min(report.first_event_at, arrived_at)
            report.last_event_at = arrived_at
            report.events += len(heads)
            for raw_seq, kind in heads:
                seq = int(raw_seq)
                if seq != expected_seq:
                    raise StreamFailure("gap" if seq > expected_seq else "duplicate")
                expected_seq += 1
                if kind == b"token":
                    if first_token_at is None:
                        first_token_at = arrived_at
                    offsets.append(arrived_at - token_index / rate)
                    token_index += 1
                elif kind in TERMINAL_TYPES:
                    finished = True
                    if (raw_seq, kind) != heads[-1]:
                        raise StreamFailure("events after the terminal event")
            if finished:
                break
        if not finished:
            raise StreamFailure("ended without a terminal event")
        try:
            async with asyncio.timeout(5):
                rest = await resp.content.read()
        except TimeoutError:
            raise StreamFailure("did not end after the terminal event") from None
        if reader.feed(rest):
            raise StreamFailure("events after the terminal event")
        if first_token_at is not None:
            report.ttft.append(first_token_at - requested_at)
        if offsets and rate < AS_FAST_AS_POSSIBLE:
            self.live.append((offsets, connected_at))


def live_drift(offsets: Sequence[float], rate: float, connected_at: float) -> Iterator[float]:
    """How far each live token arrived behind the stream's own schedule.

    The schedule is token k at anchor + k/rate, anchored at the earliest offset
    seen (so drift >= 0, and a stream delivered exactly at its pace has drift 0
    whatever its start latency, which TTFT measures). Tokens scheduled before the
    client's response headers arrived are catch-up, not live: left out.
    """
    anchor = min(offsets)
    return (
        offset - anchor
        for index, offset in enumerate(offsets)
        if anchor + index / rate >= connected_at
    )


async def run_client_job(job: ClientJob, conn: Connection) -> ClientReport:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        headers=authorization(job.api_key),
    ) as session:
        client = ClientRun(job, session)
        if job.kind != "idle":
            await client.run()
            return client.report
        running = asyncio.create_task(client.run())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(job.deadline):
                await client.all_connected.wait()
        conn.send(("connected", client.connected))
        # The coordinator samples the reader while these connections idle, then
        # releases them; bounded by the job's deadline either way.
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(job.deadline):
                await loop.run_in_executor(None, conn.recv)
        client.release.set()
        await running
        return client.report


def authorization(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def client_process_main(conn: Connection) -> None:
    """Entry of a client process: run jobs from the coordinator until told to stop."""
    raise_fd_limit()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator stops us
    while True:
        job = conn.recv()
        if job is None:
            return
        cpu_before, started = cpu_seconds(os.getpid()), time.monotonic()
        # uvloop, like the reader and workers: the load generator shares the machine's
        # two cores with them, so its CPU per event is CPU they do not get.
        gc.freeze()  # as app.runtime.run_loop does
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            report = runner.run(run_client_job(job, conn))
        elapsed = time.monotonic() - started
        report.busiest_client_cpu = (cpu_seconds(os.getpid()) - cpu_before) / max(elapsed, 1e-9)
        conn.send(("report", report))


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process, from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
