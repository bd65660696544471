"""tail: follows with app.client over real HTTP SSE, survives a reader restart, prints the
text exactly once, and renders complete lines of markdown."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from app import events
from app.client import Client
from app.errors import NotFound, Unavailable
from app.keys import new_generation_id
from app.settings import Settings
from app.store import GenerationLog, Lease
from app.tools.tail import MarkdownRenderer, RawRenderer, follow
from tests.conftest import roll_back
from tests.tools.builders import REQUEST, tokens, write_generation
from tests.tools.reader_server import ReaderServer
from tests.tools.screen import as_text, plain_console, printed

FIRST_HALF = "## Plan\nStep one: **split** the tokens"
SECOND_HALF = " anywhere.\n- a bullet\n```py\nx = 1\n```\nThe end."


class Capture(io.StringIO):
    """Stdout for the renderer; `reached(text)` is awaitable."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting: list[tuple[str, asyncio.Event]] = []

    def write(self, s: str) -> int:
        written = super().write(s)
        for text, reached in self._waiting:
            if self.getvalue().endswith(text):
                reached.set()
        return written

    async def reached(self, text: str) -> None:
        event = asyncio.Event()
        self._waiting.append((text, event))
        if self.getvalue().endswith(text):
            event.set()
        await event.wait()


# A reconnecting client waits this long at first (the server's `retry:`).
RETRY_MILLISECONDS = 50


@pytest.fixture
async def stub(redis: Redis, settings: Settings) -> AsyncIterator[ReaderServer]:
    server = ReaderServer(
        GenerationLog(redis, settings.replace(retry_milliseconds=RETRY_MILLISECONDS))
    )
    await server.start()
    yield server
    if server.running:
        await server.stop()


@pytest.fixture
async def client(stub: ReaderServer) -> AsyncIterator[Client]:
    async with Client(stub.url) as client:
        yield client


async def test_tail_survives_a_reader_restart_and_prints_the_text_once(
    log: GenerationLog, stub: ReaderServer, client: Client
) -> None:
    generation_id = new_generation_id()
    await log.create(generation_id, REQUEST)
    lease = await log.acquire(generation_id, "worker-test")
    assert lease is not None
    first_seq = await log.append(lease, 1, [events.Started(), *tokens(FIRST_HALF)])

    out, notices = Capture(), list[str]()
    tail = asyncio.create_task(
        follow(client, generation_id, RawRenderer(out), notice=notices.append)
    )
    await out.reached(FIRST_HALF)

    await stub.stop()  # the reader process dies mid-stream
    last = await log.append(
        lease, first_seq + 1, [*tokens(SECOND_HALF), events.Done(reason="stop")]
    )
    await stub.start()

    result = await asyncio.wait_for(tail, 10)
    assert out.getvalue() == FIRST_HALF + SECOND_HALF
    assert result.last_seq == last
    assert isinstance(result.terminal, events.Done)
    assert stub.last_event_ids[:2] == [None, str(first_seq)]
    assert result.connections >= 2
    # The client's report of the drop is a notice, beside the text.
    assert any(f"after seq {first_seq}" in n and n.startswith("↻") for n in notices)


async def test_tail_follows_live_appends(
    log: GenerationLog, stub: ReaderServer, client: Client
) -> None:
    generation_id = new_generation_id()
    await log.create(generation_id, REQUEST)
    lease = await log.acquire(generation_id, "worker-test")
    assert lease is not None
    out = Capture()
    tail = asyncio.create_task(follow(client, generation_id, RawRenderer(out), notice=print))
    seq = 0
    for word in ["one ", "two ", "three"]:
        seq = await log.append(lease, seq + 1, [events.Token(text=word)])
        stub.notify()
        await out.reached(word)
    await log.append(lease, seq + 1, [events.Done(reason="stop")])
    stub.notify()
    result = await asyncio.wait_for(tail, 10)
    assert out.getvalue() == "one two three"
    assert result.connections == 1


async def test_tail_after_a_seq_prints_only_what_follows_it(
    log: GenerationLog, client: Client
) -> None:
    generation_id = await write_generation(
        log,
        [
            [events.Token(text="seen ")],
            [events.Token(text="not yet")],
            [events.Done(reason="stop")],
        ],
    )
    out = Capture()
    result = await follow(client, generation_id, RawRenderer(out), notice=print, after_seq=1)
    assert out.getvalue() == "not yet"
    assert result.last_seq == 3


async def test_tail_reports_a_retention_gap(
    log: GenerationLog, redis: Redis, client: Client
) -> None:
    generation_id = await write_generation(
        log,
        [[events.Token(text="lost ")], [events.Token(text="kept")], [events.Done(reason="stop")]],
    )
    await redis.xdel(log.keys.log(generation_id), "1-0")  # what the length cap does
    out, notices = Capture(), list[str]()
    await follow(client, generation_id, RawRenderer(out), notice=notices.append)
    assert out.getvalue() == "kept"
    assert notices == ["⚠ gap: events 1..1 were removed by retention; continuing at 2"]


async def test_tail_reports_a_takeover(log: GenerationLog, client: Client) -> None:
    generation_id = await write_generation(
        log,
        [
            [events.Started(attempt=1), events.Token(text="a")],
            [events.Started(attempt=2), events.Token(text="b"), events.Done(reason="stop")],
        ],
    )
    out, notices = Capture(), list[str]()
    await follow(client, generation_id, RawRenderer(out), notice=notices.append)
    assert out.getvalue() == "ab"
    assert notices == ["↻ seq 3: a worker took over (attempt 2)"]


