"""The client against a scripted server: refusals, drops, resends and holes, byte for byte."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import AsyncIterator, Mapping

import pytest
from aiohttp import web
from pytest_aiohttp.plugin import AiohttpServer

from app import events
from app.client import Client, Entry, Gap, Item
from app.errors import GenerationFailed, NotFound, StreamLost
from app.sse import event_frame, retry_frame

GENERATION = "g" * 22
EVENTS: list[events.Event] = [
    events.Started(model="sim", attempt=1),
    events.Token(text="Hello"),
    events.Token(text=", "),
    events.Token(text="world"),
    events.Done(reason="stop"),
]


def frames(first: int, last: int) -> bytes:
    """Events `first` to `last` (seqs, from 1) as the reader frames them."""
    return b"".join(
        event_frame(seq, events.event_type(EVENTS[seq - 1]), events.encode(EVENTS[seq - 1]))
        for seq in range(first, last + 1)
    )


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Seen:
    last_event_id: str | None
    authorization: str | None
    token: str | None


class Script:
    """Answers the events endpoint from a queue of replies; records every request."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = collections.deque(replies)
        self.requests: list[Seen] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(
            Seen(
                request.headers.get("Last-Event-ID"),
                request.headers.get("Authorization"),
                request.query.get("token"),
            )
        )
        reply = self.replies.popleft()
        if reply.status != 200:
            return web.Response(status=reply.status, body=reply.body, headers=reply.headers)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", **reply.headers}
        )
        await response.prepare(request)
        await response.write(reply.body)
        await response.write_eof()  # every reply ends its response, finished or not
        return response


def error_body(code: str) -> bytes:
    return b'{"error": {"code": "%s", "message": "what to do"}}' % code.encode()


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
async def client(script: Script, aiohttp_server: AiohttpServer) -> AsyncIterator[Client]:
    app = web.Application()
    app.router.add_get("/v1/generations/{id}/events", script.handle)
    server = await aiohttp_server(app)
    made = Client(str(server.make_url("")), max_attempts=3, initial_backoff=0.01, api_key="key-1")
    yield made
    await made.close()


def entries(items: list[Item]) -> list[Entry]:
    return [item for item in items if isinstance(item, Entry)]


async def read(client: Client, after: int = 0, into: list[Item] | None = None) -> list[Item]:
    items = [] if into is None else into
    async for item in client.events(GENERATION, after):
        items.append(item)
    return items


EVERY_EVENT = [Entry(seq, event) for seq, event in enumerate(EVENTS, start=1)]


async def test_a_503_then_a_200_reads_every_event_once(script: Script, client: Client) -> None:
    script.replies.extend(
        [Reply(503, error_body("unavailable")), Reply(body=retry_frame(10) + frames(1, 5))]
    )

    assert await read(client) == EVERY_EVENT
    assert [seen.last_event_id for seen in script.requests] == [None, None]


async def test_a_drop_resumes_after_the_last_event_and_a_resend_is_not_handed_out_twice(
    script: Script, client: Client
) -> None:
    script.replies.extend(
        [
            # Ends after seq 3 without a terminal event: closed, not finished.
            Reply(body=retry_frame(10) + frames(1, 2) + b": keep-alive\n\n" + frames(3, 3)),
            # Half an event, then the connection ends: the half is dropped.
            Reply(body=frames(4, 4)[:-1]),
            # A server that resends seq 3 (say, a proxy replaying its buffer).
            Reply(body=frames(3, 5)),
        ]
    )

    assert await read(client) == EVERY_EVENT
    assert [seen.last_event_id for seen in script.requests] == [None, "3", "3"]


async def test_the_end_is_the_terminal_event_whatever_follows(
    script: Script, client: Client
) -> None:
    script.replies.append(Reply(body=frames(1, 5) + frames(1, 1)))

    assert await read(client) == EVERY_EVENT
    assert len(script.requests) == 1


async def test_a_204_ends_the_stream_with_nothing(script: Script, client: Client) -> None:
    script.replies.append(Reply(204))

    assert await read(client, after=5) == []
    assert [seen.last_event_id for seen in script.requests] == ["5"]


