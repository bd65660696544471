"""A worker whose log went back under it (Redis came back with an older copy of it)."""

from __future__ import annotations

from app import events
from app.events import Reset, Started
from app.settings import Settings
from app.store import GenerationLog
from tests.conftest import roll_back
from tests.workers.conftest import (
    StartWorker,
    at_least,
    ended,
    expected_events,
    sim_request,
    submit,
    until_log,
)


async def test_the_worker_records_the_loss_and_the_generation_continues_from_the_log(
    start_worker: StartWorker, log: GenerationLog, settings: Settings
) -> None:
    running = await start_worker(settings.replace(lease_seconds=2.0))
    request = sim_request(tokens=300, rate=150)
    generation_id = await submit(log, request)
    await until_log(log, generation_id, at_least(60))
    await roll_back(log, generation_id, 20)

    entries = await until_log(log, generation_id, ended)

    resets = [(e.seq, e.event()) for e in entries if e.type == "reset"]
    assert len(resets) == 1, resets
    seq, reset = resets[0]
    assert reset == Reset(from_seq=21)
    assert seq > 60  # past every seq the worker had appended: none names two events
    assert [e.seq for e in entries[:21]] == [*range(1, 21), seq]
    assert [e.seq for e in entries[20:]] == list(range(seq, seq + len(entries) - 20))
    # The next run continued from what the log kept: every event of the answer, once.
    answer = [e.event() for e in entries if e.seq < 21 or e.seq > seq]
    assert [e for e in answer if not isinstance(e, Started)] == expected_events(request)
    assert [e.attempt for e in answer if isinstance(e, Started)] == [1, 2]
    assert isinstance(answer[-1], events.Done)
    (counted,) = [
        line
        for line in running.worker.telemetry.render_prometheus().splitlines()
        if line.startswith(b"tokentape_log_resets_total")
    ]
    assert counted.endswith(b" 1.0")
