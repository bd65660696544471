"""The Durable Streams protocol at `/v1/stream/<name>`, and generations read through it.

A sub-application: its middleware turns the protocol's refusals into responses with
the headers a client acts on (`Stream-Closed`, `Producer-Epoch`, ...), and every
response, errors included, carries the browser security and CORS headers.
`/v1/stream/generations/<id>` serves a generation's events, read-only
(`app.durable_streams.sources.GenerationStream`). Under `/v1/stream/__ds/` are the
protocol's subscriptions and the JWKS their webhooks are signed with
(`app.durable_streams.delivery.Subscriptions`); every write to a stream tells them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from contextlib import AbstractAsyncContextManager
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from app import sse
from app.durable_streams import protocol, subscriptions
from app.durable_streams.delivery import Subscriptions
from app.durable_streams.errors import (
    CallbackTokenInvalid,
    StreamDeleted,
    StreamError,
    SubscriptionNotFound,
)
from app.durable_streams.protocol import Position
from app.durable_streams.sources import GenerationStream, Source, StoredStream
from app.errors import InvalidRequest, LimitExceeded, NotFound, TokentapeError
from app.http import auth
from app.http.checks import read_body
from app.http.connection import OpenStreams, StreamConnection, TakenOverResponse
from app.http.errors import Handler
from app.http.state import LOG
from app.hub import Hub, StreamNotifier, Watch
from app.keys import check_generation_id
from app.settings import Settings
from app.store.streams import Fork, Page, StreamConfig, StreamStore

logger = logging.getLogger(__name__)

PREFIX = "/v1/stream"
GENERATIONS = "generations/"

SETTINGS = web.AppKey("stream_settings", Settings)
STORE = web.AppKey("stream_store", StreamStore)
NOTIFIER = web.AppKey("stream_notifier", StreamNotifier)
SUBSCRIPTIONS = web.AppKey("stream_subscriptions", Subscriptions)
# The SSE reads this reader holds open, counted against TOKENTAPE_MAX_STREAMS with its
# event streams.
OPEN_SSE_READS = web.AppKey("open_sse_reads", OpenStreams)
CONTROL = f"/{protocol.RESERVED}"
SUBSCRIPTION = CONTROL + "/subscriptions/{id}"

# Offset-addressed chunks never change, so reads may be cached; `private`: a stream
# may hold a user's data, and shared caches must not serve it to another.
CACHEABLE = "private, max-age=60, stale-while-revalidate=300"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Resource-Policy": "cross-origin",
}
EXPOSED_HEADERS = ", ".join(
    [
        protocol.NEXT_OFFSET,
        protocol.UP_TO_DATE,
        protocol.CLOSED,
        protocol.CURSOR,
        protocol.TTL,
        protocol.EXPIRES_AT,
        protocol.SSE_DATA_ENCODING,
        protocol.PRODUCER_EPOCH,
        protocol.PRODUCER_SEQ,
        protocol.PRODUCER_EXPECTED_SEQ,
        protocol.PRODUCER_RECEIVED_SEQ,
        "ETag",
        "Location",
    ]
)
ALLOWED_METHODS = "GET, HEAD, PUT, POST, DELETE, OPTIONS"
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx passes each event on as it comes
}


def create_app(
    settings: Settings, redis: Redis | RedisCluster, hub: Hub, streams: OpenStreams
) -> web.Application:
    """The sub-application to mount at PREFIX; `redis` (one Redis, or a `RedisCluster`) and
    `hub` are owned by the caller (the hub's pub/sub connection wakes the requests that
    wait for a write), and its SSE reads count against the limit of `streams`."""
    app = web.Application(middlewares=[_refusals])
    app[SETTINGS] = settings
    app[STORE] = StreamStore(redis, settings)
    app[NOTIFIER] = StreamNotifier(hub)
    app[SUBSCRIPTIONS] = Subscriptions(redis, app[STORE], app[NOTIFIER], settings)
    app[OPEN_SSE_READS] = OpenStreams(sharing=streams)
    # The control routes first: the protocol reserves `__ds/` before any stream name.
    app.router.add_get(CONTROL + "/jwks.json", jwks)
    app.router.add_put(SUBSCRIPTION, put_subscription)
    app.router.add_get(SUBSCRIPTION, get_subscription, allow_head=False)
    app.router.add_delete(SUBSCRIPTION, delete_subscription)
    app.router.add_post(SUBSCRIPTION + "/streams", add_subscription_streams)
    app.router.add_delete(SUBSCRIPTION + "/streams/{path:.+}", remove_subscription_stream)
    app.router.add_post(SUBSCRIPTION + "/callback", webhook_callback)
    app.router.add_post(SUBSCRIPTION + "/claim", claim_wake)
    app.router.add_post(SUBSCRIPTION + "/ack", ack_wake)
    app.router.add_post(SUBSCRIPTION + "/release", release_wake)
    app.router.add_get("/{name:.+}", read_stream, allow_head=False)
    app.router.add_head("/{name:.+}", stream_metadata)
    app.router.add_put("/{name:.+}", create_stream)
    app.router.add_post("/{name:.+}", append_to_stream)
    app.router.add_delete("/{name:.+}", delete_stream)
    app.router.add_route("OPTIONS", "/{name:.+}", preflight)
    app.on_response_prepare.append(_browser_headers)

    async def start_subscriptions(app: web.Application) -> None:
        await app[SUBSCRIPTIONS].start()

    async def stop_streams(app: web.Application) -> None:
        await app[SUBSCRIPTIONS].stop()
        app[NOTIFIER].stop()  # ends the SSE reads: their clients come back to another reader
        await app[OPEN_SSE_READS].ended(settings.stream_drain_seconds)

    app.on_startup.append(start_subscriptions)
    app.on_shutdown.append(stop_streams)
    return app


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    if protocol.is_reserved(name):
        raise SubscriptionNotFound(message=f"no route {CONTROL}/... like {request.path}")
    if not protocol.is_stream_name(name):
        raise InvalidRequest(
            "invalid_stream_name",
            "a stream name is path segments of letters, digits and -._~!$'()*+,;=:@",
        )
    return name


def _source(request: web.Request) -> Source:
    name = _name(request)
    if name.startswith(GENERATIONS):
        generation_id = check_generation_id(name[len(GENERATIONS) :])
        reader = auth.authorize_read(request, generation_id)
        return GenerationStream(request.config_dict[LOG], generation_id, reader)
    auth.require_key(request)
    return StoredStream(request.app[STORE], name)


def _writable(request: web.Request) -> str:
    auth.require_key(request)
    name = _name(request)
    if name.startswith(GENERATIONS):
        # Generations are written by their workers only.
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD", "OPTIONS"])
    return name


# -- reads ---------------------------------------------------------------------


def _position(request: web.Request, live: str | None) -> Position:
    offsets = request.query.getall("offset", [])
    if len(offsets) > 1:
        raise InvalidRequest("invalid_offset", "give one offset")
    # A browser EventSource that reconnects sends the id of the last control event.
    last_event_id = request.headers.get("Last-Event-ID", "") if live == "sse" else ""
    if last_event_id:
        return protocol.parse_offset(last_event_id, "Last-Event-ID")
    if offsets:
        return protocol.parse_offset(offsets[0])
    if live is not None:
        raise InvalidRequest(
            "offset_required",
            f"live={live} reads need an offset (-1 for the start, now for the tail)",
        )
    return Position(start=True)


async def read_stream(request: web.Request) -> web.StreamResponse:
    live = request.query.get("live")
    if live not in (None, "long-poll", "sse"):
        raise InvalidRequest("invalid_live", "live is long-poll or sse")
    position = _position(request, live)
    source = _source(request)
    if live == "sse":
        return await _stream_events(request, source, position)
    if live == "long-poll":
        return await _long_poll(request, source, position)
    page = await source.read(position, refresh=True)
    if position.now:
        return _tail_response(page)
    return _page_response(request, page, position)


def _body(page: Page) -> bytes:
    if protocol.is_json(page.content_type):
        return protocol.json_body(page.entries)
    return b"".join(page.entries)


def _position_headers(page: Page) -> dict[str, str]:
    headers = {protocol.NEXT_OFFSET: protocol.format_offset(page.next_seq)}
    if page.up_to_date:
        headers[protocol.UP_TO_DATE] = "true"
    if page.end_of_stream:
        headers[protocol.CLOSED] = "true"
    return headers


def _page_response(
    request: web.Request, page: Page, position: Position, cursor: str | None = None
) -> web.Response:
    start = page.next_seq - len(page.entries)
    closure = ":c" if page.end_of_stream else ""
    etag = f'"{page.stream_id}:{start}:{page.next_seq}{closure}"'
    headers = {
        "Content-Type": page.content_type,
        "ETag": etag,
        "Cache-Control": CACHEABLE,
        **_position_headers(page),
    }
    if cursor is not None and not page.end_of_stream:
        headers[protocol.CURSOR] = cursor
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=_body(page), headers=headers)


def _tail_response(page: Page) -> web.Response:
    """`offset=now`: no data, the tail's offset; not cached (the tail moves)."""
    headers = {
        "Content-Type": page.content_type,
        "Cache-Control": "no-store",
        **_position_headers(page),
    }
    body = b"[]" if protocol.is_json(page.content_type) else b""
    return web.Response(body=body, headers=headers)


