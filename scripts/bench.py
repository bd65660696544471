"""Black-box benchmark of tokentape's SSE reader beside a naive reference reader.

Both run as subprocesses on the same Redis, fed by the same tokentape worker
processes with the `sim` model, and are measured through the public HTTP API only:

  (a) live     many concurrent generations, one reader each
  (b) fast     fewer, faster concurrent generations, one reader each
  (c) fanout   one generation read by many readers at once
  (d) catchup  a finished generation read from the start
  (e) idle     many connections waiting on generations that never start
  (f) first    one generation at a time, nothing else running, many in a row

It prints one table with ratios (and `--json FILE` writes the raw figures). What
each column means, and the exact command of the recorded run: docs/benchmarks.md.

    python scripts/bench.py --quick                 # < 60 s smoke check
    python scripts/bench.py                         # the full run (minutes)
    python scripts/bench.py --impl naive --naive-producer inprocess --quick
    python scripts/bench.py --quick --cluster        # tokentape on a Redis Cluster of its own
    python scripts/bench.py --scenarios f            # time to first token, one at a time
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python scripts/bench.py`: make the `scripts` package importable
    # (spawned client processes inherit this sys.path).
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import resource
import secrets
import subprocess
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, Literal

import aiohttp
import redis.asyncio as aioredis

from app.embedded import RedisClusterProcesses, RedisProcess, find_server
from app.settings import Settings
from app.store import GenerationLog
from scripts.bench_client import (
    AS_FAST_AS_POSSIBLE,
    TERMINAL_TYPES,
    ClientJob,
    ClientReport,
    EventReader,
    JobKind,
    authorization,
    client_process_main,
    raise_fd_limit,
    sim_body,
)
from scripts.bench_procs import (
    HOST,
    ROOT,
    ReaderProbe,
    cpu_seconds,
    free_port,
    process_tree,
    start_process,
    stop_process,
)

NAIVE_SERVER = ROOT / "scripts" / "naive_server.py"
# `tokentape serve` on a Redis the environment names (`Service.start_beside`'s argv).
SERVE_ARGV = (sys.executable, "-m", "app", "serve", "--port", "{port}")

Implementation = Literal["naive", "tokentape"]


# -- the client processes ----------------------------------------------------


class ClientPool:
    """N client processes (one asyncio loop each), reused across scenarios."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        for _ in range(processes):
            ours, theirs = context.Pipe()
            process = context.Process(target=client_process_main, args=(theirs,), daemon=True)
            process.start()
            self._pipes.append(ours)
            self._processes.append(process)

    @property
    def size(self) -> int:
        return len(self._pipes)

    async def run(
        self,
        jobs: Sequence[ClientJob],
        while_connected: Callable[[], Any] | None = None,
    ) -> ClientReport:
        """Run one job per process; idle jobs are held until `while_connected` returns."""
        pipes = self._pipes[: len(jobs)]
        for pipe, job in zip(pipes, jobs, strict=True):
            pipe.send(job)
        deadline = max(job.deadline for job in jobs) + 30
        if jobs[0].kind == "idle":
            for pipe in pipes:
                await self._receive(pipe, "connected", deadline)
            if while_connected is not None:
                await while_connected()
            for pipe in pipes:
                pipe.send("release")
        merged = ClientReport()
        for pipe in pipes:
            report = await self._receive(pipe, "report", deadline)
            assert isinstance(report, ClientReport)
            merged.merge(report)
        return merged

    @staticmethod
    async def _receive(pipe: Connection, tag: str, deadline: float) -> object:
        def receive() -> object:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"a client process sent no {tag!r} before its deadline")
            message_tag, value = pipe.recv()
            assert message_tag == tag, (message_tag, tag)
            return value

        return await asyncio.to_thread(receive)

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in self._processes:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join(5)


