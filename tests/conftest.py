"""Shared fixtures: a real Redis under a per-test key prefix, and own redis-server processes.

Tests never flush a Redis they did not start: each test writes under its own
prefix and deletes exactly those keys afterwards.

A test marked `ON_EVERY_BACKEND` runs twice: on the Redis above, and on a Redis
Cluster of this session's own (3 primaries, a replica each), started once for the
whole run from the redis-server binary. The store and the app are built on
`store_redis`, which is the `redis` fixture's client on one Redis and a
`RedisCluster` on the cluster.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app.embedded import (
    EmbeddedUnavailable,
    RedisClusterProcesses,
    RedisProcess,
    find_cli,
    find_server,
    free_port,
)
from app.generations import parse_request
from app.keys import new_generation_id
from app.settings import Settings
from app.store import GenerationLog, Lease

__all__ = ["ON_EVERY_BACKEND", "REDIS_URL", "free_port"]

REDIS_URL = os.environ.get("TOKENTAPE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
_REQUEST = parse_request(b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}')

# Runs the test on one Redis and on the session's Redis Cluster.
ON_EVERY_BACKEND = pytest.mark.parametrize("backend", ["redis", "cluster"], indirect=True)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Put the root logger back the way the test found it: for a test that calls
    `configure_logging` (or `cli.main`, which does), whose handler would write to a
    stream closed after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    # configure_logging turns off what records look up for nobody; pytest's own reports
    # name the file and line of a record.
    looked_up = (logging._srcfile, logging.logThreads, logging.logProcesses)
    multiprocessing = logging.logMultiprocessing
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging._srcfile, logging.logThreads, logging.logProcesses = looked_up
    logging.logMultiprocessing = multiprocessing


@pytest.fixture
def key_prefix() -> str:
    return f"tttest:{uuid.uuid4().hex[:12]}"


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """ "redis" (one Redis), or "cluster" where a test is marked ON_EVERY_BACKEND."""
    return str(getattr(request, "param", "redis"))


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A Redis Cluster of this session's own: 3 primaries, each with a replica."""
    binary = find_server()
    if binary is None or find_cli(binary) is None:
        pytest.skip("the Redis Cluster tests need redis-server and redis-cli on PATH")
    directory = tmp_path_factory.mktemp("redis-cluster")
    cluster = RedisClusterProcesses(binary, directory, log_dir=directory)
    try:
        cluster.start()
    except EmbeddedUnavailable as exc:
        pytest.fail(f"could not start a Redis Cluster: {exc}")
    yield cluster
    cluster.kill()


@pytest.fixture
def settings(key_prefix: str, backend: str, request: pytest.FixtureRequest) -> Settings:
    if backend == "cluster":
        cluster: RedisClusterProcesses = request.getfixturevalue("redis_cluster")
        return Settings(
            redis_url=cluster.url, redis_cluster=True, key_prefix=key_prefix, heartbeat_seconds=15.0
        )
    return Settings(redis_url=REDIS_URL, key_prefix=key_prefix, heartbeat_seconds=15.0)


@pytest.fixture
async def store_redis(
    redis: Redis, backend: str, settings: Settings, key_prefix: str
) -> AsyncIterator[Redis | RedisCluster]:
    """The client the store and the app are built on (see the module docstring)."""
    if backend != "cluster":
        yield redis
        return
    assert settings.redis_url is not None
    cluster = RedisCluster.from_url(settings.redis_url, socket_timeout=None)
    yield cluster
    # Every primary's keys of this test, wherever the slots moved meanwhile.
    await cluster.initialize()
    for node in cluster.get_primaries():
        keys = [
            key
            async for key in cluster.scan_iter(
                match=f"{key_prefix}:*", count=1000, target_nodes=node
            )
        ]
        for key in keys:
            await cluster.delete(key)
    await cluster.aclose()


@pytest.fixture
async def redis(key_prefix: str) -> AsyncIterator[Redis]:
    # socket_timeout=None: blocking reads (XREADGROUP BLOCK, pub/sub) must not be cut short.
    client = Redis.from_url(REDIS_URL, socket_timeout=None)
    try:
        await client.ping()
    except Exception as exc:  # pragma: no cover - environment problem, not a test result
        await client.aclose()
        pytest.fail(f"tests need a real Redis at {REDIS_URL}: {exc}")
    yield client
    keys = [k async for k in client.scan_iter(match=f"{key_prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
def log(store_redis: Redis | RedisCluster, settings: Settings) -> GenerationLog:
    return GenerationLog(store_redis, settings)


async def leased_generation(log: GenerationLog, worker_id: str = "worker-a") -> tuple[str, Lease]:
    """A new generation, created and leased as a worker that took its job would hold it."""
    generation_id = new_generation_id()
    await log.create(generation_id, _REQUEST)
    lease = await log.acquire(generation_id, worker_id)
    assert lease is not None
    return generation_id, lease


# What a copy of the log taken at seq ARGV[1] holds, made in place in one step (its
# writer may be appending): the entries after it gone, the stream's last id and the
# metadata's last seq back there.
_ROLL_BACK = """
local rows = redis.call('XRANGE', KEYS[1], (ARGV[1] + 1) .. '-0', '+')
for _, row in ipairs(rows) do redis.call('XDEL', KEYS[1], row[1]) end
if #rows > 0 then redis.call('XSETID', KEYS[1], ARGV[1] .. '-0') end
redis.call('HSET', KEYS[2], 'last_seq', ARGV[1])
"""


async def roll_back(log: GenerationLog, generation_id: str, to_seq: int) -> None:
    """Make the log what Redis would give back from a copy taken at `to_seq` (a snapshot,
    a replica behind its primary)."""
    keys = (log.keys.log(generation_id), log.keys.meta(generation_id))
    await log._redis.eval(_ROLL_BACK, 2, *keys, to_seq)


class Awaited(logging.Handler):
    """Sets `seen` when a warning containing `text` is logged (add it to a logger)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.WARNING)
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


class FakeClock:
    """An `app.clock.Clock` whose time moves only when slept on or advanced; each sleep may
    oversleep a little, as on a loaded machine."""

    def __init__(self, oversleep: float = 0.0) -> None:
        self.time = 100.0
        self.oversleep = oversleep
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.time += seconds + self.oversleep

    def advance(self, seconds: float) -> None:
        self.time += seconds


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    """Redis servers of the test's own, each on a free port with its files in `tmp_path`;
    `make(*options)` passes redis-server options (e.g. "--appendonly", "yes")."""
    binary = find_server()
    if binary is None:
        pytest.fail("redis-server is not on PATH")
    servers: list[RedisProcess] = []

    def make(*options: str) -> RedisProcess:
        server = RedisProcess(binary, tmp_path / f"redis-{len(servers)}", config=options)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()
