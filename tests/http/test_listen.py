"""The reader's listening site: every waiting connection is taken in one wake-up."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from app.http import listen
from app.http.listen import AcceptAllSite


@pytest.fixture
async def runner() -> AsyncIterator[web.AppRunner]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    yield runner
    await runner.cleanup()


async def get(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    response = await reader.read()
    writer.close()
    return response


async def test_every_waiting_connection_is_accepted_in_one_wake_up(
    runner: web.AppRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    wake_ups = 0
    accept = listen._Listener._accept

    def counting(self: listen._Listener, sock: socket.socket) -> None:
        nonlocal wake_ups
        wake_ups += 1
        accept(self, sock)

    monkeypatch.setattr(listen._Listener, "_accept", counting)
    site = AcceptAllSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site.addresses[0][1]
    # Connected (the kernel completes loopback handshakes) before the loop polls again.
    waiting = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    for sock in waiting:
        sock.setblocking(False)
        sock.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    loop = asyncio.get_running_loop()
    responses = await asyncio.gather(*(loop.sock_recv(sock, 4096) for sock in waiting))
    assert all(r.startswith(b"HTTP/1.1 200") for r in responses)
    assert wake_ups == 1
    for sock in waiting:
        sock.close()


async def test_serves_until_stopped_then_refuses(
    runner: web.AppRunner,
) -> None:
    site = AcceptAllSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site.addresses[0][1]
    assert (await get(port)).endswith(b"hello")
    await site.stop()
    with pytest.raises(ConnectionRefusedError):
        await get(port)


async def test_the_runner_stops_it_on_cleanup() -> None:
    runner = web.AppRunner(web.Application())
    await runner.setup()
    site = AcceptAllSite(runner, "127.0.0.1", 0)
    await site.start()
    assert runner.sites == {site}
    port = site.addresses[0][1]
    await runner.cleanup()
    assert runner.sites == set()
    with pytest.raises(ConnectionRefusedError):
        await get(port)