def split(total: int, parts: int) -> list[int]:
    return [n for n in (total // parts + (i < total % parts) for i in range(parts)) if n]


# -- scenarios -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scenario:
    key: str
    name: str
    kind: JobKind
    streams: int  # SSE connections open at once
    tokens: int  # per generation
    rate: float  # tokens per second
    # Streams one after another on each connection's task: (d) the same finished
    # generation read again, (f) a new generation created and read each time.
    reads: int = 1
    # One client task runs them all (they must be in a row), not split over processes.
    in_a_row: bool = False

    @property
    def label(self) -> str:
        return f"({self.key}) {self.name}"

    @property
    def seconds(self) -> float:
        """Nominal duration: the sim's pacing of one generation, times the reads in a row."""
        return 0.0 if self.rate >= AS_FAST_AS_POSSIBLE else self.reads * self.tokens / self.rate

    @property
    def attempts(self) -> int:
        """Streams read in all."""
        return self.streams * self.reads


def scenarios_from(args: argparse.Namespace) -> list[Scenario]:
    scale = float(args.scale)

    def count(n: int) -> int:
        return max(1, round(n * scale))

    def tokens(n: int) -> int:
        return max(5, round(n * scale))

    def in_a_row(n: int) -> int:
        # Percentiles of fewer than 20 say little: scaled like any count, but not
        # below 20 (nor below what was asked, when that is less).
        return max(min(n, 20), round(n * scale))

    every = [
        Scenario("a", "live", "generate", count(args.live_generations), tokens(args.live_tokens),
                 args.live_rate),
        Scenario("b", "fast", "generate", count(args.fast_generations), tokens(args.fast_tokens),
                 args.fast_rate),
        Scenario("c", "fanout", "read", count(args.fanout_readers), tokens(args.fanout_tokens),
                 args.fanout_rate),
        # started + tokens + done = catchup_events
        Scenario("d", "catchup", "read", args.catchup_readers,
                 max(1, count(args.catchup_events) - 2), AS_FAST_AS_POSSIBLE,
                 reads=args.catchup_reads),
        Scenario("e", "idle", "idle", count(args.idle_connections), 1, 1.0),
        # Short generations, not scaled: only the first token is timed.
        Scenario("f", "first", "generate", 1, args.first_tokens, args.first_rate,
                 reads=in_a_row(args.first_generations), in_a_row=True),
    ]  # fmt: skip
    wanted = set(args.scenarios.split(","))
    return [s for s in every if s.key in wanted or s.name in wanted]


@dataclasses.dataclass
class Figures:
    """One scenario on one implementation: what the table and the JSON report."""

    scenario: str
    implementation: str
    streams: int
    complete: int
    failures: dict[str, int]
    events: int
    events_per_second: float | None
    ttft_p50: float | None
    ttft_p99: float | None
    # The start of (a) and (b): POST answered, GET headers, first token (from the POST
    # leaving the client), as {"p50": s, "p90": s, "p99": s}.
    created: dict[str, float | None]
    connected: dict[str, float | None]
    ttft: dict[str, float | None]
    drift_p50: float | None
    drift_p99: float | None
    drift_max: float | None  # the worst live token of all streams
    drift_samples: int
    rss_before: int
    rss_peak: int
    rss_per_connection: float | None
    redis_connections_before: int
    redis_connections_peak: int
    reader_processes: int  # the reader's process tree: divide RSS and connections by it
    wall_seconds: float
    reader_cpu_seconds: float
    # The producers and Redis share the machine: when they are saturated the
    # scenario measures them, not the reader.
    workers_cpu_seconds: float
    redis_cpu_seconds: float
    busiest_client_cpu: float


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    return {f"p{p}": percentile(values, p) for p in (50, 90, 99)}


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclasses.dataclass
class Bench:
    """One invocation: the Redis, the workers, the client processes, the readers."""

    args: argparse.Namespace
    redis_url: str
    # Every Redis process of the run: one, or a cluster's nodes (their CPU and connections add up).
    redis_urls: tuple[str, ...]
    key_prefix: str
    run_dir: Path
    clients: ClientPool
    naive_redis_connections: int
    worker_pids: list[int] = dataclasses.field(default_factory=list)

    def workers_cpu(self) -> float:
        return sum(cpu_seconds(pid) for worker in self.worker_pids for pid in process_tree(worker))

    api_key: str = ""

    def env(self, key_prefix: str) -> dict[str, str]:
        env = {
            **os.environ,
            "TOKENTAPE_REDIS_URL": self.redis_url,
            "TOKENTAPE_REDIS_CLUSTER": "true" if self.args.cluster else "false",
            "TOKENTAPE_KEY_PREFIX": key_prefix,
            "PYTHONUNBUFFERED": "1",
        }
        if self.api_key:
            # Access control on, its quotas off: the scenarios are one key's bursts.
            env |= {
                "TOKENTAPE_API_KEYS": self.api_key,
                "TOKENTAPE_SECRET": secrets.token_urlsafe(32),
                "TOKENTAPE_MAX_RUNNING_PER_KEY": "0",
                "TOKENTAPE_MAX_CREATIONS_PER_MINUTE": "0",
            }
        return env

    def start_reader(
        self, implementation: Implementation, port: int, key_prefix: str, idle: bool
    ) -> subprocess.Popen[bytes]:
        python = sys.executable
        if implementation == "naive":
            # Idle generations must stay queued: never produced in-process.
            producer = "worker" if idle else self.args.naive_producer
            argv = [python, str(NAIVE_SERVER), "--redis", self.redis_url, "--port", str(port),
                    "--max-redis-connections", str(self.naive_redis_connections),
                    "--producer", producer]  # fmt: skip
        else:
            template = self.args.serve_command.split()
            fields = {"python": python, "redis": self.redis_url, "port": str(port)}
            argv = [part.format(**fields) for part in template] + self.args.serve_arg
        return start_process(argv, self.env(key_prefix), self.run_dir / f"{implementation}.log")

    async def measure(self, scenario: Scenario, implementation: Implementation) -> Figures:
        # Idle generations live under their own prefix, which no worker consumes:
        # they stay queued for as long as the scenario holds them.
        idle = scenario.kind == "idle"
        key_prefix = f"{self.key_prefix}-idle" if idle else self.key_prefix
        port = free_port()
        reader = self.start_reader(implementation, port, key_prefix, idle)
        base_url = f"http://{HOST}:{port}"
        try:
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                auto_decompress=False,
                headers=authorization(self.api_key),
            ) as session:
                await wait_ready(session, base_url, reader)
                if not idle:
                    # Warm-up: imports, Redis connections and the worker path are hot.
                    await read_generation(session, base_url, tokens=3, rate=AS_FAST_AS_POSSIBLE)
                probe = ReaderProbe(reader.pid, tuple(map(port_of, self.redis_urls)))
                rss_before, redis_before = await asyncio.to_thread(probe.sample)
                cpu_before = sum(map(cpu_seconds, process_tree(reader.pid)))
                workers_before = self.workers_cpu()
                redis_before_cpu = await redis_cpu(self.redis_urls)
                probe.peak_rss, probe.peak_redis_connections = rss_before, redis_before
                started = time.monotonic()
                watching = asyncio.create_task(probe.watch(self.args.sample_interval))
                try:
                    report = await self._drive(scenario, session, base_url, probe)
                finally:
                    watching.cancel()
                    await asyncio.gather(watching, return_exceptions=True)
                wall = time.monotonic() - started
                reader_cpu = sum(map(cpu_seconds, process_tree(reader.pid))) - cpu_before
                workers_cpu = self.workers_cpu() - workers_before
                redis_cpu_used = await redis_cpu(self.redis_urls) - redis_before_cpu
        finally:
            stop_process(reader)
        window = report.last_event_at - report.first_event_at
        growth = probe.peak_rss - rss_before
        return Figures(
            scenario=scenario.label,
            implementation=implementation,
            streams=report.streams,
            complete=report.complete,
            failures=dict(report.failures),
            events=report.events,
            # (f) is one short generation at a time: its pace, not a throughput.
            events_per_second=(
                report.events / window
                if report.events > 1 and window > 0 and not scenario.in_a_row
                else None
            ),
            ttft_p50=percentile(report.ttft, 50),
            ttft_p99=percentile(report.ttft, 99),
            created=percentiles(report.created),
            connected=percentiles(report.connected),
            ttft=percentiles(report.ttft),
            drift_p50=percentile(report.drift, 50),
            drift_p99=percentile(report.drift, 99),
            drift_max=max(report.drift, default=None),
            drift_samples=len(report.drift),
            rss_before=rss_before,
            rss_peak=probe.peak_rss,
            rss_per_connection=growth / scenario.streams if scenario.streams else None,
            redis_connections_before=redis_before,
            redis_connections_peak=probe.peak_redis_connections,
            reader_processes=probe.processes,
            wall_seconds=wall,
            reader_cpu_seconds=reader_cpu,
            workers_cpu_seconds=workers_cpu,
            redis_cpu_seconds=redis_cpu_used,
            busiest_client_cpu=report.busiest_client_cpu,
        )

    async def _drive(
        self,
        scenario: Scenario,
        session: aiohttp.ClientSession,
        base_url: str,
        probe: ReaderProbe,
    ) -> ClientReport:
        args = self.args
        job = ClientJob(
            kind=scenario.kind,
            base_url=base_url,
            streams=0,
            deadline=time.monotonic() + 3 * scenario.seconds + 30 + scenario.attempts * 0.01,
            tokens=scenario.tokens,
            rate=scenario.rate,
            reads=scenario.reads,
            connect_concurrency=args.connect_concurrency,
            create_concurrency=args.create_concurrency,
            api_key=self.api_key,
        )
        if scenario.kind == "read":
            requested_at = time.monotonic()
            events_url = await create_generation(session, base_url, scenario.tokens, scenario.rate)
            job.events_url = events_url
            if scenario.rate >= AS_FAST_AS_POSSIBLE:
                # Catch-up: read it through once so it is finished; TTFT counts from each GET.
                await read_all(session, base_url + events_url)
            else:
                job.requested_at = requested_at
        jobs = client_jobs(scenario, job, self.clients.size)

        async def hold() -> None:
            await asyncio.to_thread(probe.sample)
            await asyncio.sleep(args.idle_hold)
            await asyncio.to_thread(probe.sample)

        return await self.clients.run(jobs, while_connected=hold)


def client_jobs(scenario: Scenario, job: ClientJob, processes: int) -> list[ClientJob]:
    """The scenario's streams split between the client processes (one job each).

    A scenario run in a row is one job: its streams must not overlap.
    """
    shares = [scenario.streams] if scenario.in_a_row else split(scenario.streams, processes)
    seeds = [sum(shares[:i]) for i in range(len(shares))]
    return [
        dataclasses.replace(job, streams=share, seed=seed)
        for share, seed in zip(shares, seeds, strict=True)
    ]


async def wait_ready(
    session: aiohttp.ClientSession, base_url: str, process: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the reader exited with {process.returncode}; see its log")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.get(f"{base_url}/v1/generations/{'0' * 22}") as resp:
                await resp.read()
                return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the reader at {base_url} did not answer within 30 s")


@dataclasses.dataclass
class Service:
    """What `start_service` started: the reader's URL and process, the log they share, and
    the environment and folder its processes run with."""

    base_url: str
    serve: subprocess.Popen[bytes]
    log: GenerationLog
    env: dict[str, str]
    run_dir: Path

    async def start_beside(
        self,
        stack: contextlib.AsyncExitStack,
        session: aiohttp.ClientSession,
        name: str,
        argv: Sequence[str],
        cwd: Path = ROOT,
    ) -> tuple[str, subprocess.Popen[bytes]]:
        """Another reader on this service's Redis and key prefix, so the same workers take
        its jobs (see `start_reader`)."""
        return await start_reader(stack, session, self.env, self.run_dir / f"{name}.log", argv, cwd)


async def start_reader(
    stack: contextlib.AsyncExitStack,
    session: aiohttp.ClientSession,
    env: dict[str, str],
    log_path: Path,
    argv: Sequence[str],
    cwd: Path = ROOT,
) -> tuple[str, subprocess.Popen[bytes]]:
    """A reader started with `argv` (`{redis}` and `{port}` filled in) in `cwd`, stopped by
    `stack`, once it answers `session`: its URL and process."""
    port = free_port()
    fields = {"redis": env["TOKENTAPE_REDIS_URL"], "port": str(port)}
    process = start_process([part.format(**fields) for part in argv], env, log_path, cwd)
    stack.callback(stop_process, process)
    base_url = f"http://{HOST}:{port}"
    await wait_ready(session, base_url, process)
    return base_url, process


async def start_service(
    stack: contextlib.AsyncExitStack,
    name: str,
    session: aiohttp.ClientSession,
    *,
    workers: int = 0,
) -> Service:
    """A private redis-server with one `tokentape serve` and `workers` workers on it,
    default settings, all stopped by `stack`; once the reader answers `session`. For the
    scripts that measure one stage (scripts/bench_ttft.py, scripts/bench_get.py)."""
    token = secrets.token_hex(4)
    run_dir = Path("/tmp") / f"tokentape-{name}-{token}"
    run_dir.mkdir(parents=True)
    prefix = f"{name}bench-{token}"
    server = private_redis(run_dir)
    stack.callback(server.stop)
    env = {**os.environ, "TOKENTAPE_REDIS_URL": server.url, "TOKENTAPE_KEY_PREFIX": prefix}
    for index in range(workers):
        worker = start_process(
            [sys.executable, "-m", "app", "worker"], env, run_dir / f"w{index}.log"
        )
        stack.callback(stop_process, worker)
    redis: aioredis.Redis = aioredis.Redis.from_url(server.url)
    stack.push_async_callback(redis.aclose)
    base_url, serve = await start_reader(stack, session, env, run_dir / "serve.log", SERVE_ARGV)
    log = GenerationLog(redis, Settings(redis_url=server.url, key_prefix=prefix))
    return Service(base_url, serve, log, env, run_dir)


async def create_generation(
    session: aiohttp.ClientSession, base_url: str, tokens: int, rate: float
) -> str:
    async with session.post(
        f"{base_url}/v1/generations", json=sim_body(tokens, rate, seed=0)
    ) as resp:
        if resp.status != 201:
            raise RuntimeError(f"POST /v1/generations answered {resp.status}: {await resp.text()}")
        created = await resp.json()
    return str(created["events_url"])


async def read_all(session: aiohttp.ClientSession, url: str) -> int:
    """Read one stream to its terminal event (within 120 s); returns its last seq."""
    reader = EventReader()
    last_seq = 0
    async with asyncio.timeout(120), session.get(url) as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET {url} answered {resp.status}")
        async for chunk in resp.content.iter_any():
            for raw_seq, kind in reader.feed(chunk):
                last_seq = int(raw_seq)
                if kind in TERMINAL_TYPES:
                    return last_seq
    raise RuntimeError(f"GET {url} ended without a terminal event")


async def read_generation(
    session: aiohttp.ClientSession, base_url: str, tokens: int, rate: float
) -> int:
    events_url = await create_generation(session, base_url, tokens, rate)
    return await read_all(session, base_url + events_url)


# -- the table -----------------------------------------------------------------

Better = Literal["lower", "higher", "none"]


@dataclasses.dataclass(frozen=True)
class Column:
    title: str
    value: Callable[[Figures], float | None]
    show: Callable[[float], str]
    better: Better


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}" if seconds >= 0.01 else f"{seconds * 1000:.1f}"


COLUMNS = [
    Column("ttft p50 ms", lambda f: f.ttft_p50, _ms, "lower"),
    Column("ttft p99 ms", lambda f: f.ttft_p99, _ms, "lower"),
    Column("drift p50 ms", lambda f: f.drift_p50, _ms, "lower"),
    Column("drift p99 ms", lambda f: f.drift_p99, _ms, "lower"),
    Column("drift max ms", lambda f: f.drift_max, _ms, "lower"),
    Column("events/s", lambda f: f.events_per_second, lambda v: f"{v:,.0f}", "higher"),
    Column("RSS/conn KiB", lambda f: f.rss_per_connection, lambda v: f"{v / 1024:.1f}", "lower"),
    Column("Redis conns", lambda f: f.redis_connections_peak, lambda v: f"{v:.0f}", "lower"),
]


def advantage(column: Column, naive: Figures, tokentape: Figures) -> str:
    """How many times better tokentape is than naive on this column (> 1: better)."""
    ours, theirs = column.value(tokentape), column.value(naive)
    if ours is None or theirs is None or ours <= 0 or theirs <= 0:
        return "-"
    ratio = theirs / ours if column.better == "lower" else ours / theirs
    return f"{ratio:.1f}x" if ratio < 100 else f"{ratio:,.0f}x"


def render_table(results: Sequence[Figures]) -> str:
    header = ["scenario", "reader", "complete", *(c.title for c in COLUMNS)]
    rows: list[list[str]] = []
    by_scenario: dict[str, dict[str, Figures]] = {}
    for figures in results:
        by_scenario.setdefault(figures.scenario, {})[figures.implementation] = figures
    for scenario, sides in by_scenario.items():
        for implementation, figures in sides.items():
            cells = [
                "-" if (v := column.value(figures)) is None else column.show(v)
                for column in COLUMNS
            ]
            rows.append([scenario, implementation, f"{figures.complete}/{figures.streams}", *cells])
        if "naive" in sides and "tokentape" in sides:
            ratios = [advantage(c, sides["naive"], sides["tokentape"]) for c in COLUMNS]
            rows.append(["", "advantage", "", *ratios])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = (cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
        return "| " + " | ".join(padded) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), separator, *(line(row) for row in rows)])


