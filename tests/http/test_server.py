"""A reader's connections as `tokentape serve` runs them (app.http.server), over raw
sockets: what aiohttp refuses before any handler is the JSON error with a 4xx and no
ERROR in the log, and a client that never finishes its request is let go."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from app import events
from app.http import create_app
from app.http.server import ServiceRunner
from app.settings import Settings
from app.store import GenerationLog
from tests.http.conftest import Writer, until_subscriptions

Served = Callable[..., Awaitable[int]]


@pytest.fixture
async def served(settings: Settings, redis: Redis) -> AsyncIterator[Served]:
    """`await served(**settings changes)`: a reader on a free port, as serve runs it."""
    runners: list[web.AppRunner] = []

    async def serve(**changes: Any) -> int:
        configured = settings.replace(**changes)
        runner = ServiceRunner(create_app(configured, redis), configured)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port: int = runner.addresses[0][1]
        return port

    yield serve
    for runner in runners:
        await runner.cleanup()


async def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `raw`, read the answer to the end of the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), headers, body


JSON_BODY = b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}'


def post(*headers: str, body: bytes = JSON_BODY) -> bytes:
    lines = ["POST /v1/generations HTTP/1.1", "Host: test", "Connection: close", *headers]
    lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "malformed_request"),
        (b"GET /v1/generations/x?token=\xff\xfesecret-token HTTP/1.1\r\nHost: t\r\n\r\n", 400, "malformed_request"),
        (post("Content-Type: application/json", "Content-Type: text/plain"), 400, "duplicate_header"),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "header_too_large"),
        (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n", 431, "header_too_large"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 431, "header_too_large"),
        (post("Content-Type: application/json", "Content-Encoding: gzip"), 415, "unsupported_content_encoding"),
        (post("Content-Type: application/json", "Content-Encoding: br"), 415, "unsupported_content_encoding"),
        (b"POST /v1/generations HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "malformed_request"),
        (b"GET /v1/generations/AAAAAAAAAAAAAAAAAAAAAA/events?last_event_id=1%0d%0aevent:%20x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 400, "invalid_query"),
    ],
    ids=[
        "request-line", "non-ascii-query", "duplicate-content-type", "oversized-header",
        "too-many-headers", "oversized-url", "gzip-body", "br-body", "broken-chunks",
        "crlf-in-position",
    ],
)  # fmt: skip
async def test_what_aiohttp_refuses_is_the_json_error_and_no_error_log(
    served: Served,
    caplog: pytest.LogCaptureFixture,
    raw: bytes,
    status: int,
    code: str,
) -> None:
    port = await served()
    caplog.set_level(logging.DEBUG)
    answered, headers, body = await exchange(port, raw)
    assert answered == status
    assert headers["Content-Type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["code"] == code
    assert error["message"]
    assert b"secret-token" not in body  # the request is never echoed
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [r for r in caplog.records if r.exc_info] == []
    assert "secret-token" not in caplog.text


async def test_a_handler_that_fails_is_a_json_500_with_its_traceback_in_the_log(
    settings: Settings, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings, redis)

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug of ours")

    app.router.add_get("/broken", broken)
    runner = ServiceRunner(app, settings)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        raw = b"GET /broken HTTP/1.1\r\nHost: t\r\n\r\n"
        status, _, body = await exchange(port, raw)
    finally:
        await runner.cleanup()
    assert status == 500
    assert json.loads(body)["error"]["code"] == "internal"
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info is not None


def test_aiohttp_still_has_what_the_runner_relies_on() -> None:
    """app.http.server overrides these private parts; a release that changes them must
    fail here before it serves plain-text errors again."""
    parameters = list(inspect.signature(web.RequestHandler.handle_error).parameters)
    assert parameters == ["self", "request", "status", "exc", "message"]
    assert "handle_error" in vars(web.RequestHandler)
    assert inspect.iscoroutinefunction(web.AppRunner._make_server)
    source = inspect.getsource(web.Server.__call__)
    assert "RequestHandler(self, loop=self._loop, **self._kwargs)" in source


async def test_a_client_that_never_finishes_its_request_head_is_let_go(served: Served) -> None:
    port = await served(header_timeout_seconds=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # no blank line: the head goes on

    async def trickle() -> None:
        # A header line now and then does not keep it open: the head must end in time.
        while not writer.is_closing():
            writer.write(b"X-Slow: 1\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)

    trickling = asyncio.create_task(trickle())
    try:
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed, nothing answered
    finally:
        trickling.cancel()
        writer.close()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await trickling


async def test_a_body_that_trickles_is_refused_in_time(served: Served) -> None:
    port = await served(body_timeout_seconds=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post("Content-Type: application/json", body=JSON_BODY)[:-20])
    await writer.drain()
    try:
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
    finally:
        writer.close()
        await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "body_timeout"


async def test_the_access_log_has_the_path_as_sent_and_no_query(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    port = await served()
    caplog.set_level(logging.INFO, logger="tokentape.access")
    raw = b"GET /v1/x%0D%0Aforged%20line?token=abc HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    status, _, _ = await exchange(port, raw)
    assert status == 404
    [line] = [r.getMessage() for r in caplog.records if r.name == "tokentape.access"]
    assert line == "GET /v1/x%0D%0Aforged%20line 404"


async def test_a_client_that_never_reads_its_stream_is_let_go(
    settings: Settings, redis: Redis, log: GenerationLog
) -> None:
    configured = settings.replace(write_timeout_seconds=0.5)
    app = create_app(configured, redis)
    runner = ServiceRunner(app, configured)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        writer = await Writer.start(log)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills fast
        client.connect(("127.0.0.1", runner.addresses[0][1]))
        client.sendall(f"GET {writer.events_url} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        await until_subscriptions(app, 1)
        # Far more than both ends' socket buffers hold, while the client reads nothing.
        for _ in range(40):
            await writer.append(*[events.Token(text="x" * 65536)] * 4)
        await until_subscriptions(app, 0)  # the server let go of it
        client.close()
    finally:
        await runner.cleanup()
