"""Export, the recording format, and export → replay → export against a real Redis."""

from __future__ import annotations

import io

import msgspec
import pytest
from redis.asyncio import Redis

from app import events
from app.errors import Expired, NotFound
from app.keys import new_generation_id
from app.store import GenerationLog
from app.tools import recording
from app.tools.recording import BadRecording, Recording, UnsupportedRecordingVersion
from app.tools.replay import Replayer
from tests.tools.builders import REQUEST, recording_of, tokens, write_generation

STORY: list[list[events.Event]] = [
    [events.Started(model="sim", attempt=1)],
    [*tokens("# Title\nSome **bold** text,\n")],
    [events.Token(text="and a tool: ")],
    [
        events.ToolCallDelta(index=0, id="call_1", name="lookup", arguments_delta='{"ci'),
        events.ToolCallDelta(index=0, arguments_delta='ty": "Paris"}'),
    ],
    [events.ToolCall(index=0, id="call_1", name="lookup", arguments={"city": "Paris"})],
    [events.Started(model="sim", attempt=2)],  # a takeover, replayed as recorded
    [events.Token(text="done.")],
    [events.Done(reason="stop", usage=events.Usage(completion_tokens=12))],
]


async def export_bytes(log: GenerationLog, generation_id: str) -> bytes:
    out = io.BytesIO()
    await recording.export(log, generation_id, out.write)
    return out.getvalue()


def parse(data: bytes) -> Recording:
    return recording.parse_recording(io.BytesIO(data), "test")


def sequence(recorded: Recording) -> list[tuple[str, events.Event]]:
    return [(e.type, e.event()) for e in recorded.events]


async def test_export_holds_header_and_every_event(log: GenerationLog) -> None:
    generation_id = await write_generation(log, STORY)
    data = await export_bytes(log, generation_id)
    lines = data.splitlines()
    header = msgspec.json.decode(lines[0])
    assert header["format"] == "tokentape.recording"
    assert header["version"] == 1
    assert header["generation"]["id"] == generation_id
    assert header["generation"]["status"] == "done"
    first_event = msgspec.json.decode(lines[1])
    assert set(first_event) == {"seq", "type", "data", "appended_ms"}
    assert first_event["data"] == {"type": "started", "model": "sim", "attempt": 1}

    exported = parse(data)
    assert [e.seq for e in exported.events] == list(range(1, len(exported.events) + 1))
    assert [event for _, event in sequence(exported)] == [e for batch in STORY for e in batch]


async def test_export_reads_in_pages(log: GenerationLog) -> None:
    many = [[events.Token(text=f"{i} ")] for i in range(1, 1203)] + [[events.Done(reason="stop")]]
    generation_id = await write_generation(log, many)
    out = io.BytesIO()
    progress: list[tuple[int, int]] = []
    count = await recording.export(
        log, generation_id, out.write, lambda done, total: progress.append((done, total))
    )
    assert count == 1203
    assert progress == [(500, 1203), (1000, 1203), (1203, 1203)]
    assert len(parse(out.getvalue()).events) == 1203


async def test_export_replay_export_gives_the_same_events(log: GenerationLog) -> None:
    original_id = await write_generation(log, STORY)
    original = parse(await export_bytes(log, original_id))

    replayer = Replayer(log, original, speed=None)
    replay_id = await replayer.create()
    result = await replayer.run(replay_id)
    assert not result.truncated
    replayed = parse(await export_bytes(log, replay_id))

    assert sequence(replayed) == sequence(original)
    assert [e.seq for e in replayed.events] == list(range(1, len(original.events) + 1))
    assert replayed.generation.metadata == {"replay_of": original_id, "replay_speed": "max"}
    assert replayed.generation.model == "sim"
    # The replay is created with the recorded prompt, not a placeholder.
    assert original.generation.request == REQUEST
    replayed_request = await log.request(replay_id)
    assert replayed_request is not None
    assert replayed_request.messages == REQUEST.messages
    assert replayed.generation.status == "done"
    state = await log.state(replay_id)
    assert state is not None
    assert state.finish_reason == "stop"


async def test_a_recording_without_terminal_replays_to_replay_truncated(
    log: GenerationLog,
) -> None:
    live_id = await write_generation(log, STORY[:3])  # exported mid-flight
    midway = parse(await export_bytes(log, live_id))
    assert midway.terminal is None

    replayer = Replayer(log, midway, speed=None)
    replay_id = await replayer.create()
    assert (await replayer.run(replay_id)).truncated
    replayed = parse(await export_bytes(log, replay_id))

    assert sequence(replayed)[:-1] == sequence(midway)
    closing = replayed.events[-1].event()
    assert isinstance(closing, events.Error)
    assert closing.code == "replay_truncated"
    state = await log.state(replay_id)
    assert state is not None
    assert state.status == "error"


async def test_a_recording_writes_back_byte_for_byte(log: GenerationLog) -> None:
    generation_id = await write_generation(log, STORY)
    data = await export_bytes(log, generation_id)
    assert b"".join(recording.recording_lines(parse(data))) == data


async def test_unknown_and_expired_generations_are_typed_errors(
    log: GenerationLog, redis: Redis
) -> None:
    with pytest.raises(NotFound) as unknown:
        await export_bytes(log, new_generation_id())
    assert unknown.value.code == "generation_not_found"

    generation_id = await write_generation(log, STORY)
    await redis.delete(log.keys.log(generation_id))  # what retention does after the TTL
    with pytest.raises(Expired) as expired:
        await recording.fetch(log, generation_id)
    assert expired.value.code == "generation_expired"


@pytest.mark.parametrize(
    ("content", "error", "fragment"),
    [
        (b"", BadRecording, "line 1"),
        (b"not json\n", BadRecording, "line 1"),
        (b'{"format": "other", "version": 1}\n', BadRecording, "not a tokentape.recording"),
        (b'{"format": "tokentape.recording", "version": 2}\n', UnsupportedRecordingVersion, "2"),
        (
            b'{"format": "tokentape.recording", "version": 1, "exported_ms": 1,'
            b' "generation": {"id": "x", "model": "sim", "status": "done", "created_ms": 1,'
            b' "last_seq": 1}}\n{"seq": 1, "type": "token", "data": {"type": "nope"},'
            b' "appended_ms": 2}\n',
            BadRecording,
            "line 2",
        ),
    ],
    ids=["empty", "not-json", "other-format", "newer-version", "bad-event"],
)
def test_bad_recordings_are_refused_with_a_code(
    content: bytes, error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error) as refused:
        recording.parse_recording(io.BytesIO(content), "f.jsonl")
    assert fragment in str(refused.value)


def test_events_out_of_order_are_refused() -> None:
    good = recording_of([(0, events.Token(text="a")), (1, events.Token(text="b"))])
    lines = list(recording.recording_lines(good))
    with pytest.raises(BadRecording, match="out of order"):
        recording.parse_recording([lines[0], lines[2], lines[1]], "f.jsonl")