# -- one invocation ------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark tokentape's SSE reader beside a naive aiohttp-sse + XREAD reader.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--redis", help="Redis URL; default: start a private redis-server for the run")
    add(
        "--cluster",
        action="store_true",
        help="tokentape alone on a private Redis Cluster (3 primaries, a replica each)",
    )
    add("--api-keys", action="store_true",
        help="the reader requires an API key (POSTs send it, events use read tokens)")  # fmt: skip
    add("--impl", default="naive,tokentape", help="readers to measure, comma-separated")
    add("--scenarios", default="a,b,c,d,e,f", help="scenarios to run, by letter or name")
    add("--scale", type=float, default=1.0, help="multiplies every count and token count")
    add("--quick", action="store_true", help="smoke-check sizes (--scale 0.05, short idle hold)")
    add("--json", type=Path, help="write the raw figures here")
    add("--live-generations", type=int, default=1000, help="(a) concurrent generations")
    add("--live-rate", type=float, default=20.0, help="(a) tokens/s of each")
    add("--live-tokens", type=int, default=300, help="(a) tokens of each")
    add("--fast-generations", type=int, default=200, help="(b) concurrent generations")
    add("--fast-rate", type=float, default=50.0, help="(b) tokens/s of each")
    add("--fast-tokens", type=int, default=750, help="(b) tokens of each")
    add("--fanout-readers", type=int, default=500, help="(c) readers of the one generation")
    add("--fanout-rate", type=float, default=100.0, help="(c) tokens/s")
    add("--fanout-tokens", type=int, default=1500, help="(c) tokens")
    add("--catchup-events", type=int, default=50_000, help="(d) events of the finished log")
    add("--catchup-readers", type=int, default=1, help="(d) readers at once (not scaled)")
    add("--catchup-reads", type=int, default=5, help="(d) reads one after another per reader")
    add("--idle-connections", type=int, default=10_000, help="(e) connections, one generation each")
    add("--idle-hold", type=float, default=5.0, help="(e) seconds to hold them once all are open")
    add(
        "--first-generations",
        type=int,
        default=100,
        help="(f) generations one after another (scaled, but not below 20)",
    )
    add("--first-tokens", type=int, default=20, help="(f) tokens of each (not scaled)")
    add("--first-rate", type=float, default=200.0, help="(f) tokens/s of each")
    add("--workers", type=int, default=2, help="tokentape worker processes (the producers)")
    add(
        "--worker-concurrency",
        type=int,
        help="TOKENTAPE_WORKER_CONCURRENCY of each worker; default: tokentape's own default",
    )
    add("--client-processes", type=int, default=2, help="load-generating processes")
    add("--connect-concurrency", type=int, default=256, help="opening connections per client")
    add("--create-concurrency", type=int, default=64, help="POSTs in flight per client")
    add("--sample-interval", type=float, default=1.0, help="seconds between /proc samples")
    add("--naive-producer", choices=("worker", "inprocess"), default="worker",
        help="inprocess: the naive server appends the sim itself (harness tests only)")  # fmt: skip
    add(
        "--serve-command",
        default="{python} -m app serve --redis {redis} --port {port}",
        help="how to start the tokentape reader ({python}, {redis}, {port} are filled in)",
    )
    add(
        "--worker-command",
        default="{python} -m app worker --redis {redis}",
        help="how to start one tokentape worker",
    )
    add("--serve-arg", action="append", default=[],
        help="extra argument for the reader, e.g. --serve-arg=--processes=2")  # fmt: skip
    args = parser.parse_args(argv)
    if args.cluster:
        if args.redis is not None:
            parser.error("--cluster starts a cluster of its own: no --redis")
        # The naive reader speaks to one Redis only.
        args.impl = "tokentape"
    if args.quick:
        args.scale = min(args.scale, 0.05)
        args.idle_hold = min(args.idle_hold, 1.0)
        args.sample_interval = min(args.sample_interval, 0.2)  # scenarios last ~1 s
    return args


