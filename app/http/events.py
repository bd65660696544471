"""`GET /v1/generations/{id}/events`: the generation's log as Server-Sent Events.

A browser EventSource gives up *for good* on any status but 200 (503 included)
and on any content type but text/event-stream, and reconnects by itself when a
200 response ends. So this endpoint answers 4xx only for what will never work
(unknown id, expired log, malformed position), 204 to stop a client that has
everything, and for passing faults a 200 that tells the client to come back.
"""

from __future__ import annotations

import asyncio
import logging
import re

from aiohttp import web
from redis.exceptions import RedisError

from app import sse
from app.errors import Expired, InvalidRequest, NotFound
from app.http.state import HUB, LOG, SETTINGS
from app.keys import check_generation_id

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()

_POSITION_RE = re.compile(r"^[0-9]{1,18}$")

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    # nginx buffers proxied responses unless told otherwise, per response.
    "X-Accel-Buffering": "no",
}


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
    settings, log, hub = request.app[SETTINGS], request.app[LOG], request.app[HUB]
    generation_id = check_generation_id(request.match_info["id"])
    after_seq = parse_position(request)
    try:
        state, log_exists = await log.snapshot(generation_id)
    except (RedisError, OSError) as exc:
        logger.warning(
            "events %s: Redis unavailable, asking client to retry: %s", generation_id, exc
        )
        return await _come_back_later(request, settings.retry_milliseconds)
    if state is None:
        raise NotFound("generation_not_found", f"no generation {generation_id}")
    if state.terminal and not log_exists:
        raise Expired("generation_expired", f"the events of {generation_id} are past retention")
    if state.terminal and after_seq >= state.last_seq:
        return web.Response(status=204)

    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await response.prepare(request)
    # Flush headers and a first chunk at once: proxies and clients see a live stream
    # before the first event exists.
    await response.write(sse.retry_frame(settings.retry_milliseconds))
    subscription = await hub.subscribe(generation_id, after_seq)
    try:
        while True:
            chunk = await subscription.next_chunk(settings.heartbeat_seconds)
            if chunk is None:
                break
            async with asyncio.timeout(settings.write_timeout_seconds):
                await response.write(chunk or sse.comment_frame("keep-alive"))
    except TimeoutError:
        subscription._close("slow_client")
        logger.info(
            "events %s: client stuck for %ss, disconnected",
            generation_id,
            settings.write_timeout_seconds,
        )
        if request.transport is not None:
            request.transport.abort()
        return response
    except ConnectionResetError:
        subscription._close("client_gone")
        logger.info("events %s: client gone at seq %d", generation_id, subscription.delivered)
        return response
    finally:
        hub.unsubscribe(subscription)
    await response.write_eof()
    return response


async def _come_back_later(request: web.Request, retry_ms: int) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await response.prepare(request)
    await response.write(sse.retry_frame(retry_ms) + sse.comment_frame("unavailable, retry"))
    await response.write_eof()
    return response
