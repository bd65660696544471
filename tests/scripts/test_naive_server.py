"""The benchmark's naive reader serves the same API shape and the same SSE bytes as tokentape.

That is what makes the side-by-side comparison fair: same log, same framing,
only the read path differs.
"""

from __future__ import annotations

import pytest

from app import events
from app.sse import event_frame
from app.store import GenerationLog
from tests.scripts.conftest import Client, StartNaive


@pytest.fixture
async def naive(start_naive: StartNaive) -> Client:
    return await start_naive("worker")


async def finished_generation(naive: Client, log: GenerationLog) -> str:
    body = {"model": "sim", "messages": [{"role": "user", "content": "bench"}]}
    created = await naive.post("/v1/generations", json=body)
    assert created.status == 201
    generation_id: str = (await created.json())["id"]
    lease = await log.acquire(generation_id, "test-worker")
    assert lease is not None
    batch: list[events.Event] = [
        events.Started(model="sim"),
        events.Token(text="Hello"),
        events.Token(text=" world"),
        events.Done(reason="stop"),
    ]
    await log.append(lease, 1, batch)
    return generation_id


async def test_events_are_framed_exactly_as_tokentape_frames_them(
    naive: Client, log: GenerationLog
) -> None:
    generation_id = await finished_generation(naive, log)
    response = await naive.get(f"/v1/generations/{generation_id}/events")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    entries = await log.read(generation_id, 0, 100)
    expected = b"".join(event_frame(e.seq, e.type, e.data) for e in entries)
    assert await response.read() == expected


async def test_it_resumes_after_last_event_id(naive: Client, log: GenerationLog) -> None:
    generation_id = await finished_generation(naive, log)
    response = await naive.get(
        f"/v1/generations/{generation_id}/events", headers={"Last-Event-ID": "2"}
    )
    entries = await log.read(generation_id, 2, 100)
    assert [e.seq for e in entries] == [3, 4]
    assert await response.read() == b"".join(event_frame(e.seq, e.type, e.data) for e in entries)