def private_redis(run_dir: Path) -> RedisProcess:
    """A redis-server of our own for the run: the naive reader may open thousands of
    connections, which must not exhaust the maxclients of a Redis others share."""
    binary = find_server()
    if binary is None:
        raise RuntimeError("no redis-server on PATH: pass --redis URL")
    server = RedisProcess(
        binary,
        run_dir / "redis",
        config=("--maxclients", "30000", "--protected-mode", "yes"),
        log_file=run_dir / "redis.log",
    )
    server.start()  # here, on the main thread (see app.embedded.die_with_parent)
    return server


def private_cluster(run_dir: Path) -> RedisClusterProcesses:
    """A Redis Cluster of our own for the run: 3 primaries, each with a replica."""
    binary = find_server()
    if binary is None:
        raise RuntimeError("no redis-server on PATH: --cluster needs one")
    cluster = RedisClusterProcesses(
        binary, run_dir / "cluster", config=("--maxclients", "30000"), log_dir=run_dir
    )
    cluster.start()  # here, on the main thread (see app.embedded.die_with_parent)
    return cluster


def port_of(redis_url: str) -> int:
    return int(redis_url.rsplit(":", 1)[1].split("/", 1)[0])


async def redis_cpu(redis_urls: Sequence[str]) -> float:
    """CPU seconds the Redis processes have used (INFO cpu), to see whether they were the
    bottleneck."""
    used = 0.0
    for redis_url in redis_urls:
        client: aioredis.Redis = aioredis.Redis.from_url(redis_url)
        async with client:
            cpu: dict[str, float] = await client.info("cpu")
        used += float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])
    return used


