"""A stream's connection (app.http.connection) over raw sockets, as `serve` runs it:
aiohttp lets go of it while an event stream or a Durable Streams SSE read is open, and
gets it back for the client's next request when the stream ends, unless that request
could have been lost."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from redis.asyncio import Redis

from app import events
from app.durable_streams import protocol
from app.http import create_app
from app.http.connection import StreamConnection
from app.http.server import ServiceRunner
from app.http.state import OPEN_STREAMS
from app.keys import Keys
from app.settings import Settings
from app.store import GenerationLog
from tests.durable_streams.conftest import control_events, until_waiting
from tests.http.conftest import Writer, until_subscriptions


class Reader:
    """A reader on a free port, and a raw client connection to it."""

    def __init__(self, app: web.Application, runner: ServiceRunner, port: int) -> None:
        self.app, self.runner, self.port = app, runner, port

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        """A raw client connection, closed after; what runs in it has 10 s."""
        reader, client = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            async with asyncio.timeout(10):
                yield reader, client
        finally:
            client.close()

    @property
    def aiohttp_connections(self) -> int:
        server = self.runner.server
        assert server is not None
        return len(server.connections)


@contextlib.asynccontextmanager
async def serving(settings: Settings, redis: Redis) -> AsyncIterator[Reader]:
    """A reader as `serve` runs it, stopped (within 10 s) when the block ends."""
    app = create_app(settings, redis)
    runner = ServiceRunner(app, settings)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield Reader(app, runner, runner.addresses[0][1])
    finally:
        async with asyncio.timeout(10):
            await runner.cleanup()


@pytest.fixture
async def served(settings: Settings, redis: Redis) -> AsyncIterator[Reader]:
    async with serving(settings, redis) as reader:
        yield reader


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), headers


async def read_chunk(reader: asyncio.StreamReader) -> bytes:
    size = int(await reader.readuntil(b"\r\n"), 16)
    data = await reader.readexactly(size + 2)
    return data[:-2]


async def read_chunked_body(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while chunk := await read_chunk(reader):
        body += chunk
    return body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status, headers = await read_head(reader)
    if status == 204:
        return status, b""
    if headers.get("Transfer-Encoding") == "chunked":
        return status, await read_chunked_body(reader)
    return status, await reader.readexactly(int(headers["Content-Length"]))


async def read_to_body_end(reader: asyncio.StreamReader) -> bytes:
    """The rest of a chunked body whose data holds no CRLF (SSE's), as sent."""
    return await reader.readuntil(b"\r\n0\r\n\r\n")


def access_lines(caplog: pytest.LogCaptureFixture, path: str) -> list[dict[str, Any]]:
    """The access lines of requests for `path`: the message, then the fields."""
    return [
        {"message": record.getMessage(), **vars(record)}
        for record in caplog.records
        if record.name == "tokentape.access" and record.getMessage().split()[1] == path
    ]


def get(path: str, *headers: str, version: str = "HTTP/1.1") -> bytes:
    return "\r\n".join([f"GET {path} {version}", "Host: t", *headers, "", ""]).encode()


def to_stream(method: str, name: str, data: bytes = b"", *headers: str) -> bytes:
    """A Durable Streams request with a text body: PUT creates, POST appends (with
    `Stream-Closed: true`, the last time)."""
    head = [f"{method} /v1/stream/{name} HTTP/1.1", "Host: t", "Content-Type: text/plain"]
    head += [*headers, f"Content-Length: {len(data)}", "", ""]
    return "\r\n".join(head).encode() + data


async def test_aiohttp_lets_go_of_a_live_stream_and_serves_the_next_request_after_it(
    served: Reader, log: GenerationLog
) -> None:
    writer = await Writer.start(log)
    async with served.connection() as (reader, client):
        client.write(get(writer.events_url))
        status, headers = await read_head(reader)
        assert (status, headers["Transfer-Encoding"]) == (200, "chunked")
        assert await read_chunk(reader) == b"retry: 1000\n\n"
        await until_subscriptions(served.app, 1)
        assert served.aiohttp_connections == 0
        # A request sent while the stream is open waits for its end, as aiohttp has it.
        client.write(get("/healthz"))
        await writer.tokens(2)
        body = await read_chunked_body(reader)
        assert body.count(b"\nevent: token\n") == 2
        assert b"\nevent: done\n" in body
        assert await read_response(reader) == (200, b'{"status":"ok"}')
        assert served.aiohttp_connections == 1
        client.write(get("/healthz"))  # and the connection goes on as any other
        assert await read_response(reader) == (200, b'{"status":"ok"}')


async def test_an_event_streams_access_line_is_written_when_it_ends_with_all_it_sent(
    served: Reader, log: GenerationLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tokentape.access")
    loop = asyncio.get_running_loop()
    writer = await Writer.start(log)
    async with served.connection() as (reader, client):
        client.write(get(writer.events_url))
        sent = await reader.readuntil(b"\r\n\r\n")
        head_at = loop.time()
        await until_subscriptions(served.app, 1)
        assert access_lines(caplog, writer.events_url) == []  # not when the stream starts
        await asyncio.sleep(0.1)  # not waiting for anything: the stream stays open this long
        appending_at = loop.time()  # the stream cannot end before its last event is sent
        await writer.tokens(2)
        sent += await read_to_body_end(reader)
        client.write(get("/healthz"))  # answered once the stream has ended
        assert (await read_response(reader))[0] == 200

    (line,) = access_lines(caplog, writer.events_url)
    assert line["message"] == f"GET {writer.events_url} 200"
    assert line["bytes_sent"] == len(sent)
    assert line["duration_ms"] >= round((appending_at - head_at) * 1000, 1)
    assert line["generation_id"] == writer.generation_id
    assert (line["end_reason"], line["position"], line["first_seq"], line["events_sent"]) == (
        "terminal",
        0,
        1,
        3,
    )


async def test_a_durable_streams_sse_reads_access_line_is_written_when_it_ends(
    served: Reader, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tokentape.access")
    async with served.connection() as (reader, client):
        client.write(to_stream("PUT", "s") + to_stream("POST", "s", b"one"))
        client.write(to_stream("POST", "s", b"", f"{protocol.CLOSED}: true"))
        assert [(await read_response(reader))[0] for _ in range(3)] == [201, 204, 204]
        client.write(get("/v1/stream/s?offset=-1&live=sse"))
        sent = await reader.readuntil(b"\r\n\r\n") + await read_to_body_end(reader)
        client.write(get("/healthz"))
        assert (await read_response(reader))[0] == 200

    (line,) = [line for line in access_lines(caplog, "/v1/stream/s") if "GET" in line["message"]]
    assert line["message"] == "GET /v1/stream/s 200"
    assert line["bytes_sent"] == len(sent)


async def unanswered(request: web.BaseRequest) -> web.StreamResponse:
    raise AssertionError("no request reaches this server")


@pytest.mark.parametrize("request_first", [True, False], ids=["request-first", "end-first"])
async def test_a_streams_access_line_waits_for_both_its_request_and_its_end(
    caplog: pytest.LogCaptureFixture, request_first: bool
) -> None:
    caplog.set_level(logging.INFO, logger="tokentape.access")
    connection = StreamConnection(web.Server(unanswered), chunked=True, reusable=True)
    connection.bytes_sent = 42
    started = asyncio.get_running_loop().time() - 2.0
    if request_first:
        connection.request_line("GET", "/x", 200, "127.0.0.1", started)
    connection.log_access({"end_reason": "terminal"})
    connection.log_access({"end_reason": "client_gone"})  # the first end counts
    if not request_first:
        connection.request_line("GET", "/x", 200, "127.0.0.1", started)

    (line,) = access_lines(caplog, "/x")
    assert (line["message"], line["bytes_sent"], line["end_reason"]) == (
        "GET /x 200",
        42,
        "terminal",
    )
    assert 2000 <= line["duration_ms"] < 60_000


async def test_the_aiohttp_handler_a_stream_let_go_of_is_freed_at_once(
    served: Reader, log: GenerationLog
) -> None:
    # Not left to the cycle collector, which runs seldom in serve (app/runtime.py).
    def handlers() -> int:
        return sum(isinstance(o, web.RequestHandler) for o in gc.get_objects())

    writer = await Writer.start(log)
    await writer.tokens(1)
    gc.collect()
    gc.disable()
    try:
        async with served.connection() as (reader, client):
            before = handlers()
            for _ in range(5):
                client.write(get(writer.events_url))
                status, body = await read_response(reader)
                assert status == 200
                assert b"\nevent: done\n" in body
            assert handlers() == before  # one for the connection, a new one per stream
    finally:
        gc.enable()


async def test_requests_pipelined_with_the_streams_own_are_sent_again_on_a_new_connection(
    served: Reader, log: GenerationLog
) -> None:
    # Those aiohttp had parsed when the stream took the connection are lost with its
    # handler: the connection closes after the stream, so the client sends them again.
    writer = await Writer.start(log)
    await writer.tokens(1)
    async with served.connection() as (reader, client):
        client.write(get(writer.events_url) + get("/healthz"))
        status, body = await read_response(reader)
        assert status == 200
        assert b"\nevent: done\n" in body
        assert await reader.read() == b""


async def test_head_is_the_streams_head_without_a_body(served: Reader, log: GenerationLog) -> None:
    writer = await Writer.start(log)
    async with served.connection() as (reader, client):
        client.write(get(writer.events_url).replace(b"GET", b"HEAD", 1) + get("/healthz"))
        status, headers = await read_head(reader)
        assert (status, headers["Content-Type"]) == (200, "text/event-stream")
        assert await read_response(reader) == (200, b'{"status":"ok"}')  # no body between


@pytest.mark.parametrize(
    ("version", "headers", "chunked"),
    [("HTTP/1.1", ["Connection: close"], True), ("HTTP/1.0", [], False)],
    ids=["connection-close", "http-1.0"],
)
async def test_a_connection_the_client_does_not_keep_closes_when_its_stream_ends(
    served: Reader, log: GenerationLog, version: str, headers: list[str], chunked: bool
) -> None:
    writer = await Writer.start(log)
    await writer.tokens(1)
    async with served.connection() as (reader, client):
        client.write(get(writer.events_url, *headers, version=version))
        status, response_headers = await read_head(reader)
        assert status == 200
        assert ("Transfer-Encoding" in response_headers) == chunked
        body = await read_chunked_body(reader) if chunked else await reader.read()
        assert body.startswith(b"retry: 1000\n\n")
        assert b'\nevent: done\ndata: {"type":"done"' in body
        assert await reader.read() == b""


async def test_a_reader_that_stops_ends_its_streams_and_closes_their_connections(
    settings: Settings, redis: Redis, log: GenerationLog
) -> None:
    writer = await Writer.start(log)
    async with serving(settings, redis) as served:
        reader, client = await asyncio.open_connection("127.0.0.1", served.port)
        client.write(get(writer.events_url))
        async with asyncio.timeout(10):
            assert (await read_head(reader))[0] == 200
            await until_subscriptions(served.app, 1)
    try:
        async with asyncio.timeout(10):
            assert await read_chunked_body(reader) == b"retry: 1000\n\n"  # ended, not cut
            assert await reader.read() == b""
    finally:
        client.close()


async def test_a_reader_that_stops_lets_go_of_a_stream_whose_client_reads_nothing(
    settings: Settings, redis: Redis, log: GenerationLog
) -> None:
    # The drain ends the stream, but its last chunk cannot leave: the client's buffers
    # are full. After TOKENTAPE_STREAM_DRAIN_SECONDS the stream is dropped, not waited on
    # for the write timeout (an hour here) or for ever.
    configured = settings.replace(stream_drain_seconds=0.5, write_timeout_seconds=3600)
    writer = await Writer.start(log)
    with socket.socket() as client:
        async with serving(configured, redis) as served:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(("127.0.0.1", served.port))
            client.sendall(get(writer.events_url))
            await until_subscriptions(served.app, 1)
            for _ in range(40):  # far more than both ends' socket buffers hold
                await writer.append(*[events.Token(text="x" * 65536)] * 4)
    assert served.app[OPEN_STREAMS].count == 0


async def test_a_durable_streams_sse_read_lets_go_of_aiohttp_and_serves_the_next_request(
    served: Reader,
) -> None:
    async with served.connection() as (reader, client), served.connection() as (wreader, wclient):
        wclient.write(to_stream("PUT", "s") + to_stream("POST", "s", b"one"))
        assert (await read_response(wreader))[0] == 201
        assert (await read_response(wreader))[0] == 204
        client.write(get("/v1/stream/s?offset=-1&live=sse"))
        status, headers = await read_head(reader)
        assert (status, headers["Content-Type"]) == (200, "text/event-stream")
        assert (await read_chunk(reader)).startswith(b"event: data\ndata:one\n\nid: ")
        assert served.aiohttp_connections == 1  # the writer's
        wclient.write(to_stream("POST", "s", b"two"))
        assert (await read_response(wreader))[0] == 204
        assert (await read_chunk(reader)).startswith(b"event: data\ndata:two\n\nid: ")
        wclient.write(to_stream("POST", "s", b"", f"{protocol.CLOSED}: true"))  # no data
        assert (await read_response(wreader))[0] == 204
        body = await read_chunked_body(reader)  # the closing control event, and the end
        assert [event.get("streamClosed") for event in control_events(body)] == [True]
        client.write(get("/healthz"))
        assert await read_response(reader) == (200, b'{"status":"ok"}')


async def test_a_reader_that_stops_ends_its_durable_streams_sse_reads(
    settings: Settings, redis: Redis
) -> None:
    # Not left waiting for `stream_sse_seconds` (an hour here): the client comes back to
    # another reader from its offset.
    async with serving(settings.replace(stream_sse_seconds=3600), redis) as served:
        reader, client = await asyncio.open_connection("127.0.0.1", served.port)
        async with asyncio.timeout(10):
            client.write(to_stream("PUT", "s"))
            assert (await read_response(reader))[0] == 201
            client.write(get("/v1/stream/s?offset=-1&live=sse"))
            assert (await read_head(reader))[0] == 200
            first = await read_chunk(reader)
            await until_waiting(served.app, Keys(settings.key_prefix).stream_channel("s"))
    try:
        async with asyncio.timeout(10):
            assert await read_chunked_body(reader) == b""  # ended, not cut
            assert await reader.read() == b""
            assert control_events(first)[0]["upToDate"] is True
    finally:
        client.close()


def test_aiohttp_still_has_what_a_stream_connection_relies_on() -> None:
    """app.http.connection uses these private parts of aiohttp."""
    assert {"_manager", "_messages"} <= set(web.RequestHandler.__slots__)
    assert "_parser" in BaseProtocol.__slots__
    assert inspect.iscoroutinefunction(BaseProtocol._drain_helper)
    assert list(inspect.signature(web.Server.connection_lost).parameters) == [
        "self",
        "handler",
        "exc",
    ]
