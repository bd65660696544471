"""Streams that take their connection over from aiohttp once their head is out: the
events endpoint's and the Durable Streams SSE reads.

For each connection aiohttp keeps a request handler (its parser, message queue,
keep-alive timer and task), the request, the task of its handler and the response:
about 10 KiB, twice what an idle event stream needs of its own (scripts/bench_memory.py).
Once a stream's head and first chunk are sent (`TakenOverResponse.start`), aiohttp has
nothing left to do on its connection until the stream ends, so the stream takes the
transport over (`set_protocol`), aiohttp's handler finishes as it does after any
response on a connection it no longer has, and the stream goes on in a task of its own
(`OpenStreams`). When the stream ends, the connection goes to a new aiohttp handler
for the client's next request, as keep-alive would have it, or is closed.

The private parts of aiohttp this relies on, beside those app/http/server.py names:
`RequestHandler._manager` (the server that makes handlers, and counts them),
`RequestHandler._messages` (requests pipelined behind the stream's),
`RequestHandler._parser` and `BaseProtocol._drain_helper`.
tests/http/test_connection.py fails when they change; pyproject.toml bounds aiohttp
from above.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
from collections.abc import Coroutine, Mapping
from typing import Any

from aiohttp import hdrs, web
from aiohttp.base_protocol import BaseProtocol

from app.http.access_log import log_request
from app.http.state import SETTINGS, TELEMETRY

logger = logging.getLogger(__name__)

# The `limit` attribute of `limit_refusals` for a stream turned away by OpenStreams.
_MAX_STREAMS = {"limit": "max_streams"}

# What a client may send while its stream is open (requests pipelined behind it) and
# still have the connection back for them; past this, the stream's end closes it.
MAX_PIPELINED_BYTES = 64 * 1024


class StreamConnection(BaseProtocol):
    """The connection of one event stream: chunks out, the client's going away in, and
    the request's access line when the stream ends."""

    __slots__ = (
        "_chunked",
        "_end",
        "_ended_body",
        "_received",
        "_request_line",
        "_reusable",
        "_server",
        "bytes_sent",
        "stream",
    )

    def __init__(self, server: web.Server, *, chunked: bool, reusable: bool) -> None:
        super().__init__(asyncio.get_running_loop())
        self._server = server
        self._chunked = chunked
        self._ended_body = False
        self._reusable = reusable
        self._received = b""
        # Cancelled when the client goes away, as aiohttp does with a request's handler.
        self.stream: asyncio.Task[None] | None = None
        # The response's bytes on the wire, head included, as aiohttp counts them.
        self.bytes_sent = 0
        # The access line's parts: the request's (method, path, status, remote, when it
        # started) and the stream's end (when, its own fields).
        self._request_line: tuple[str, str, int, str | None, float] | None = None
        self._end: tuple[float, Mapping[str, object] | None] | None = None

    @classmethod
    def take_over(cls, request: web.BaseRequest, response: web.StreamResponse) -> StreamConnection:
        """The connection of `response`, whose head is sent: aiohttp's handler lets go of
        it once `response` is returned. Raises ConnectionResetError if it is closing."""
        handler, transport = request.protocol, request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        server = handler._manager
        assert server is not None  # None only after connection_lost, which clears transport
        chunked = response.headers.get(hdrs.TRANSFER_ENCODING) == "chunked"
        connection = cls(
            server,
            chunked=chunked,
            # Only a chunked body's end is seen without the connection's. Whatever the
            # client sent behind this request would be lost with aiohttp's handler: then
            # the connection closes when the stream ends, and the client sends it again
            # (RFC 9112, 9.3.2).
            reusable=chunked
            and bool(response.keep_alive)
            and request.content.is_eof()
            and not handler._messages,
        )
        connection.bytes_sent = request.writer.output_size
        transport.set_protocol(connection)
        connection.transport = transport
        handler.keep_alive(False)  # cancels its keep-alive timer
        handler.transport = None  # so that it does not close what is no longer its own
        handler.force_close()  # its loop ends after this response
        server.connection_lost(handler)  # a server that shuts down waits for it no more
        # As aiohttp's connection_lost does: without it, the parser's reference back to
        # the handler would keep both for the cycle collector instead of freeing them now.
        handler._parser = None
        return connection

    def write(self, data: bytes, *, last: bool = False) -> None:
        """Send `data` as the body's next chunk (`last`: and the body's end with it);
        `drain` waits while the client is behind."""
        if self.transport is None:
            raise ConnectionResetError("the client went away")
        if self._chunked and last:
            self._ended_body = True
            data = b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data)
        elif self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self.transport.write(data)
        self.bytes_sent += len(data)

    async def drain(self, within_seconds: float) -> bool:
        """Wait while the client is behind (the transport above its high-water mark):
        True once it takes writes again, False if it took none for `within_seconds`."""
        if not self.writing_paused:
            return True
        try:
            async with asyncio.timeout(within_seconds):
                await self._drain_helper()
        except TimeoutError:
            return False
        return True

    def end(self, *, keep_alive: bool) -> None:
        """End the body; with `keep_alive`, the client's next request goes to aiohttp."""
        transport = self.transport
        if transport is None:
            return
        self.transport, self.stream = None, None
        if self._chunked and not self._ended_body:
            transport.write(b"0\r\n\r\n")
            self.bytes_sent += 5
        # A paused transport would tell a handler that never paused it to resume.
        if not (keep_alive and self._reusable and not self.writing_paused):
            transport.close()
            return
        handler = self._server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._received:
            handler.data_received(self._received)

    def abort(self) -> None:
        """Close at once, dropping what is buffered, unless `end` or the client closed it
        already: a stream that cannot end its body (a client that stopped reading, a
        failure, a drain that ran out of time) must not wait on its client."""
        if self.transport is not None:
            self.stream = None
            self.transport.abort()

    def request_line(
        self, method: str, path: str, status: int, remote: str | None, started: float
    ) -> None:
        """What the request's access line says of the request (app/http/server.py's
        `AccessLog`), the loop's time it `started` included; the line waits for
        `log_access`."""
        self._request_line = (method, path, status, remote, started)
        self._write_access_line()

    def log_access(self, fields: Mapping[str, object] | None = None) -> None:
        """The stream has ended: write its access line, with `fields` of its own. Once."""
        if self._end is None:
            self._end = (self._loop.time(), fields)
            self._write_access_line()

    def _write_access_line(self) -> None:
        """Once both the request's part and the end are known, whichever came last."""
        if self._request_line is None or self._end is None:
            return
        method, path, status, remote, started = self._request_line
        ended, fields = self._end
        log_request(method, path, status, remote, self.bytes_sent, ended - started, fields)

    def data_received(self, data: bytes) -> None:
        if not self._reusable:
            return
        self._received += data
        if len(self._received) > MAX_PIPELINED_BYTES:
            self._reusable = False
            self._received = b""

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self.stream is not None:
            self.stream.cancel()


