"""Shared fixtures: a real Redis under a per-test key prefix, and own redis-server processes.

Tests never flush a Redis they did not start: each test writes under its own
prefix and deletes exactly those keys afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.embedded import answers_ping, free_port
from app.generations import parse_request
from app.keys import new_generation_id
from app.settings import Settings
from app.store import GenerationLog, Lease

__all__ = ["REDIS_URL", "free_port"]

REDIS_URL = os.environ.get("TOKENTAPE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
_REQUEST = parse_request(b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}')


@pytest.fixture
def key_prefix() -> str:
    return f"tttest:{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(key_prefix: str) -> Settings:
    return Settings(redis_url=REDIS_URL, key_prefix=key_prefix, heartbeat_seconds=15.0)


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
def log(redis: Redis, settings: Settings) -> GenerationLog:
    return GenerationLog(redis, settings)


async def leased_generation(log: GenerationLog, worker_id: str = "worker-a") -> tuple[str, Lease]:
    """A new generation, created and leased as a worker that took its job would hold it."""
    generation_id = new_generation_id()
    await log.create(generation_id, _REQUEST)
    lease = await log.acquire(generation_id, worker_id)
    assert lease is not None
    return generation_id, lease


class RedisServer:
    """A redis-server process of the test's own, on a free port; it may be stopped and restarted."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.port = free_port()
        self.directory = directory
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or shutil.which("valkey-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH")
        self.process = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        # PONG, not just a connection: a restarted server with an AOF listens before it
        # has loaded its data, and answers LOADING until then.
        for _ in range(500):
            if answers_ping(self.port):
                return
            if self.process.poll() is not None:
                pytest.fail(f"redis-server exited with {self.process.returncode}")
            # Polling a port until a process answers: there is no event to await.
            time.sleep(0.01)
        pytest.fail("redis-server did not start answering")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    servers: list[RedisServer] = []

    def make(*extra: str) -> RedisServer:
        server = RedisServer(tmp_path, *extra)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
