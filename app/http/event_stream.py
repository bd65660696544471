"""`GET /v1/generations/{id}/events`: the generation's log as Server-Sent Events.

A browser EventSource gives up *for good* on any status but 200 (503 included)
and on any content type but text/event-stream, and reconnects by itself when a
200 response ends. So this endpoint answers 4xx only for what will never work
(unknown id, expired log, malformed position, a missing or invalid read token), 204
to stop a client that has everything, and for passing faults (Redis away, this
reader at TOKENTAPE_MAX_STREAMS) a 200 that tells the client to come back.
"""

from __future__ import annotations

import asyncio
import logging
import re

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from redis.exceptions import RedisError

from app import ai_sdk, sse
from app.ai_sdk import UIMessageStream
from app.errors import Expired, InvalidRequest
from app.http import auth
from app.http.connection import StreamConnection, TakenOverResponse
from app.http.state import HUB, LOG, OPEN_STREAMS, SETTINGS, TELEMETRY
from app.http.ui_message_stream import (
    NextChunk,
    asks_for_ui_messages,
    reframed,
    resumed_stream,
)
from app.hub import Page, Subscription
from app.keys import check_generation_id
from app.settings import Settings
from app.telemetry.tracing import ReaderSpan

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()

_POSITION_RE = re.compile(r"^[0-9]{1,18}$")


SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    # nginx buffers proxied responses unless told otherwise, per response.
    "X-Accel-Buffering": "no",
}
UI_MESSAGE_STREAM_HEADERS = {**SSE_HEADERS, **ai_sdk.HEADERS}


def parse_position(request: web.Request) -> int:
    """The last seq the client has: `Last-Event-ID` header, else `last_event_id` query, else 0.

    A reloaded page's new EventSource cannot set headers, hence the query parameter.
    """
    raw = request.headers.get("Last-Event-ID", "").strip()
    source = "Last-Event-ID"
    if not raw:
        raw, source = request.query.get("last_event_id", "").strip(), "last_event_id"
    if not raw:
        return 0
    if not _POSITION_RE.match(raw):
        raise InvalidRequest(
            "invalid_position",
            f"{source} must be the seq of the last event received, a non-negative integer",
            field=source,
        )
    return int(raw)


@routes.get("/v1/generations/{id}/events")
async def stream_events(request: web.Request) -> web.StreamResponse:
    settings, log = request.app[SETTINGS], request.app[LOG]
    generation_id = check_generation_id(request.match_info["id"])
    after_seq = parse_position(request)
    ui_messages = asks_for_ui_messages(request)
    key_holder = auth.authorize_read(request, generation_id)
    streams = request.app[OPEN_STREAMS]
    if streams.full:
        return await _come_back_later(request, streams.turn_away(request), "busy")
    hub = request.app[HUB]
    # The first page is read beside the log's state, in the same round trip: its events
    # go out as soon as the stream starts (for an ended generation, all of them).
    first_page = (
        hub.first_page(generation_id, after_seq)
        if not ui_messages and request.method != hdrs.METH_HEAD
        else None
    )
    try:
        state, log_exists = await log.snapshot(generation_id)
    except (RedisError, OSError) as exc:
        if ui_messages:
            raise  # a 503: the AI SDK takes a 200 that ends for the whole answer
        logger.warning(
            "events %s: Redis unavailable, asking client to retry: %s", generation_id, exc
        )
        return await _come_back_later(request, settings.retry_milliseconds, "unavailable")
    state = auth.owned(key_holder, state, generation_id)
    if state.terminal and not log_exists:
        raise Expired("generation_expired", f"the events of {generation_id} are past retention")
    if state.terminal and after_seq == state.last_seq:
        return web.Response(status=204)
    # A position past the log's end is served too: past a running generation's end the
    # stream waits; either way, if the log went back below it, the client is sent a
    # reset (app/hub/subscription.py), never a 204 that would leave it holding events
    # the log does not have.
    if request.method == hdrs.METH_HEAD:
        # What a GET would answer, without a body: HEAD has none.
        return web.Response(headers=UI_MESSAGE_STREAM_HEADERS if ui_messages else SSE_HEADERS)
    link_to = state.traceparent
    ui_message_stream = (
        await resumed_stream(log, generation_id, after_seq, settings.catch_up_page_size)
        if ui_messages
        else None
    )
    return EventStream(
        request.app,
        generation_id,
        after_seq,
        link_to,
        ui_message_stream,
        live=not state.terminal,
        first_page=first_page,
    )