class TakenOverResponse(web.StreamResponse):
    """A streaming response whose connection its stream takes over (`start`): from then
    on the stream writes and ends the body, not aiohttp."""

    connection: StreamConnection | None = None

    async def start(self, request: web.BaseRequest, first_chunk: bytes) -> StreamConnection:
        """Send the head and `first_chunk`, then take the connection over from aiohttp."""
        await web.StreamResponse.prepare(self, request)  # not a subclass's own prepare
        await self.write(first_chunk)
        self.connection = StreamConnection.take_over(request, self)
        return self.connection

    async def write_eof(self, data: bytes = b"") -> None:
        if self.connection is None:  # else the stream's task ends its body
            await super().write_eof(data)


class OpenStreams:
    """Streams this reader process holds open, each a task of its own once its connection
    is taken over, and how many it may: a set made `sharing` another counts against the
    same limit (one `TOKENTAPE_MAX_STREAMS` for every kind of stream) and ends its own."""

    __slots__ = ("_sharing", "_tasks", "limit")

    def __init__(self, limit: int = 0, *, sharing: OpenStreams | None = None) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        if sharing is None:
            self._sharing = [self._tasks]  # the tasks of every set under this limit
            self.limit = limit or sys.maxsize  # 0: no limit
        else:
            self._sharing, self.limit = sharing._sharing, sharing.limit
            self._sharing.append(self._tasks)

    @property
    def count(self) -> int:
        return len(self._tasks)

    @property
    def full(self) -> bool:
        """Whether the streams of every set sharing the limit have reached it."""
        return sum(map(len, self._sharing)) >= self.limit

    @staticmethod
    def turn_away(request: web.Request) -> int:
        """Count a stream refused because the reader is `full`, and say in how many
        milliseconds its client should come back: spread over a few retry intervals, so
        that a full reader's clients do not all return at once."""
        request.config_dict[TELEMETRY].metrics.limit_refusals.add(1, _MAX_STREAMS)
        retry_ms = request.config_dict[SETTINGS].retry_milliseconds
        return random.randint(retry_ms, 5 * retry_ms)

    def start(self, connection: StreamConnection, stream: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(stream)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        connection.stream = task

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("a stream failed", exc_info=exc)

    async def ended(self, within_seconds: float) -> None:
        """Wait for every stream to end, `within_seconds` at most; then end the rest at once."""
        if not self._tasks:
            return
        _, late = await asyncio.wait(set(self._tasks), timeout=within_seconds)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