async def test_tail_stops_on_204_and_refuses_an_unknown_id(
    log: GenerationLog, client: Client
) -> None:
    generation_id = await write_generation(log, [[events.Done(reason="stop")]])
    # A resumed tail, already past the terminal event.
    result = await follow(
        client, generation_id, RawRenderer(io.StringIO()), notice=print, after_seq=1
    )
    assert (result.terminal, result.connections) == (None, 1)

    with pytest.raises(NotFound):
        await follow(client, new_generation_id(), RawRenderer(io.StringIO()), notice=print)


async def test_tail_gives_up_after_bounded_reconnects_and_says_how_to_resume() -> None:
    generation_id, notices = new_generation_id(), list[str]()
    async with Client(
        "http://127.0.0.1:9",  # discard port: connection refused
        max_attempts=4,
        initial_backoff=0.01,
        max_backoff=0.02,
    ) as client:
        with pytest.raises(Unavailable) as gave_up:
            await follow(client, generation_id, RawRenderer(io.StringIO()), notice=notices.append)
    assert gave_up.value.code == "tail_gave_up"
    assert f"`tokentape tail {generation_id} --after 0`" in gave_up.value.message
    # A notice for each wait between the tries, as the client reports it.
    assert [n.partition("; ")[2] for n in notices] == [
        f"reconnecting after seq 0 in 0.0 s (attempt {attempt} of 4)" for attempt in (2, 3, 4)
    ]
    assert all("Cannot connect to host 127.0.0.1:9" in n for n in notices)


def test_markdown_renders_complete_lines_and_shows_the_unfinished_one_as_is() -> None:
    console = plain_console(width=40)
    renderer = MarkdownRenderer(console, io.StringIO())
    renderer.text("# Ti")
    assert as_text(renderer.in_progress) == "# Ti"  # not parsed until its newline
    renderer.text("tle\nsome **bo")
    assert as_text(renderer.in_progress, width=40).splitlines() == [
        "                 Title",
        "some **bo",
    ]
    for chunk in ["ld** te", "xt\n- it", "em\n``", "`py\ncode\n```\n", "tail"]:
        renderer.text(chunk)
        assert not any("**" in line for line in printed(console))  # a split `**` never printed
    renderer.tool_call("lookup", {"q": "x"})
    renderer.finish()
    assert printed(console) == [
        "                 Title",
        "",
        "some bold text",
        "",
        " • item",
        "",
        " code",
        "",
        "tail",
        '⚙ lookup({"q": "x"})',
    ]


def test_a_long_code_block_is_printed_in_parts_that_stay_code() -> None:
    console = plain_console(width=40)
    renderer = MarkdownRenderer(console, io.StringIO(), max_block_lines=2)
    renderer.text("```\n# not a heading\nx = 1\n# nor this\n```\nafter\n")
    renderer.finish()
    code = [line for line in printed(console) if line]
    assert code == [" # not a heading", " x = 1", " # nor this", "after"]


def test_blocks_are_spaced_as_the_text_spaces_them() -> None:
    console = plain_console(width=40)
    renderer = MarkdownRenderer(console, io.StringIO())
    renderer.text("para\n\n- a\n- b\n\n\n> quoted\n\nnext")
    renderer.finish()
    assert printed(console) == ["para", "", " • a", " • b", "", "", "▌ quoted", "", "next"]


def test_a_notice_goes_to_its_stream_and_rendering_goes_on() -> None:
    console, notices = plain_console(width=40), io.StringIO()
    renderer = MarkdownRenderer(console, notices)
    renderer.text("one\ntw")
    renderer.notice("↻ reconnecting")
    renderer.text("o\n")
    renderer.finish()
    assert notices.getvalue() == "↻ reconnecting\n"
    assert printed(console) == ["one two"]  # one paragraph: markdown joins its lines


def test_raw_puts_a_tool_call_on_its_own_line() -> None:
    out = io.StringIO()
    renderer = RawRenderer(out)
    renderer.text("Let me check")
    renderer.tool_call("lookup", {"q": "x"})
    assert out.getvalue() == 'Let me check\n⚙ lookup({"q": "x"})\n'


async def test_tail_says_what_a_reset_voids_and_goes_on(log: GenerationLog, client: Client) -> None:
    generation_id = await write_generation(
        log, [[events.Token(text="kept ")], [events.Token(text="lost ")]]
    )
    await roll_back(log, generation_id, 1)
    state = await log.state(generation_id)
    assert state is not None
    lease = Lease(generation_id, "w", state.epoch, 1, 1, False)
    assert await log.reset(lease, confirmed_to=2, sent_to=2) == (3, 2)
    taken = await log.acquire(generation_id, "w2")
    assert taken is not None
    await log.append(taken, 4, [events.Token(text="again"), events.Done(reason="stop")])
    out, notices = Capture(), list[str]()
    await follow(client, generation_id, RawRenderer(out), notice=notices.append)
    assert out.getvalue() == "kept again"
    assert notices == ["⚠ Redis lost events: what was printed from seq 2 on is void; reading on"]