async def _long_poll(request: web.Request, source: Source, position: Position) -> web.Response:
    """Data after the position at once if there is some, else the first append within
    `stream_long_poll_seconds`, else 204; a closed stream at its tail answers 204 at once."""
    cursor = protocol.next_cursor(request.query.get("cursor"))
    page = await source.read(position, refresh=True)
    if not page.entries and not page.end_of_stream:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.app[SETTINGS].stream_long_poll_seconds
        tail = Position(seq=page.next_seq)
        async with request.app[NOTIFIER].watch(source.channel) as watch:
            while True:
                # Read again once subscribed: an append made before the subscription counts.
                page = await source.read(tail, refresh=False)
                remaining = deadline - loop.time()
                if page.entries or page.end_of_stream or remaining <= 0:
                    break
                if not await watch.wait_for_append(remaining):
                    break
    if page.entries:
        return _page_response(request, page, position, cursor)
    headers = {"Cache-Control": "no-store", **_position_headers(page)}
    headers[protocol.UP_TO_DATE] = "true"
    if not page.closed:
        headers[protocol.CURSOR] = cursor
    return web.Response(status=204, headers=headers)


async def _stream_events(
    request: web.Request, source: Source, position: Position
) -> web.StreamResponse:
    """SSE: a data event per page, each followed by a control event; then live pages
    as appends come, heartbeats while idle; the response ends after the closing
    control event or after `stream_sse_seconds` (the client reconnects from its offset).

    The first page is read here, so that what fails answers as any read does; then the
    stream takes its connection over (app/http/connection.py) and goes on in a task of
    its own, holding neither the request nor the response.
    """
    settings = request.app[SETTINGS]
    reads = request.app[OPEN_SSE_READS]
    if reads.full:
        retry_ms = reads.turn_away(request)
        raise LimitExceeded(
            "busy",
            f"this reader holds {settings.max_streams} open streams; retry after the "
            "Retry-After seconds (another reader may have room)",
            setting="TOKENTAPE_MAX_STREAMS",
            limit=settings.max_streams,
            status=503,
            retry_after=retry_ms / 1000,
        )
    cursor = protocol.next_cursor(request.query.get("cursor"))
    deadline = asyncio.get_running_loop().time() + settings.stream_sse_seconds
    page = await source.read(position, refresh=True)
    base64_encoded = not protocol.is_text(page.content_type)
    headers = dict(SSE_HEADERS)
    if base64_encoded:
        headers[protocol.SSE_DATA_ENCODING] = "base64"
    response = TakenOverResponse(status=200, headers=headers)
    try:
        connection = await response.start(request, _events(page, cursor, base64_encoded))
    except ConnectionResetError:
        return response  # the client went away
    follow = _follow(
        connection,
        settings,
        request.app[NOTIFIER].watch(source.channel),
        source,
        page,
        cursor,
        base64_encoded,
        deadline,
    )
    reads.start(connection, follow)
    return response


