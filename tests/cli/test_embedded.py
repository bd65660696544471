"""The embedded default Redis: a redis-server child, or fakeredis in-process; both stop cleanly."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from app import embedded, events
from app.embedded import EmbeddedUnavailable, FakeRedisServer, RedisProcess, embedded_redis
from app.generations import parse_request
from app.keys import new_generation_id
from app.settings import Settings
from app.store import GenerationLog
from tests.live import parse_live

ROOT = Path(__file__).resolve().parents[2]
REQUEST = parse_request(b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}')
needs_redis_server = pytest.mark.skipif(
    shutil.which("redis-server") is None and shutil.which("valkey-server") is None,
    reason="no redis-server or valkey-server on PATH",
)


def nothing_on_path(name: str) -> str | None:
    return None


def answers_ping(url: str) -> bool:
    client = SyncRedis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except OSError:
        return False
    except Exception as exc:
        if "Connection" in type(exc).__name__:
            return False
        raise
    finally:
        client.close()


@needs_redis_server
def test_redis_server_on_path_is_started_and_stopped_keeping_its_data(tmp_path: Path) -> None:
    with embedded_redis(tmp_path) as server:
        assert isinstance(server, RedisProcess)
        assert server.kind in embedded.SERVER_BINARIES
        assert server.persistent
        assert server.url.startswith("redis://127.0.0.1:")
        assert answers_ping(server.url)
        assert embedded.running_url(tmp_path) == server.url
        client = SyncRedis.from_url(server.url)
        client.set("kept", "yes")
        client.close()
        pid = server.pid
        assert pid is not None
    assert not answers_ping(server.url)
    # Reaped, not a zombie: the pid is gone from /proc.
    assert not Path(f"/proc/{pid}").exists()
    assert (tmp_path / "redis" / "appendonlydir").is_dir()
    assert not (tmp_path / "embedded.json").exists()

    with embedded_redis(tmp_path) as again:
        client = SyncRedis.from_url(again.url)
        assert client.get("kept") == b"yes"
        client.close()


@needs_redis_server
def test_a_second_serve_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    with (
        embedded_redis(tmp_path),
        pytest.raises(EmbeddedUnavailable, match="another tokentape serve"),
        embedded_redis(tmp_path),
    ):
        pass  # pragma: no cover - refused before


@needs_redis_server
def test_tools_find_the_url_of_a_running_serve_and_nothing_once_it_is_gone(
    tmp_path: Path,
) -> None:
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from app.embedded import embedded_redis\n"
            "with embedded_redis(Path(sys.argv[1])) as s:\n"
            "    print(s.url, flush=True); sys.stdin.read()",
            str(tmp_path),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as holder:
        assert holder.stdout is not None
        assert holder.stdin is not None
        url = holder.stdout.readline().decode().strip()
        assert embedded.running_url(tmp_path) == url
        holder.stdin.close()
        assert holder.wait(timeout=20) == 0
    assert embedded.running_url(tmp_path) is None

    # A file left behind by a serve that was killed names no running server.
    (tmp_path / "embedded.json").write_text('{"url": "redis://127.0.0.1:1/0"}')
    assert embedded.running_url(tmp_path) is None


@needs_redis_server
def test_a_restarted_server_keeps_its_port_or_fails(tmp_path: Path) -> None:
    binary = embedded.find_server()
    assert binary is not None
    server = RedisProcess(binary, tmp_path)
    server.start()
    url = server.url
    server.kill()
    server.start()
    assert server.url == url
    server.kill()
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", server.port))
        taken.listen()
        with pytest.raises(EmbeddedUnavailable):
            server.start()  # not on another port, where no client would look
    assert server.url == url


@needs_redis_server
def test_a_cluster_node_whose_bus_port_was_taken_starts_on_other_ports(tmp_path: Path) -> None:
    binary = embedded.find_server()
    assert binary is not None
    node = RedisProcess(binary, tmp_path, config=("--cluster-enabled", "yes"), cluster_bus=True)
    bus_port = node.cluster_port
    assert bus_port is not None
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", bus_port))
        taken.listen()
        node.start()
    try:
        assert node.cluster_port not in (None, bus_port)
        client = SyncRedis(port=node.port)
        assert client.ping()
        client.close()
    finally:
        node.kill()


@needs_redis_server
def test_redis_server_dies_with_a_killed_parent(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from app.embedded import start; "
            "s = start(Path(sys.argv[1])); print(s.url, flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
    )
    assert parent.stdout is not None
    url = parent.stdout.readline().decode().strip()
    parent.stdout.close()
    assert answers_ping(url)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while answers_ping(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not answers_ping(url)


def test_fallback_is_fakeredis_when_no_server_is_on_path(tmp_path: Path) -> None:
    with embedded_redis(tmp_path, which=nothing_on_path) as server:
        assert isinstance(server, FakeRedisServer)
        assert server.kind == "fakeredis"
        assert not server.persistent
        assert answers_ping(server.url)
    assert not answers_ping(server.url)
    assert not server.running


def test_without_server_or_fakeredis_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_fakeredis() -> FakeRedisServer:
        raise ImportError("fakeredis")

    monkeypatch.setattr(FakeRedisServer, "start", no_fakeredis)
    with pytest.raises(EmbeddedUnavailable, match="apt-get install redis-server"):
        embedded.start(tmp_path, which=nothing_on_path)


async def next_message(pubsub: PubSub) -> bytes:
    # get_message answers None for an ignored subscribe confirmation: read on.
    async with asyncio.timeout(5):
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is not None:
                data: bytes = message["data"]
                return data


def entry_count(reply: Any) -> int:
    """Entries in an XREADGROUP reply: `[[stream, [(id, fields), …]], …]`."""
    return sum(len(entries) for _, entries in reply)


@pytest.fixture
def fake_server(tmp_path: Path) -> FakeRedisServer:
    server = embedded.start(tmp_path, which=nothing_on_path)
    assert isinstance(server, FakeRedisServer)
    return server


async def test_fakeredis_fallback_runs_what_tokentape_needs(fake_server: FakeRedisServer) -> None:
    """The log's Lua scripts via EVALSHA, live pub/sub, and the job queue's consumer group."""
    redis = Redis.from_url(fake_server.url, socket_timeout=None)
    log = GenerationLog(redis, Settings(redis_url=fake_server.url))
    pubsub = redis.pubsub()
    try:
        generation_id = new_generation_id()
        await log.create(generation_id, REQUEST)
        lease = await log.acquire(generation_id, "worker-a")  # EVALSHA, NOSCRIPT, SCRIPT LOAD
        assert lease is not None
        await pubsub.subscribe(log.keys.live_channel(generation_id))
        batch: list[events.Event] = [events.Started(), events.Token(text="a")]
        assert await log.append(lease, 1, batch) == 2
        assert await log.append(lease, 1, batch) == 2  # an idempotent retry
        assert [e.seq for e in parse_live(await next_message(pubsub))] == [1, 2]
        assert await log.append(lease, 3, [events.Done(reason="stop")]) == 3
        assert [e.seq for e in await log.read(generation_id, 0, 10)] == [1, 2, 3]
        state = await log.state(generation_id)
        assert state is not None
        assert state.status == "done"

        keys = log.keys
        await log.jobs.ensure_group()
        await log.jobs.ensure_group()  # BUSYGROUP answered, connection kept
        started = time.monotonic()
        empty = await redis.xreadgroup(
            keys.worker_group, "c1", {keys.jobs: ">"}, count=10, block=300
        )
        assert not empty
        assert time.monotonic() - started >= 0.25  # it blocked

        async def enqueue_later() -> None:
            await asyncio.sleep(0.2)
            await log.jobs.enqueue(generation_id, None)

        producer = asyncio.create_task(enqueue_later())
        reader = Redis.from_url(fake_server.url, socket_timeout=None)
        try:
            woken = await reader.xreadgroup(
                keys.worker_group, "c1", {keys.jobs: ">"}, count=10, block=5000
            )
        finally:
            await reader.aclose()
        await producer
        assert entry_count(woken) == 1

        claimed = await redis.xautoclaim(
            keys.jobs, keys.worker_group, "c2", min_idle_time=0, start_id="0-0"
        )
        assert len(claimed[1]) == 1
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()
        fake_server.stop()
