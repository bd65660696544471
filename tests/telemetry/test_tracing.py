"""Spans: request → job → worker attempt(s) → SSE connections, with their attributes and links."""

from __future__ import annotations

import asyncio
import contextvars

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from app.errors import InvalidRequest, TokentapeError, Unavailable
from app.events import Usage
from app.store import Job
from app.telemetry import (
    Telemetry,
    context_from_traceparent,
    link_from_traceparent,
    traceparent_of,
)
from tests.telemetry.conftest import GENERATION_ID, Recorded

CALLER_TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN_ID = 0xB7AD6B7169203331
CALLER_TRACEPARENT = f"00-{CALLER_TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"


def attrs(span: ReadableSpan) -> dict[str, object]:
    return dict(span.attributes or {})


def events(span: ReadableSpan) -> list[str]:
    return [event.name for event in span.events]


def start_generation(recorded: Recorded, headers: dict[str, str]) -> Job:
    """What POST /v1/generations does: a request span, its traceparent into the job."""
    with recorded.telemetry.request_span(headers, GENERATION_ID) as traceparent:
        return Job(id="1-0", generation_id=GENERATION_ID, traceparent=traceparent)


def test_traceparent_travels_from_http_headers_through_the_job_to_the_worker_span(
    recorded: Recorded,
) -> None:
    job = start_generation(recorded, {"traceparent": CALLER_TRACEPARENT})

    with recorded.telemetry.generation_span(
        job.generation_id, model="sim-1", provider="sim", parent_traceparent=job.traceparent
    ):
        pass

    (request,) = recorded.finished("POST /v1/generations")
    (generation,) = recorded.finished("chat sim-1")
    assert request.context is not None
    assert generation.context is not None
    assert request.context.trace_id == CALLER_TRACE_ID
    assert request.parent is not None
    assert request.parent.span_id == CALLER_SPAN_ID
    assert request.kind is SpanKind.SERVER
    assert generation.context.trace_id == CALLER_TRACE_ID
    assert generation.parent is not None
    assert generation.parent.span_id == request.context.span_id
    assert attrs(request)["tokentape.generation.id"] == GENERATION_ID


def test_a_request_without_traceparent_starts_a_new_trace(recorded: Recorded) -> None:
    job = start_generation(recorded, {})

    (request,) = recorded.finished()
    assert request.parent is None
    assert request.context is not None
    assert job.traceparent is not None
    assert job.traceparent.startswith(
        f"00-{request.context.trace_id:032x}-{request.context.span_id:016x}-"
    )


def test_generation_span_carries_gen_ai_attributes_and_events(recorded: Recorded) -> None:
    clock = recorded.clock
    with recorded.telemetry.generation_span(
        GENERATION_ID, model="sim-1", provider="sim", attempt=1
    ) as generation:
        clock.advance(0.25)
        generation.token()
        clock.advance(0.01)
        generation.token()
        generation.tool_call("get_weather")
        generation.finish("tool_calls", Usage(prompt_tokens=12, completion_tokens=34))

    (span,) = recorded.finished()
    assert span.kind is SpanKind.CLIENT
    assert attrs(span) == {
        "tokentape.generation.id": GENERATION_ID,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "sim-1",
        "gen_ai.provider.name": "sim",
        "gen_ai.system": "sim",
        "tokentape.generation.attempt": 1,
        "tokentape.generation.takeover": False,
        "gen_ai.response.time_to_first_chunk": pytest.approx(0.25),
        "gen_ai.response.finish_reasons": ("tool_calls",),
        "tokentape.generation.tokens": 2,
        "tokentape.generation.tool_calls": 1,
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 34,
    }
    assert events(span) == ["first_token", "tool_call"]
    assert dict(span.events[1].attributes or {}) == {"gen_ai.tool.name": "get_weather"}
    assert span.status.status_code is StatusCode.UNSET


def test_error_event_and_escaping_exception_mark_the_generation_span_failed(
    recorded: Recorded,
) -> None:
    with recorded.telemetry.generation_span(GENERATION_ID, model="m", provider="p") as generation:
        generation.error("provider_timeout", "no token for 60 s")
    with (
        pytest.raises(RuntimeError),
        recorded.telemetry.generation_span(GENERATION_ID, model="m", provider="p"),
    ):
        raise RuntimeError("adapter bug")

    reported, raised = recorded.finished()
    assert reported.status.status_code is StatusCode.ERROR
    assert reported.status.description == "provider_timeout: no token for 60 s"
    assert attrs(reported)["error.type"] == "provider_timeout"
    assert raised.status.status_code is StatusCode.ERROR
    assert attrs(raised)["error.type"] == "RuntimeError"
    assert events(raised) == ["exception"]