def _events(page: Page, cursor: str, base64_encoded: bool) -> bytes:
    """A page's data event (unless it is empty) and its control event."""
    frames = b""
    if page.entries:
        frames = protocol.sse_data_event(_body(page), base64_encoded=base64_encoded)
    return frames + protocol.sse_control_event(
        protocol.format_offset(page.next_seq),
        cursor=cursor,
        up_to_date=page.up_to_date,
        closed=page.end_of_stream,
    )


async def _follow(
    connection: StreamConnection,
    settings: Settings,
    watching: AbstractAsyncContextManager[Watch],
    source: Source,
    page: Page,
    cursor: str,
    base64_encoded: bool,
    deadline: float,
) -> None:
    """The SSE read after its first page: the next pages as they are written, until the
    stream closes, the response has lasted long enough, or this reader stops."""
    keep_alive = True
    try:
        async with watching as watch:
            while not page.end_of_stream:
                if page.up_to_date and not await _wait(connection, settings, watch, deadline):
                    keep_alive = not watch.closed  # a reader that stops closes it
                    break
                try:
                    # Read once the watch began too: an append made before it counts.
                    page = await source.read(Position(seq=page.next_seq), refresh=False)
                except (TokentapeError, RedisError) as exc:
                    # Deleted, expired or replaced meanwhile, or Redis is away: the client
                    # reconnects from its offset and hears which.
                    logger.info("an SSE read of %s ends: %s", source.channel, exc)
                    break
                if page.entries or page.end_of_stream:
                    await _send(connection, settings, _events(page, cursor, base64_encoded))
        connection.end(keep_alive=keep_alive)
    except (_ClientGone, ConnectionResetError):
        pass
    finally:
        connection.abort()  # unless it ended, or the client closed it
        connection.log_access()


