"""Reader processes: a fixed number of Redis connections whatever the streams; several on one port."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from app import events
from app.generations import parse_request
from app.keys import Keys, new_generation_id
from app.settings import Settings
from app.store import GenerationLog
from tests.conftest import REDIS_URL, free_port

ROOT = Path(__file__).resolve().parents[2]
REQUEST = parse_request(b'{"model":"sim","messages":[{"role":"user","content":"x"}]}')


class Service:
    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture
def start_serve(key_prefix: str) -> Iterator[object]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, ready_lines: int = 1) -> Service:
        port = free_port()
        env = {**os.environ, "TOKENTAPE_KEY_PREFIX": key_prefix}
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app",
                "serve",
                "--redis",
                REDIS_URL,
                "--port",
                str(port),
                *args,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
        )
        started.append(process)
        assert process.stdout is not None
        for _ in range(ready_lines):
            line = process.stdout.readline()
            assert line.startswith(b"tokentape serving on"), line
        return Service(process, port)

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


async def reader_connections(redis: Redis, pids: set[int]) -> dict[int, int]:
    """Redis connections per reader pid, from CLIENT LIST names `tokentape-reader-<pid>`."""
    counts = dict.fromkeys(pids, 0)
    for client in await redis.client_list():
        name = client.get("name", "")
        if name.startswith("tokentape-reader-") and int(name.rsplit("-", 1)[1]) in counts:
            counts[int(name.rsplit("-", 1)[1])] += 1
    return counts


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        yield client


async def open_streams(
    session: aiohttp.ClientSession, base: str, generation_ids: list[str]
) -> list[aiohttp.ClientResponse]:
    async def open_one(generation_id: str) -> aiohttp.ClientResponse:
        response = await session.get(f"{base}/v1/generations/{generation_id}/events")
        assert response.status == 200
        await response.content.readany()  # the retry frame: the stream is open
        return response

    return list(await asyncio.gather(*(open_one(g) for g in generation_ids)))


async def test_reader_redis_connections_stay_flat_as_streams_grow(
    start_serve: object, redis: Redis, settings: Settings, session: aiohttp.ClientSession
) -> None:
    service = start_serve()  # type: ignore[operator]
    log = GenerationLog(redis, settings)
    generation_ids = []
    leases = []
    for _ in range(150):
        generation_id = new_generation_id()
        await log.create(generation_id, REQUEST)
        lease = await log.acquire(generation_id, "test")
        assert lease is not None
        generation_ids.append(generation_id)
        leases.append(lease)
    pid = service.process.pid

    few = await open_streams(session, service.url, generation_ids[:2])
    with_few = (await reader_connections(redis, {pid}))[pid]
    many = await open_streams(session, service.url, generation_ids[2:])
    # Every stream has to read at once: they contend for the same few connections.
    for lease in leases:
        await log.append(lease, 1, [events.Token(text="x")] * 20)
    for response in many[:20]:
        assert b"id: 20\n" in await _read_until(response, b"id: 20\n")
    with_many = (await reader_connections(redis, {pid}))[pid]
    # The pool opens connections lazily up to its cap, never past it: 150 busy streams
    # hold no more than the configured few.
    assert 1 <= with_few <= with_many <= Settings().reader_redis_connections < len(many)
    for response in few + many:
        response.close()


async def test_long_polled_durable_streams_share_the_hubs_connection(
    start_serve: object, redis: Redis, settings: Settings, session: aiohttp.ClientSession
) -> None:
    service = start_serve()  # type: ignore[operator]
    pid = service.process.pid
    names = [f"chat/{i}" for i in range(40)]
    text = {"Content-Type": "text/plain"}
    for name in names:
        async with session.put(f"{service.url}/v1/stream/{name}", headers=text) as created:
            assert created.status == 201
    generation_ids = []
    for _ in range(5):
        generation_id = new_generation_id()
        await GenerationLog(redis, settings).create(generation_id, REQUEST)
        generation_ids.append(generation_id)
    generations = await open_streams(session, service.url, generation_ids)

    async def long_poll(name: str) -> bytes:
        params = {"offset": "now", "live": "long-poll"}
        async with session.get(f"{service.url}/v1/stream/{name}", params=params) as response:
            assert response.status == 200
            return await response.read()

    polls = [asyncio.create_task(long_poll(name)) for name in names]
    try:
        keys = Keys(settings.key_prefix)
        async with asyncio.timeout(10):
            # Until every stream's channel is subscribed: each long-poll waits on it then.
            while any([await _subscribers(redis, keys.stream_channel(n)) == 0 for n in names]):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        clients = [
            client
            for client in await redis.client_list()
            if client.get("name", "") == f"tokentape-reader-{pid}"
        ]
        # The hub's pub/sub connection carries the streams' channels beside the generations'.
        assert [client["flags"] for client in clients].count("P") == 1
        assert len(clients) <= Settings().reader_redis_connections
        for name in names:
            async with session.post(f"{service.url}/v1/stream/{name}", headers=text, data=name):
                pass
        assert await asyncio.gather(*polls) == [name.encode() for name in names]
    finally:
        for poll in polls:
            poll.cancel()
    for response in generations:
        response.close()


async def _subscribers(redis: Redis, channel: str) -> int:
    reply = await redis.pubsub_numsub(channel)
    return int(reply[0][1])


async def _read_until(response: aiohttp.ClientResponse, marker: bytes) -> bytes:
    received = b""
    async with asyncio.timeout(10):
        while marker not in received:
            received += await response.content.readany()
    return received


async def test_processes_share_one_port_and_stop_together(
    start_serve: object, redis: Redis, settings: Settings, session: aiohttp.ClientSession
) -> None:
    service = start_serve("--processes", "2", ready_lines=3)  # type: ignore[operator]
    log = GenerationLog(redis, settings)
    generation_id = new_generation_id()
    await log.create(generation_id, REQUEST)
    lease = await log.acquire(generation_id, "test")
    assert lease is not None
    await log.append(lease, 1, [events.Token(text="hi"), events.Done(reason="stop")])

    children = {int(p) for p in _children(service.process.pid)}
    assert len(children) == 2
    # Enough connections that the kernel gives both readers some.
    for _ in range(40):
        async with session.get(f"{service.url}/v1/generations/{generation_id}/events") as r:
            assert b"event: done" in await r.read()
    counts = await reader_connections(redis, children)
    assert all(count >= 1 for count in counts.values()), counts

    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=20) == 0
    assert not any(_alive(child) for child in children)


async def test_readers_stop_when_their_supervisor_is_killed(start_serve: object) -> None:
    service = start_serve("--processes", "2", ready_lines=3)  # type: ignore[operator]
    children = {int(p) for p in _children(service.process.pid)}
    assert len(children) == 2
    service.process.kill()  # SIGKILL: no chance to stop them itself
    service.process.wait()
    async with asyncio.timeout(20):
        await asyncio.gather(*(_exited(child) for child in children))


async def _exited(pid: int) -> None:
    """Until process `pid` (not ours) exits: its pidfd becomes readable then."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, gone.set_result, None)  # readable once: removed right after
    try:
        await gone
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