async def naive_pool_size(redis_url: str, largest_scenario: int) -> int:
    """The naive reader's pool: below the Redis's free client slots and our fd limit."""
    client: aioredis.Redis = aioredis.Redis.from_url(redis_url)
    async with client:
        config = await client.config_get("maxclients")
        clients: dict[str, int] = await client.info("clients")
    maxclients, connected = int(config["maxclients"] or 0), int(clients["connected_clients"])
    _soft, fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    free_slots = maxclients - connected - 200  # leave room for everyone else
    free_fds = fd_limit - largest_scenario - 512
    return max(100, min(free_slots, free_fds))


async def delete_keys(redis_url: str, key_prefix: str) -> int:
    """Delete this run's keys (ours only: the prefix is unique to the run)."""
    client: aioredis.Redis = aioredis.Redis.from_url(redis_url)
    deleted = 0
    async with client:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{key_prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(await client.unlink(*batch))
                batch.clear()
        if batch:
            deleted += int(await client.unlink(*batch))
    return deleted


def describe(scenario: Scenario) -> str:
    if scenario.in_a_row:
        return f"{scenario.reads} generations in a row, one at a time"
    reads = f", {scenario.reads} reads each" if scenario.reads > 1 else ""
    return f"{scenario.streams} streams{reads}"


def worker_env(args: argparse.Namespace, env: dict[str, str]) -> dict[str, str]:
    """The workers' environment: tokentape's default concurrency unless one was asked for."""
    if args.worker_concurrency is not None:
        return {**env, "TOKENTAPE_WORKER_CONCURRENCY": str(args.worker_concurrency)}
    return env


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> list[Figures]:
    implementations: list[Implementation] = []
    for name in args.impl.split(","):
        if name not in ("naive", "tokentape"):
            raise SystemExit(f"unknown --impl {name!r}: naive or tokentape")
        implementations.append("naive" if name == "naive" else "tokentape")
    scenarios = scenarios_from(args)
    run_id = secrets.token_hex(4)
    key_prefix = f"ttbench-{run_id}"
    run_dir = Path("/tmp") / f"tokentape-bench-{run_id}"
    run_dir.mkdir(parents=True)
    log(f"run {run_id}: logs in {run_dir}, keys under {key_prefix}*")
    results: list[Figures] = []
    async with contextlib.AsyncExitStack() as stack:
        redis_url = args.redis
        redis_urls: tuple[str, ...] = (redis_url,)
        if args.cluster:
            cluster = private_cluster(run_dir)
            stack.callback(cluster.kill)  # its data goes with it
            redis_url, redis_urls = cluster.url, tuple(node.url for node in cluster.nodes)
        elif redis_url is None:
            server = private_redis(run_dir)
            stack.callback(server.stop)
            redis_url = server.url
            redis_urls = (redis_url,)
        if not args.cluster:
            stack.push_async_callback(delete_keys, redis_url, key_prefix)
        largest = max((s.streams for s in scenarios), default=0)
        bench = Bench(
            args=args,
            redis_url=redis_url,
            redis_urls=redis_urls,
            key_prefix=key_prefix,
            run_dir=run_dir,
            clients=ClientPool(args.client_processes),
            naive_redis_connections=(
                0 if args.cluster else await naive_pool_size(redis_url, largest)
            ),
            api_key=f"ttk_bench_{secrets.token_hex(16)}" if args.api_keys else "",
        )
        stack.callback(bench.clients.close)
        if "tokentape" in implementations or args.naive_producer == "worker":
            env = worker_env(args, bench.env(key_prefix))
            for index in range(args.workers):
                fields = {"python": sys.executable, "redis": redis_url}
                worker = start_process(
                    [part.format(**fields) for part in args.worker_command.split()],
                    env,
                    run_dir / f"worker-{index}.log",
                )
                stack.callback(stop_process, worker)
                bench.worker_pids.append(worker.pid)
        for scenario in scenarios:
            for implementation in implementations:
                log(f"{scenario.label}: {implementation}, {describe(scenario)} …")
                try:
                    figures = await bench.measure(scenario, implementation)
                except (RuntimeError, TimeoutError, aiohttp.ClientError, OSError) as exc:
                    log(f"{scenario.label}: {implementation} failed: {exc}")
                    continue
                f = figures
                log(
                    f"{scenario.label}: {implementation}: {f.complete}/{f.streams} complete in "
                    f"{f.wall_seconds:.1f} s; CPU s: reader {f.reader_cpu_seconds:.1f}, "
                    f"workers {f.workers_cpu_seconds:.1f}, Redis {f.redis_cpu_seconds:.1f}; "
                    f"busiest client at {f.busiest_client_cpu:.0%} of a core"
                    + (f", failures {figures.failures}" if figures.failures else "")
                )
                if f.created["p50"] is not None:
                    starts = "; ".join(
                        f"{name} {'/'.join('-' if v is None else _ms(v) for v in by_p.values())}"
                        for name, by_p in (
                            ("answered", f.created),
                            ("GET headers", f.connected),
                            ("first token", f.ttft),
                        )
                    )
                    log(
                        f"{scenario.label}: {implementation}: ms from the POST (p50/p90/p99): "
                        + starts
                    )
                results.append(figures)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    raise_fd_limit()  # inherited by every process we start
    started = time.monotonic()
    results = asyncio.run(run(args))
    table = render_table(results)
    print(table)
    busy = [f"{r.scenario} {r.implementation}" for r in results if r.busiest_client_cpu > 0.9]
    if busy:
        print(f"note: a client process used > 90 % of a core in: {', '.join(busy)}")
    log(f"total {time.monotonic() - started:.0f} s")
    if args.json:
        report = {
            "command": " ".join(["python", "scripts/bench.py", *sys.argv[1:]]),
            "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "table": table.splitlines(),
            "results": [dataclasses.asdict(figures) for figures in results],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