class _ClientGone(Exception):
    """The client stopped reading: its response ends."""


async def _send(connection: StreamConnection, settings: Settings, data: bytes) -> None:
    """Write, giving up on a client that accepts nothing for `write_timeout_seconds`."""
    connection.write(data)
    if not await connection.drain(settings.write_timeout_seconds):
        raise _ClientGone


async def _wait(
    connection: StreamConnection, settings: Settings, watch: Watch, deadline: float
) -> bool:
    """Wait for an append, with heartbeats; False once the response has lasted long
    enough or this reader stops."""
    loop = asyncio.get_running_loop()
    while (remaining := deadline - loop.time()) > 0:
        if await watch.wait_for_append(min(settings.heartbeat_seconds, remaining)):
            return True
        if watch.closed:
            return False
        await _send(connection, settings, sse.comment_frame("keep-alive"))
    return False


async def stream_metadata(request: web.Request) -> web.Response:
    """HEAD: the tail, the configuration and closure; no TTL refresh, never cached."""
    page = await _source(request).metadata()
    headers = {
        "Content-Type": page.content_type,
        "Cache-Control": "no-store",
        protocol.NEXT_OFFSET: protocol.format_offset(page.tail_seq),
    }
    if page.ttl_seconds is not None:
        headers[protocol.TTL] = str(page.ttl_seconds)
    if page.expires_ms is not None:
        headers[protocol.EXPIRES_AT] = protocol.format_expires_at(page.expires_ms)
    if page.closed:
        headers[protocol.CLOSED] = "true"
    return web.Response(headers=headers)


# -- writes --------------------------------------------------------------------


def _fork(request: web.Request) -> Fork | None:
    headers = request.headers
    source = headers.get(protocol.FORKED_FROM)
    offset = headers.get(protocol.FORK_OFFSET)
    sub_offset = headers.get(protocol.FORK_SUB_OFFSET)
    if source is None:
        if offset is not None or sub_offset is not None:
            raise InvalidRequest(
                "invalid_fork",
                f"{protocol.FORK_OFFSET} and {protocol.FORK_SUB_OFFSET} go with "
                f"{protocol.FORKED_FROM}",
            )
        return None
    if not source.startswith(PREFIX + "/"):
        raise InvalidRequest(
            "invalid_fork", f"{protocol.FORKED_FROM} is the path of a stream, {PREFIX}/<name>"
        )
    source_name = source[len(PREFIX) + 1 :]
    if not protocol.is_stream_name(source_name) or source_name.startswith(GENERATIONS):
        raise InvalidRequest("invalid_fork", f"{source} is not a stream that can be forked")
    return Fork(
        source=source_name,
        offset=None if offset is None else protocol.parse_offset(offset, protocol.FORK_OFFSET),
        sub_offset=0
        if sub_offset is None
        else protocol.parse_decimal(sub_offset, protocol.FORK_SUB_OFFSET),
    )


def _entries(content_type: str, body: bytes, *, allow_empty: bool) -> list[bytes]:
    """A body as stored: JSON mode keeps the messages of one append in one entry."""
    if not body:
        return []
    if protocol.is_json(content_type):
        messages = protocol.json_messages(body, allow_empty=allow_empty)
        return [b",".join(messages)] if messages else []
    return [body]