class EventStream(TakenOverResponse):
    """An open event stream, started once its handler and the middlewares have returned.

    aiohttp prepares the response a handler returns, as it sends a `FileResponse`. What
    could fail with a 4xx or 503 has been checked by then; from here on the client gets
    a 200. `prepare` sends the head and a first chunk, then takes the connection over
    from aiohttp (app/http/connection.py) and goes on in a task of its own that holds
    neither the request nor this response: an idle stream is its subscription, its span
    and its connection.
    """

    def __init__(
        self,
        app: web.Application,
        generation_id: str,
        after_seq: int,
        link_to: str | None,
        ui_message_stream: UIMessageStream | None,
        *,
        live: bool,
        first_page: asyncio.Future[Page] | None = None,
    ) -> None:
        headers = SSE_HEADERS if ui_message_stream is None else UI_MESSAGE_STREAM_HEADERS
        super().__init__(status=200, headers=headers)
        self._app = app
        self._generation_id = generation_id
        self._after_seq = after_seq
        self._link_to = link_to
        self._ui_message_stream = ui_message_stream
        self._live = live  # False: the log holds the terminal event, nothing will follow
        self._first_page = first_page

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        app, after_seq = self._app, self._after_seq
        settings = app[SETTINGS]
        reader = app[TELEMETRY].reader_span(
            self._generation_id,
            position=after_seq,
            resume=after_seq > 0,
            link_to=self._link_to,
            headers=request.headers,
        )
        try:
            # Headers and a first chunk at once: proxies and clients see a live stream
            # before the first event exists.
            connection = await self.start(request, sse.retry_frame(settings.retry_milliseconds))
        except BaseException:
            with reader:  # ends the span as a stream ends: client_gone, or the error
                raise
        stream = _stream(
            app,
            connection,
            reader,
            self._generation_id,
            after_seq,
            self._ui_message_stream,
            live=self._live,
            first_page=self._first_page,
        )
        self._ui_message_stream = self._first_page = None
        app[OPEN_STREAMS].start(connection, stream)
        return await super().prepare(request)


async def _stream(
    app: web.Application,
    connection: StreamConnection,
    reader: ReaderSpan,
    generation_id: str,
    after_seq: int,
    ui_message_stream: UIMessageStream | None,
    *,
    live: bool,
    first_page: asyncio.Future[Page] | None,
) -> None:
    settings, hub = app[SETTINGS], app[HUB]
    try:
        with reader:
            subscription = await hub.subscribe(
                generation_id, after_seq, live=live, first_page=first_page
            )
            # The subscription lets go of it once handed out; this frame lives as long as
            # the stream, and would keep it (and its task) for as long.
            first_page = None
            next_chunk: NextChunk = subscription.next_chunk
            if ui_message_stream is None:
                subscription.sink = _LiveWrites(connection, reader)
            else:
                next_chunk = reframed(subscription, ui_message_stream)
            try:
                await _pump(connection, settings, subscription, next_chunk, reader)
            finally:
                hub.unsubscribe(subscription)
    except ConnectionResetError:
        pass  # the client went away: `reader` counted it
    finally:
        connection.abort()  # unless it ended, or the client closed it
        connection.log_access(reader.log_fields())


async def _pump(
    connection: StreamConnection,
    settings: Settings,
    subscription: Subscription,
    next_chunk: NextChunk,
    reader: ReaderSpan,
) -> None:
    """Write what `next_chunk` hands out (the subscription's chunks, in the format asked for)
    until the terminal event, a drain or a stuck client."""
    while True:
        chunk = await next_chunk(settings.heartbeat_seconds)
        if chunk is None:
            break
        after, last_seq = subscription.handed_after, subscription.delivered
        if chunk and subscription.gap is not None and after == subscription.requested_after:
            reader.gap(subscription.gap.requested, subscription.gap.first_available)
        # The terminal event's chunk carries the body's end: one write, not two.
        connection.write(chunk or sse.comment_frame("keep-alive"), last=subscription.finished)
        if chunk and last_seq > after:
            reader.first_event(after + 1)
            reader.sent(last_seq - after, len(chunk), subscription.last_appended_ms)
        if not await connection.drain(settings.write_timeout_seconds):
            reader.ended("slow_client")
            connection.abort()
            return
        if subscription.finished:
            # Every reader of the generation was handed its last batch in this turn of
            # the loop: let them all write it before any one ends its stream (log lines,
            # span, close), which would hold the last events of the others back.
            await asyncio.sleep(0)
    reader.ended("terminal" if subscription.finished else "server_drain")
    # A reader that drains closes its connections: their clients come back to another.
    connection.end(keep_alive=not subscription.closed)


class _LiveWrites:
    """A subscription's `Sink` for a stream in the default format: the hub writes live
    batches to the connection while the stream's task waits."""

    __slots__ = ("_connection", "_reader")

    def __init__(self, connection: StreamConnection, reader: ReaderSpan) -> None:
        self._connection = connection
        self._reader = reader

    def ready(self) -> bool:
        connection, transport = self._connection, self._connection.transport
        return (
            transport is not None and not transport.is_closing() and not connection.writing_paused
        )

    def send(self, chunk: bytes, first_seq: int, last_seq: int, appended_ms: int) -> None:
        self._connection.write(chunk)
        self._reader.first_event(first_seq)
        self._reader.sent(last_seq - first_seq + 1, len(chunk), appended_ms)


async def _come_back_later(request: web.Request, retry_ms: int, reason: str) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await response.prepare(request)
    await response.write(sse.retry_frame(retry_ms) + sse.comment_frame(f"{reason}, retry"))
    await response.write_eof()
    return response
