"""`GET /v1/generations/{id}/events?format=ai-sdk`: the events in the AI SDK's UI message stream.

The hub frames each live event once, in the default format, for every reader of a
generation. A connection in this format reads the same subscription and re-frames
what it hands out (app/ai_sdk.py): the default path does not change, and the cost
of this format falls on the connections that ask for it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from app.ai_sdk import UIMessageStream
from app.errors import InvalidRequest
from app.hub import Subscription
from app.store import GenerationLog

FORMAT = "ai-sdk"

NextChunk = Callable[[float], Awaitable[bytes | None]]


def asks_for_ui_messages(request: web.Request) -> bool:
    """Whether the request asks for this format (`format=ai-sdk`) rather than the default."""
    value = request.query.get("format")
    if value is None:
        return False
    if value != FORMAT:
        raise InvalidRequest(
            "invalid_format",
            f"format must be {FORMAT!r} (the Vercel AI SDK's UI message stream), "
            "or absent for tokentape's own events",
            field="format",
        )
    return True


async def resumed_stream(
    log: GenerationLog, generation_id: str, after_seq: int, page_size: int
) -> UIMessageStream:
    """The framing state right after event `after_seq`, from the log's events up to it.

    Which text part is open and which tool calls are streaming depends on what came
    before; reading it here costs one pass over the log once per resumed connection.
    """
    stream = UIMessageStream(generation_id)
    if not after_seq:
        return stream
    read = 0
    while read < after_seq:
        entries = await log.read(generation_id, read, min(page_size, after_seq - read))
        stream.prime(entry for entry in entries if entry.seq <= after_seq)
        if not entries:
            break
        read = entries[-1].seq
    return stream


def reframed(subscription: Subscription, stream: UIMessageStream) -> NextChunk:
    """`subscription.next_chunk`, in this format: b"" still means nothing came (a heartbeat)."""

    async def next_chunk(wait_seconds: float) -> bytes | None:
        if stream.voided:
            return None  # ends the response: the client reads the message again
        chunk = await subscription.next_chunk(wait_seconds)
        return stream.reframe(chunk) if chunk else chunk

    return next_chunk