def test_a_cancelled_worker_task_leaves_an_interrupted_span_not_an_error(
    recorded: Recorded,
) -> None:
    with (
        pytest.raises(asyncio.CancelledError),
        recorded.telemetry.generation_span(GENERATION_ID, model="m", provider="p"),
    ):
        raise asyncio.CancelledError

    (span,) = recorded.finished()
    assert span.status.status_code is StatusCode.UNSET
    assert attrs(span)["tokentape.generation.interrupted"] is True


def test_one_generation_two_readers_one_resume_and_a_takeover_in_one_trace(
    recorded: Recorded,
) -> None:
    """The issue's picture: a crash, a takeover, and every connection linked to its attempt."""
    telemetry = recorded.telemetry
    meta: dict[str, str] = {}  # stands in for the generation's metadata hash
    job = start_generation(recorded, {"traceparent": CALLER_TRACEPARENT})

    # Attempt 1 stores its span in meta, streams, and its worker dies mid-generation: a
    # crashed process never ends its span. It runs in a context of its own, as in its
    # own process, and is ended only after the assertions.
    worker_process = contextvars.Context()
    crashed = telemetry.generation_span(
        GENERATION_ID, model="m", provider="p", parent_traceparent=job.traceparent
    )
    first = worker_process.run(crashed.__enter__)
    assert first.traceparent is not None
    meta["traceparent"] = first.traceparent
    first_attempt_id = first.span.get_span_context().span_id
    with telemetry.reader_span(
        GENERATION_ID, position=0, resume=False, link_to=meta["traceparent"]
    ) as reader:
        reader.first_event(1)
        reader.sent(3, 120)
        reader.ended("client_gone")
    # Attempt 2 takes the lease over, links attempt 1, replaces the traceparent in meta.
    with telemetry.generation_span(
        GENERATION_ID,
        model="m",
        provider="p",
        attempt=2,
        takeover=True,
        parent_traceparent=job.traceparent,
        previous_attempt=meta["traceparent"],
    ) as second:
        assert second.traceparent is not None
        meta["traceparent"] = second.traceparent
        second.finish("stop")

    # The client reconnects with Last-Event-ID: 3.
    with telemetry.reader_span(
        GENERATION_ID,
        position=3,
        resume=True,
        link_to=meta["traceparent"].encode(),  # redis-py hands back bytes
    ) as reader:
        reader.first_event(4)
        reader.sent(5, 200)
        reader.ended("terminal")

    (request,) = recorded.finished("POST /v1/generations")
    (takeover,) = recorded.finished("chat m")
    first_read, resumed_read = recorded.finished("sse read")
    assert request.context is not None
    assert takeover.context is not None
    assert takeover.parent is not None
    assert takeover.parent.span_id == request.context.span_id
    assert attrs(takeover)["tokentape.generation.attempt"] == 2
    assert attrs(takeover)["tokentape.generation.takeover"] is True
    assert [link.context.span_id for link in takeover.links] == [first_attempt_id]

    assert [link.context.span_id for link in first_read.links] == [first_attempt_id]
    assert [link.context.span_id for link in resumed_read.links] == [takeover.context.span_id]
    for read in (first_read, resumed_read):
        assert read.links[0].context.trace_id == CALLER_TRACE_ID
        assert attrs(read)["tokentape.generation.id"] == GENERATION_ID
        assert read.status.status_code is StatusCode.UNSET
    assert attrs(first_read) == {
        "tokentape.generation.id": GENERATION_ID,
        "tokentape.read.position": 0,
        "tokentape.read.resume": False,
        "tokentape.read.first_seq": 1,
        "tokentape.read.end_reason": "client_gone",
        "tokentape.read.events_sent": 3,
        "tokentape.read.bytes_sent": 120,
    }
    assert attrs(resumed_read)["tokentape.read.resume"] is True
    assert attrs(resumed_read)["tokentape.read.first_seq"] == 4
    assert attrs(resumed_read)["tokentape.read.end_reason"] == "terminal"

    recorded.metrics.collect()
    assert recorded.counter("tokentape.lease_takeovers") == 1
    assert recorded.counter("tokentape.resumes") == 1
    worker_process.run(crashed.__exit__, None, None, None)


