"""One trace through the real app and workers: request, generation, takeover, every reader."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from redis.asyncio import Redis

from app import sse
from app.events import LogEntry, Started
from app.http import create_app
from app.settings import Settings
from app.store import GenerationLog
from app.telemetry import Telemetry
from tests.http.conftest import ClientFactory, until_subscriptions
from tests.telemetry.conftest import samples_by_name
from tests.workers.conftest import StartWorker, at_least, until_log
from tests.workers.conftest import start_worker as start_worker  # a fixture, shared

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
GENERATION_ID = "tokentape.generation.id"


@pytest.fixture
def exported() -> Iterator[tuple[Telemetry, InMemorySpanExporter]]:
    spans = InMemorySpanExporter()
    telemetry = Telemetry(
        span_processors=[SimpleSpanProcessor(spans)], metric_readers=[InMemoryMetricReader()]
    )
    yield telemetry, spans
    telemetry.shutdown()


async def read(
    client: TestClient[web.Request, web.Application], url: str, *, last_id: str = "", take: int = 0
) -> list[sse.ReceivedEvent]:
    """Read a stream to its end, or drop the connection after `take` events."""
    parser = sse.Parser()
    messages: list[sse.ReceivedEvent] = []
    headers = {"Last-Event-ID": last_id} if last_id else {}
    async with client.get(url, headers=headers) as response:
        async for chunk in response.content.iter_any():
            messages.extend(parser.feed(chunk))
            if take and len(messages) >= take:
                break
    return messages


def taken_over(entries: list[LogEntry]) -> bool:
    """The second attempt has started (it records its span before its `started` event)."""
    return any(
        e.type == "started" and e.event() == Started(model="sim", attempt=2) for e in entries
    )


def by_name(spans: tuple[ReadableSpan, ...], prefix: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name.startswith(prefix)]


async def test_a_generation_its_takeover_and_its_readers_form_one_trace(
    redis: Redis,
    settings: Settings,
    start_worker: StartWorker,
    aiohttp_client: ClientFactory,
    exported: tuple[Telemetry, InMemorySpanExporter],
) -> None:
    telemetry, spans = exported
    settings = settings.replace(lease_seconds=0.5)
    log = GenerationLog(redis, settings)
    app = create_app(settings, redis, telemetry)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(app)
    first = await start_worker(settings, worker_id="first", telemetry=telemetry)
    body = {
        "model": "sim",
        "messages": [{"role": "user", "content": "x"}],
        "sim": {"tokens": 120, "tokens_per_second": 150, "seed": 3},
    }
    created = await client.post("/v1/generations", json=body, headers={"traceparent": CALLER})
    generation = await created.json()
    events_url = generation["events_url"]

    await until_log(log, generation["id"], at_least(20))
    partial = await read(client, events_url, take=5)  # this client drops mid-generation…
    await first.abort()  # …and the worker dies
    await start_worker(settings, worker_id="second", telemetry=telemetry)
    await until_log(log, generation["id"], taken_over)

    whole = await read(client, events_url)
    rest = await read(client, events_url, last_id=partial[-1].id or "")  # the client resumes
    assert [m.id for m in partial + rest] == [m.id for m in whole]
    assert whole[-1].event == "done"
    # The server notices the dropped client; its span ends as the handler lets go.
    await until_subscriptions(app, 0)

    finished = spans.get_finished_spans()
    (request,) = by_name(finished, "POST /v1/generations")
    attempts = sorted(by_name(finished, "chat sim"), key=lambda s: s.start_time or 0)
    readers = by_name(finished, "sse read")
    assert len(attempts) == 2
    assert len(readers) == 3

    # Everything is one trace, the caller's, and names the generation.
    for span in (request, *attempts):
        assert span.context is not None
        assert f"{span.context.trace_id:032x}" == TRACE_ID
    for span in (request, *attempts, *readers):
        assert (span.attributes or {})[GENERATION_ID] == generation["id"]

    # Both attempts are children of the request; the takeover links to the attempt that died.
    died, took_over = attempts
    assert request.context is not None
    assert died.context is not None
    assert took_over.context is not None
    assert {a.parent.span_id for a in attempts if a.parent} == {request.context.span_id}
    assert (took_over.attributes or {})["tokentape.generation.takeover"] is True
    assert (took_over.attributes or {})["tokentape.generation.attempt"] == 2
    assert [link.context.span_id for link in took_over.links] == [died.context.span_id]

    # A reader links to the attempt that was writing when it connected; a client that
    # went away is not an error.
    links = {
        str((r.attributes or {})["tokentape.read.end_reason"]): [
            link.context.span_id for link in r.links
        ]
        for r in readers
        if not (r.attributes or {})["tokentape.read.resume"]
    }
    assert links == {
        "client_gone": [died.context.span_id],
        "terminal": [took_over.context.span_id],
    }
    ends = sorted(str((r.attributes or {})["tokentape.read.end_reason"]) for r in readers)
    assert ends == ["client_gone", "terminal", "terminal"]
    assert all(r.status.status_code is not StatusCode.ERROR for r in readers)
    resumed = [r for r in readers if (r.attributes or {})["tokentape.read.resume"]]
    assert len(resumed) == 1
    assert (resumed[0].attributes or {})["tokentape.read.first_seq"] == int(partial[-1].id or 0) + 1

    # /metrics is Prometheus text and counts what happened.
    samples = {
        name: found[0].value
        for name, found in samples_by_name(await (await client.get("/metrics")).read()).items()
    }
    assert samples["tokentape_resumes_total"] == 1
    assert samples["tokentape_lease_takeovers_total"] == 1
    # The dropped client may have been sent an event or two it left before reading.
    sent = {
        str((r.attributes or {})["tokentape.read.end_reason"])
        + ("+resume" if (r.attributes or {})["tokentape.read.resume"] else ""): int(
            (r.attributes or {})["tokentape.read.events_sent"]  # type: ignore[arg-type]
        )
        for r in readers
    }
    assert sent["terminal"] == len(whole)
    assert sent["terminal+resume"] == len(rest)
    assert sent["client_gone"] >= len(partial)
    assert samples["tokentape_events_sent_total"] == sum(sent.values())
    assert samples["tokentape_time_to_first_token_seconds_count"] >= 1