async def create_stream(request: web.Request) -> web.Response:
    name = _writable(request)
    headers = request.headers
    fork = _fork(request)
    ttl_raw, expires_raw = headers.get(protocol.TTL), headers.get(protocol.EXPIRES_AT)
    if ttl_raw is not None and expires_raw is not None:
        raise InvalidRequest(
            "invalid_expiry", f"give {protocol.TTL} or {protocol.EXPIRES_AT}, not both"
        )
    raw_type = headers.get("Content-Type")
    body = await request.read()
    if fork is not None and raw_type is None and body:
        raise InvalidRequest(
            "content_type_required", "an initial body needs its Content-Type, also on a fork"
        )
    # A fork without Content-Type has its source's.
    content_type = (
        "" if fork is not None and raw_type is None else protocol.normalize_content_type(raw_type)
    )
    config = StreamConfig(
        content_type=content_type,
        ttl_seconds=None if ttl_raw is None else protocol.parse_decimal(ttl_raw, protocol.TTL),
        expires_ms=None if expires_raw is None else protocol.parse_expires_at(expires_raw),
        closed=protocol.is_true(headers.get(protocol.CLOSED)),
        fork=fork,
    )
    created = await request.app[STORE].create(
        name, config, _entries(content_type, body, allow_empty=True)
    )
    if created.created and created.tail_seq:
        await request.app[SUBSCRIPTIONS].stream_written(name, created.tail_seq)
    response_headers = {
        "Content-Type": created.content_type,
        protocol.NEXT_OFFSET: protocol.format_offset(created.tail_seq),
    }
    if created.closed:
        response_headers[protocol.CLOSED] = "true"
    if not created.created:
        return web.Response(status=200, headers=response_headers)
    public_url = request.app[SETTINGS].public_url.rstrip("/")
    response_headers["Location"] = (
        f"{public_url}{request.path}" if public_url else str(request.url.with_query(None))
    )
    return web.Response(status=201, headers=response_headers)


async def append_to_stream(request: web.Request) -> web.Response:
    name = _writable(request)
    headers = request.headers
    close = protocol.is_true(headers.get(protocol.CLOSED))
    producer = protocol.parse_producer(
        headers.get(protocol.PRODUCER_ID),
        headers.get(protocol.PRODUCER_EPOCH),
        headers.get(protocol.PRODUCER_SEQ),
    )
    body = await request.read()
    if not body and not close:
        raise InvalidRequest(
            "empty_body", f"an append needs a body (an empty one only with {protocol.CLOSED}: true)"
        )
    raw_type = headers.get("Content-Type")
    if body and raw_type is None:
        raise InvalidRequest("content_type_required", "an append needs the stream's Content-Type")
    content_type = protocol.normalize_content_type(raw_type)
    entries = _entries(content_type, body, allow_empty=False)
    appended = await request.app[STORE].append(
        name,
        content_type=content_type,
        data=entries[0] if entries else None,
        close=close,
        producer=producer,
        stream_seq=headers.get(protocol.SEQ),
    )
    if entries and not appended.duplicate:
        await request.app[SUBSCRIPTIONS].stream_written(name, appended.tail_seq)
    response_headers = {protocol.NEXT_OFFSET: protocol.format_offset(appended.tail_seq)}
    if appended.closed:
        response_headers[protocol.CLOSED] = "true"
    status = 204
    if producer is not None:
        response_headers[protocol.PRODUCER_EPOCH] = str(producer.epoch)
        if appended.producer_seq is not None:
            response_headers[protocol.PRODUCER_SEQ] = str(appended.producer_seq)
        # A producer's new data is 200; its retries and bare closes are 204.
        if entries and not appended.duplicate:
            status = 200
    return web.Response(status=status, headers=response_headers)


async def delete_stream(request: web.Request) -> web.Response:
    name = _writable(request)
    await request.app[STORE].delete(name)
    await request.app[SUBSCRIPTIONS].stream_deleted(name)
    return web.Response(status=204)


# -- subscriptions (`__ds/`) ---------------------------------------------------


def _base(request: web.Request) -> str:
    """The service's URL as receivers are to call it: TOKENTAPE_PUBLIC_URL, else the one
    the request came to."""
    return request.app[SETTINGS].public_url.rstrip("/") or str(request.url.origin())


def _subscription_id(request: web.Request) -> str:
    return subscriptions.check_id(request.match_info["id"])