@pytest.mark.parametrize(
    "disconnect",
    [ConnectionResetError("Cannot write to closing transport"), asyncio.CancelledError()],
    ids=["write-fails", "handler-cancelled"],
)
def test_a_client_that_goes_away_is_client_gone_not_an_error(
    recorded: Recorded, disconnect: BaseException
) -> None:
    def handler() -> None:
        with recorded.telemetry.reader_span(
            GENERATION_ID, position=7, resume=True, link_to=None
        ) as reader:
            reader.sent(1, 30)
            raise disconnect

    with pytest.raises(type(disconnect)):
        handler()

    (span,) = recorded.finished()
    assert span.status.status_code is StatusCode.UNSET
    assert span.events == ()
    assert attrs(span)["tokentape.read.end_reason"] == "client_gone"


def test_reader_span_reports_gap_and_first_reason_wins(recorded: Recorded) -> None:
    with recorded.telemetry.reader_span(
        GENERATION_ID, position=2, resume=True, link_to="not a traceparent"
    ) as reader:
        reader.gap(requested=3, first_available=50)
        reader.first_event(50)
        reader.ended("slow_client")
        reader.ended("terminal")

    (span,) = recorded.finished()
    assert span.links == ()
    assert events(span) == ["gap", "first_event"]
    assert dict(span.events[0].attributes or {}) == {
        "tokentape.gap.requested": 3,
        "tokentape.gap.first_available": 50,
    }
    assert attrs(span)["tokentape.read.end_reason"] == "slow_client"


def test_reader_span_continues_the_clients_trace_when_it_sends_one(recorded: Recorded) -> None:
    with recorded.telemetry.reader_span(
        GENERATION_ID,
        position=0,
        resume=False,
        link_to=None,
        headers={"traceparent": CALLER_TRACEPARENT},
    ):
        pass

    (span,) = recorded.finished()
    assert span.parent is not None
    assert span.parent.span_id == CALLER_SPAN_ID


def test_stored_traceparent_helpers_round_trip_and_reject_garbage() -> None:
    context = context_from_traceparent(CALLER_TRACEPARENT.encode())
    span = trace.get_current_span(context)
    assert traceparent_of(span) == CALLER_TRACEPARENT
    link = link_from_traceparent(CALLER_TRACEPARENT)
    assert link is not None
    assert link.context.span_id == CALLER_SPAN_ID
    for bad in (None, "", b"", "00-zz-yy-01", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"):
        assert link_from_traceparent(bad) is None


def test_unconfigured_telemetry_records_no_spans_and_installs_no_provider() -> None:
    before = trace.get_tracer_provider()
    telemetry = Telemetry()
    try:
        assert not telemetry.tracing
        assert isinstance(telemetry.tracer, trace.NoOpTracer)
        with telemetry.generation_span(GENERATION_ID, model="m", provider="p") as generation:
            assert not generation.span.is_recording()
            generation.token()
            generation.finish("stop")
            assert generation.traceparent is None
        with telemetry.reader_span(GENERATION_ID, position=0, resume=False, link_to=None) as r:
            assert not r.span.is_recording()
        # The caller's context still reaches the job, so a worker that traces continues it.
        with telemetry.request_span({"traceparent": CALLER_TRACEPARENT}, GENERATION_ID) as tp:
            assert tp == CALLER_TRACEPARENT
        with telemetry.request_span({}, GENERATION_ID) as tp:
            assert tp is None
        assert trace.get_tracer_provider() is before
    finally:
        telemetry.shutdown()


@pytest.mark.parametrize(
    ("error", "status_code", "span_status"),
    [
        (InvalidRequest("invalid_model", "unknown model"), 400, StatusCode.UNSET),
        (Unavailable("redis_down", "Redis is not answering"), 503, StatusCode.ERROR),
    ],
    ids=["refused-4xx", "failed-5xx"],
)
def test_request_span_is_an_error_only_when_the_server_failed(
    recorded: Recorded, error: TokentapeError, status_code: int, span_status: StatusCode
) -> None:
    with (
        pytest.raises(type(error)),
        recorded.telemetry.request_span({}, GENERATION_ID),
    ):
        raise error

    (span,) = recorded.finished()
    assert attrs(span)["http.response.status_code"] == status_code
    assert span.status.status_code is span_status


def test_a_redis_connection_error_in_a_reader_is_an_error_not_client_gone(
    recorded: Recorded,
) -> None:
    with (
        pytest.raises(ConnectionRefusedError),
        recorded.telemetry.reader_span(GENERATION_ID, position=0, resume=False, link_to=None),
    ):
        raise ConnectionRefusedError("redis:6379")

    (span,) = recorded.finished()
    assert span.status.status_code is StatusCode.ERROR
    assert "tokentape.read.end_reason" not in attrs(span)
