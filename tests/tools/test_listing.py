"""ls: recent generations from the index, filtered by status and age, newest first."""

from __future__ import annotations

import msgspec
import pytest
from redis.asyncio import Redis

from app import events
from app.errors import InvalidRequest
from app.keys import new_generation_id
from app.store import GenerationLog
from app.tools import listing
from tests.tools.builders import REQUEST, write_generation
from tests.tools.screen import as_text


async def test_ls_lists_newest_first_with_status_events_and_ttft(log: GenerationLog) -> None:
    finished = await write_generation(
        log, [[events.Started()], [events.Token(text="hi")], [events.Done(reason="stop")]]
    )
    running = await write_generation(log, [[events.Started()], [events.ToolCallDelta(index=0)]])
    queued = new_generation_id()
    await log.create(queued, REQUEST)

    found = await listing.recent_generations(log)
    assert {s.id for s in found} == {queued, running, finished}
    created = [s.created_ms for s in found]
    assert created == sorted(created, reverse=True)
    by_id = {s.id: s for s in found}
    assert (by_id[finished].status, by_id[finished].events) == ("done", 3)
    ttft = by_id[finished].time_to_first_token_ms
    assert ttft is not None
    assert ttft >= 0
    assert by_id[running].status == "running"
    assert by_id[running].time_to_first_token_ms is None  # no token yet
    assert by_id[queued].events == 0


async def test_ls_filters_by_status_age_and_limit(log: GenerationLog, redis: Redis) -> None:
    done = [await write_generation(log, [[events.Done(reason="stop")]]) for _ in range(3)]
    failed = await write_generation(log, [[events.Error(code="boom", message="x")]])
    # Two hours old: re-score it in the index the way create() would have.
    old = done[0]
    created = (await redis.zscore(log.keys.recent_generations, old)) or 0
    await redis.zadd(log.keys.recent_generations, {old: created - 2 * 3_600_000})

    assert [s.id for s in await listing.recent_generations(log, status="error")] == [failed]
    recent_done = await listing.recent_generations(log, status="done", since_ms=3_600_000)
    assert {s.id for s in recent_done} == set(done[1:])
    assert len(await listing.recent_generations(log, limit=2)) == 2


async def test_ls_skips_generations_whose_metadata_expired(
    log: GenerationLog, redis: Redis
) -> None:
    kept = await write_generation(log, [[events.Done(reason="stop")]])
    gone = await write_generation(log, [[events.Done(reason="stop")]])
    await redis.delete(log.keys.meta(gone))
    assert [s.id for s in await listing.recent_generations(log)] == [kept]


async def test_ls_renders_a_table_and_json_lines(log: GenerationLog) -> None:
    generation_id = await write_generation(log, [[events.Done(reason="stop")]])
    found = await listing.recent_generations(log)
    table = as_text(listing.render_table(found)).splitlines()
    assert table[0].split() == [
        "ID",
        "STATUS",
        "MODEL",
        "EVENTS",
        "CREATED",
        "(UTC)",
        "DURATION",
        "TTFT",
    ]
    assert table[1].split()[:4] == [generation_id, "done", "sim", "1"]
    line = msgspec.json.decode(listing.render_json_lines(found).splitlines()[0])
    assert line["id"] == generation_id
    assert line["status"] == "done"


def test_a_model_name_is_shown_as_is_not_read_as_markup() -> None:
    summary = listing.GenerationSummary(
        id="g" * 22,
        status="error",
        model="openai/[bold]x[/bold]",
        events=3,
        created_ms=0,
        duration_ms=1500,
        time_to_first_token_ms=None,
    )
    row = as_text(listing.render_table([summary])).splitlines()[1]
    assert row.split() == [
        "g" * 22,
        "error",
        "openai/[bold]x[/bold]",
        "3",
        "1970-01-01",
        "00:00:00",
        "1.50",
        "s",
        "-",
    ]


def test_a_narrow_terminal_wraps_cells_but_keeps_the_id_whole() -> None:
    summary = listing.GenerationSummary(
        id="DnBdX2mjeGLPdvkWoyl3zw",
        status="cancelled",
        model="anthropic/claude-sonnet-4-5",
        events=155,
        created_ms=0,
        duration_ms=531,
        time_to_first_token_ms=24,
    )
    text = as_text(listing.render_table([summary]), width=70)
    assert "…" not in text  # nothing cut short
    assert any(line.startswith("DnBdX2mjeGLPdvkWoyl3zw ") for line in text.splitlines())


@pytest.mark.parametrize(
    ("text", "ms"),
    [("90", 90_000), ("90s", 90_000), ("15m", 900_000), ("1h", 3_600_000), ("1.5d", 129_600_000)],
)
def test_since_durations(text: str, ms: int) -> None:
    assert listing.parse_since(text) == ms


@pytest.mark.parametrize("text", ["", "h", "1y", "-1h", "soon"])
def test_bad_since_is_a_typed_error(text: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        listing.parse_since(text)
    assert refused.value.code == "invalid_since"