def _wake_token(request: web.Request) -> str:
    """The callback or claim token a receiver or worker sends as `Authorization: Bearer`."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise CallbackTokenInvalid(
            message="send the wake's token: Authorization: Bearer <callback_token or token>"
        )
    return token.strip()


async def jwks(request: web.Request) -> web.Response:
    """The public keys webhooks are signed with (`kid` in each signature picks one)."""
    signer = await request.app[SUBSCRIPTIONS].signer()
    return web.json_response(
        signer.jwks(),
        content_type="application/jwk-set+json",
        headers={"Cache-Control": "public, max-age=300"},
    )


async def _view(request: web.Request, subscription: subscriptions.Subscription) -> dict[str, Any]:
    signing = None
    if subscription.config.webhook_url is not None:
        signer = await request.app[SUBSCRIPTIONS].signer()
        signing = {
            "alg": "ed25519",
            "kid": signer.kid,
            "jwks_url": subscriptions.control_url(_base(request), "jwks.json"),
        }
    return subscriptions.view(subscription, signing)


async def put_subscription(request: web.Request) -> web.Response:
    auth.require_key(request)
    subscription_id = _subscription_id(request)
    config = subscriptions.parse_config(await read_body(request))
    created, subscription = await request.app[SUBSCRIPTIONS].create(
        subscription_id, config, _base(request)
    )
    return web.json_response(await _view(request, subscription), status=201 if created else 200)


async def get_subscription(request: web.Request) -> web.Response:
    auth.require_key(request)
    subscription = await request.app[SUBSCRIPTIONS].get(_subscription_id(request))
    return web.json_response(await _view(request, subscription))


async def delete_subscription(request: web.Request) -> web.Response:
    auth.require_key(request)
    await request.app[SUBSCRIPTIONS].delete(_subscription_id(request))
    return web.Response(status=204)


async def add_subscription_streams(request: web.Request) -> web.Response:
    auth.require_key(request)
    subscription_id = _subscription_id(request)
    paths = subscriptions.parse_stream_list(await read_body(request))
    await request.app[SUBSCRIPTIONS].add_streams(subscription_id, paths)
    return web.Response(status=204)


async def remove_subscription_stream(request: web.Request) -> web.Response:
    auth.require_key(request)
    subscription_id = _subscription_id(request)
    # The path is one URL-encoded segment (`manual%2Fb`); stream names hold no `%`.
    path = subscriptions.stream_path(urllib.parse.unquote(request.match_info["path"]))
    await request.app[SUBSCRIPTIONS].remove_stream(subscription_id, path)
    return web.Response(status=204)


async def _acknowledge(request: web.Request, *, webhook: bool) -> web.Response:
    subscription_id = _subscription_id(request)
    token = _wake_token(request)
    wake = subscriptions.parse_wake_request(await read_body(request))
    next_wake = await request.app[SUBSCRIPTIONS].acknowledge(
        subscription_id, token, wake, webhook=webhook
    )
    return web.json_response({"ok": True, "next_wake": next_wake})


async def webhook_callback(request: web.Request) -> web.Response:
    """A webhook receiver acks its wake (and with `done`, ends it)."""
    return await _acknowledge(request, webhook=True)


async def claim_wake(request: web.Request) -> web.Response:
    auth.require_key(request)
    subscription_id = _subscription_id(request)
    worker = subscriptions.parse_claim(await read_body(request))
    wake = await request.app[SUBSCRIPTIONS].claim(subscription_id, worker)
    return web.json_response(subscriptions.claim_view(wake, time.time()))


async def ack_wake(request: web.Request) -> web.Response:
    """A pull-wake worker acks its claim (a heartbeat too; with `done`, ends it)."""
    return await _acknowledge(request, webhook=False)


async def release_wake(request: web.Request) -> web.Response:
    subscription_id = _subscription_id(request)
    token = _wake_token(request)
    wake = subscriptions.parse_wake_request(await read_body(request))
    await request.app[SUBSCRIPTIONS].release(subscription_id, token, wake)
    return web.Response(status=204)


async def preflight(request: web.Request) -> web.Response:
    requested = request.headers.get("Access-Control-Request-Headers")
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Allow-Headers": requested or "*",
            "Access-Control-Max-Age": "86400",
        },
    )


# -- every response ------------------------------------------------------------


@web.middleware
async def _refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except StreamError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
    except StreamDeleted:
        # A tombstone whose forks all expired is collected now: the name is free.
        if await request.app[STORE].collect(request.match_info["name"]):
            raise NotFound("stream_not_found", f"no stream {request.match_info['name']}") from None
        raise


async def _browser_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