async def test_exhausted_retries_raise_stream_lost_with_the_last_seq(
    script: Script, client: Client
) -> None:
    script.replies.append(Reply(body=frames(1, 2)))
    script.replies.extend([Reply(503)] * 3)
    items: list[Item] = []

    with pytest.raises(StreamLost) as raised:
        await read(client, into=items)

    assert items == EVERY_EVENT[:2]
    assert raised.value.last_seq == 2
    assert raised.value.code == "stream_lost"
    assert "after=2" in raised.value.message
    assert len(script.requests) == 4  # the stream, then max_attempts refused reconnects


async def test_a_4xx_raises_the_servers_code_without_retrying(
    script: Script, client: Client
) -> None:
    script.replies.append(Reply(404, error_body("generation_not_found")))

    with pytest.raises(NotFound) as raised:
        await read(client)

    assert (raised.value.code, raised.value.message, raised.value.status) == (
        "generation_not_found",
        "what to do",
        404,
    )
    assert len(script.requests) == 1


async def test_a_hole_the_server_did_not_announce_is_reported_as_a_gap(
    script: Script, client: Client
) -> None:
    announced = b'event: gap\ndata: {"requested":1,"first_available":2}\n\n'
    script.replies.append(Reply(body=announced + frames(2, 2) + frames(4, 5)))

    assert await read(client) == [
        Gap(requested=1, first_available=2),
        EVERY_EVENT[1],
        Gap(requested=3, first_available=4),
        *EVERY_EVENT[3:],
    ]


async def test_a_gap_announced_again_after_a_reconnect_is_reported_once(
    script: Script, client: Client
) -> None:
    announced = b'event: gap\ndata: {"requested":1,"first_available":3}\n\n'
    script.replies.extend([Reply(body=announced), Reply(body=announced + frames(3, 5))])

    assert await read(client) == [Gap(requested=1, first_available=3), *EVERY_EVENT[2:]]
    # A reconnect after a gap asks for what follows it.
    assert [seen.last_event_id for seen in script.requests] == [None, "2"]


async def test_text_raises_the_error_event_with_the_text_so_far(
    script: Script, client: Client
) -> None:
    error = events.Error(code="provider_error", message="upstream said no", retryable=True)
    body = frames(1, 2) + event_frame(3, "error", events.encode(error))
    script.replies.append(Reply(body=body))

    with pytest.raises(GenerationFailed) as raised:
        await client.text(GENERATION)

    assert (raised.value.code, raised.value.message) == ("provider_error", "upstream said no")
    assert raised.value.detail == {"retryable": True, "text": "Hello"}


async def test_the_api_key_or_a_read_token_is_sent(script: Script, client: Client) -> None:
    script.replies.extend([Reply(body=frames(1, 5))] * 3)

    await read(client)
    _ = [item async for item in client.events(GENERATION, token="read-1")]
    _ = [item async for item in client.events(GENERATION, token="read-2", token_in_query=True)]

    assert script.requests == [
        Seen(None, "Bearer key-1", None),
        Seen(None, "Bearer read-1", None),
        Seen(None, None, "read-2"),
    ]


def reset_frame(position: int, from_seq: int) -> bytes:
    return event_frame(position, "reset", events.encode(events.Reset(from_seq=from_seq)))


async def test_a_reset_is_handed_out_and_the_stream_reads_on_from_its_id(
    script: Script, client: Client
) -> None:
    """The log went back: seqs 3.. are void, as the log's reset at 9 says; later a
    reader's own reset (id 0) voids everything and the stream starts over."""
    script.replies.extend(
        [
            Reply(body=retry_frame(10) + frames(1, 4)),  # then the connection drops
            Reply(body=reset_frame(9, 3) + frames(3, 3).replace(b"id: 3", b"id: 10")),
            Reply(body=reset_frame(0, 1) + frames(1, 5)),
        ]
    )

    items = await read(client)

    assert items == [
        *EVERY_EVENT[:4],
        events.Reset(from_seq=3),
        Entry(10, EVENTS[2]),  # no gap reported across the void seqs
        events.Reset(from_seq=1),
        *EVERY_EVENT,
    ]
    assert [seen.last_event_id for seen in script.requests] == [None, "4", "10"]


async def test_text_drops_what_a_reset_voids(script: Script, client: Client) -> None:
    script.replies.append(
        Reply(
            body=frames(1, 3)  # "Hello", ", "
            + reset_frame(7, 3)  # ", " is void
            + event_frame(8, "token", events.encode(events.Token(text=" there")))
            + event_frame(9, "done", events.encode(events.Done(reason="stop")))
        )
    )

    assert await client.text(GENERATION) == "Hello there"
