"""Spans for the three places a generation is handled, and W3C trace context in between.

request (POST /v1/generations) --traceparent in the Job--> worker: one span per
generation attempt --traceparent in keys.meta(id)--> reader: one span per SSE
connection, linked to the generation span.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import Token
from types import TracebackType
from typing import Literal

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from app.clock import MONOTONIC, Clock
from app.errors import TokentapeError
from app.events import Usage
from app.telemetry.logs import generation_context
from app.telemetry.metrics import Metrics

GENERATION_ID = "tokentape.generation.id"
ATTEMPT = "tokentape.generation.attempt"
TAKEOVER = "tokentape.generation.takeover"
TOKENS = "tokentape.generation.tokens"
TOOL_CALLS = "tokentape.generation.tool_calls"
INTERRUPTED = "tokentape.generation.interrupted"
READ_POSITION = "tokentape.read.position"
READ_RESUME = "tokentape.read.resume"
READ_FIRST_SEQ = "tokentape.read.first_seq"
READ_EVENTS_SENT = "tokentape.read.events_sent"
READ_BYTES_SENT = "tokentape.read.bytes_sent"
READ_END_REASON = "tokentape.read.end_reason"
GAP_REQUESTED = "tokentape.gap.requested"
GAP_FIRST_AVAILABLE = "tokentape.gap.first_available"

# OpenTelemetry GenAI semantic conventions (still "development": literal names,
# not the semconv package's `_incubating` module, which may move).
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_SYSTEM = "gen_ai.system"  # the older name of gen_ai.provider.name; backends still read it
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"
ERROR_TYPE = "error.type"

EndReason = Literal["terminal", "client_gone", "server_drain", "slow_client"]

# How aiohttp tells a handler its client left: the write fails, or the handler task is
# cancelled. Not builtin ConnectionError as a whole: a refused Redis connection is ours.
_CLIENT_GONE = (ConnectionResetError, BrokenPipeError, asyncio.CancelledError)

_propagator = TraceContextTextMapPropagator()


def context_from_headers(headers: Mapping[str, str]) -> Context:
    """The caller's trace context from HTTP headers (`traceparent`, `tracestate`)."""
    return _propagator.extract(headers)


def context_from_traceparent(traceparent: str | bytes | None) -> Context:
    """A context whose current span is the remote span a stored traceparent names."""
    if not traceparent:
        return Context()
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("ascii", "replace")
    return _propagator.extract({"traceparent": traceparent})


def traceparent_of(span: Span | None = None) -> str | None:
    """`span` (default: the current span) as a W3C traceparent; None if it has no valid context."""
    carrier: dict[str, str] = {}
    span_context = trace.set_span_in_context(span) if span is not None else None
    _propagator.inject(carrier, context=span_context)
    return carrier.get("traceparent")


def link_from_traceparent(traceparent: str | bytes | None) -> Link | None:
    """A span link to the span a stored traceparent names; None if there is none or it is bad."""
    span_context = trace.get_current_span(context_from_traceparent(traceparent)).get_span_context()
    return Link(span_context) if span_context.is_valid else None


class GenerationSpan:
    """What a worker reports about one generation attempt while it runs."""

    def __init__(
        self,
        span: Span,
        metrics: Metrics,
        metric_attributes: Attributes,
        gap_sample_every: int,
        now: Callable[[], float],
    ) -> None:
        self.span = span
        self._metrics = metrics
        self._metric_attributes = metric_attributes
        self._gap_sample_every = gap_sample_every
        self._now = now
        self._started = now()
        self._last_token: float | None = None
        self._gaps_seen = 0
        self.tokens = 0
        self.tool_calls = 0

    @property
    def traceparent(self) -> str | None:
        """This span as a traceparent: the log stores it in the generation's metadata."""
        return traceparent_of(self.span)

    def first_token(self) -> None:
        """Mark the first token (time to first token). Later calls do nothing; `token` calls it."""
        if self._last_token is not None:
            return
        now = self._last_token = self._now()
        ttft = now - self._started
        self._metrics.time_to_first_token.record(ttft, self._metric_attributes)
        self.span.set_attribute(GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, ttft)
        self.span.add_event("first_token")

    def token(self, count: int = 1) -> None:
        """Per token event appended: counts tokens and measures the gap since the previous one."""
        if self._last_token is None:
            self.first_token()
        else:
            now = self._now()
            self._gaps_seen += 1
            # Per token, so no attributes (they double what a record costs) and
            # optionally only every Nth gap.
            if self._gaps_seen % self._gap_sample_every == 0:
                self._metrics.inter_token_gap.record(now - self._last_token)
            self._last_token = now
        self.tokens += count

    def tool_call(self, name: str) -> None:
        """A complete tool call was appended."""
        self.tool_calls += 1
        self.span.add_event("tool_call", {GEN_AI_TOOL_NAME: name})

    def finish(
        self,
        reason: str,
        usage: Usage | None = None,
        *,
        tokens: int | None = None,
        tool_calls: int | None = None,
    ) -> None:
        """The generation ended with `done`; `tokens`/`tool_calls` default to what was counted."""
        self.span.set_attribute(GEN_AI_RESPONSE_FINISH_REASONS, (reason,))
        self.span.set_attribute(TOKENS, self.tokens if tokens is None else tokens)
        self.span.set_attribute(TOOL_CALLS, self.tool_calls if tool_calls is None else tool_calls)
        if usage is not None:
            if usage.prompt_tokens is not None:
                self.span.set_attribute(GEN_AI_USAGE_INPUT_TOKENS, usage.prompt_tokens)
            if usage.completion_tokens is not None:
                self.span.set_attribute(GEN_AI_USAGE_OUTPUT_TOKENS, usage.completion_tokens)
        if reason == "cancelled":
            self._metrics.cancellations.add(1)

    def error(self, code: str, message: str = "") -> None:
        """The generation ended with an `error` event."""
        self.span.set_attribute(ERROR_TYPE, code)
        self.span.set_attribute(TOKENS, self.tokens)
        self.span.set_attribute(TOOL_CALLS, self.tool_calls)
        self.span.set_status(Status(StatusCode.ERROR, f"{code}: {message}" if message else code))


# Per-write bookkeeping is on the fan-out hot path (one write per client per event):
# delivery latency is sampled.
DELIVERY_SAMPLE_EVERY = 16


class ReaderSpan:
    """What an SSE handler reports about one connection, and the block of its span.

    A context manager of its own, not a @contextmanager generator: a reader holds one
    per open stream, and a suspended generator and its manager cost ~0.3 KiB more.
    """

    __slots__ = (
        "_generation_id",
        "_log_context",
        "_metrics",
        "_otel_token",
        "_position",
        "_writes",
        "bytes_sent",
        "end_reason",
        "events_sent",
        "first_seq",
        "span",
    )

    def __init__(self, span: Span, metrics: Metrics, generation_id: str, position: int) -> None:
        self.span = span
        self._metrics = metrics
        self._generation_id = generation_id
        self._position = position
        self.first_seq: int | None = None
        self.events_sent = 0
        self.bytes_sent = 0
        self.end_reason: EndReason | None = None
        self._writes = 0
        self._log_context = generation_context(generation_id)
        self._otel_token: Token[Context] | None = None

    def __enter__(self) -> ReaderSpan:
        self._metrics.active_streams += 1
        self._otel_token = otel_context.attach(trace.set_span_in_context(self.span))
        self._log_context.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._log_context.__exit__()
        try:
            if isinstance(exc, _CLIENT_GONE):
                # A client that goes away is `client_gone`, never an error span.
                self.ended("client_gone")
            elif isinstance(exc, Exception):
                _failed(self.span, exc)
        finally:
            self._close()
            self._metrics.active_streams -= 1
            if self._otel_token is not None:
                otel_context.detach(self._otel_token)
            self.span.end()

    def sent(self, events: int, nbytes: int, appended_ms: int | None = None) -> None:
        """One write to the client: `appended_ms` of its last event measures delivery latency.

        The latency of the first write and of every 16th after it is recorded.
        """
        self.events_sent += events
        self.bytes_sent += nbytes
        self._metrics.events_sent += events
        if appended_ms is not None and self._writes % DELIVERY_SAMPLE_EVERY == 0:
            # Redis's clock against ours: clamp the skew rather than record a negative time.
            latency = max(0.0, time.time() - appended_ms / 1000)
            self._metrics.delivery_latency.record(latency)
        self._writes += 1

    def first_event(self, seq: int) -> None:
        """The seq of the first event sent on this connection."""
        if self.first_seq is None:
            self.first_seq = seq
            self.span.set_attribute(READ_FIRST_SEQ, seq)
            self.span.add_event("first_event", {READ_FIRST_SEQ: seq})

    def gap(self, requested: int, first_available: int) -> None:
        """The client asked for events that retention removed."""
        self._metrics.gaps.add(1)
        self.span.add_event("gap", {GAP_REQUESTED: requested, GAP_FIRST_AVAILABLE: first_available})

    def ended(self, reason: EndReason) -> None:
        """How the connection ended; the first reason given wins."""
        if self.end_reason is not None:
            return
        self.end_reason = reason
        self.span.set_attribute(READ_END_REASON, reason)
        if reason == "slow_client":
            self._metrics.slow_client_disconnects.add(1)

    def log_fields(self) -> dict[str, object]:
        """What the stream's access line says of it: the generation and the span (the
        line is written once the span has ended), where it started, what it sent, and
        how it ended."""
        fields: dict[str, object] = {"generation_id": self._generation_id}
        context = self.span.get_span_context()
        if context.is_valid:
            fields["trace_id"] = trace.format_trace_id(context.trace_id)
            fields["span_id"] = trace.format_span_id(context.span_id)
        fields.update(
            end_reason=self.end_reason,
            position=self._position,
            first_seq=self.first_seq,
            events_sent=self.events_sent,
        )
        return fields

    def _close(self) -> None:
        self.span.set_attribute(READ_EVENTS_SENT, self.events_sent)
        self.span.set_attribute(READ_BYTES_SENT, self.bytes_sent)


class Spans:
    """Span factories over one tracer and one set of instruments."""

    def __init__(
        self,
        tracer: Tracer,
        metrics: Metrics,
        *,
        gap_sample_every: int = 1,
        clock: Clock = MONOTONIC,
    ) -> None:
        self.tracer = tracer
        self.metrics = metrics
        self.gap_sample_every = max(1, gap_sample_every)
        self.clock = clock

    @contextmanager
    def request_span(self, headers: Mapping[str, str], generation_id: str) -> Iterator[str | None]:
        """Span for POST /v1/generations, continuing the caller's trace.

        Yields the traceparent to store in the job (`Job.traceparent`); without
        tracing, that is the caller's own traceparent (or None), passed through.
        """
        span = self.tracer.start_span(
            "POST /v1/generations",
            context=context_from_headers(headers),
            kind=SpanKind.SERVER,
            attributes={
                GENERATION_ID: generation_id,
                "http.request.method": "POST",
                "http.route": "/v1/generations",
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield traceparent_of(span)
        except TokentapeError as exc:
            span.set_attribute("http.response.status_code", exc.status)
            if exc.status >= 500:
                _failed(span, exc)
            else:
                # A refused request is the caller's error, not ours (HTTP semconv).
                span.set_attribute(ERROR_TYPE, exc.code)
            raise
        except Exception as exc:
            _failed(span, exc)
            raise
        finally:
            otel_context.detach(token)
            span.end()

    @contextmanager
    def generation_span(
        self,
        generation_id: str,
        *,
        model: str,
        provider: str,
        attempt: int = 1,
        takeover: bool = False,
        parent_traceparent: str | bytes | None = None,
        previous_attempt: str | bytes | None = None,
    ) -> Iterator[GenerationSpan]:
        """Span for one worker attempt at a generation, a child of the request's span.

        `parent_traceparent` is `Job.traceparent`; `previous_attempt` is the
        traceparent a crashed worker left in the meta hash, linked on a takeover.
        """
        link = link_from_traceparent(previous_attempt)
        span = self.tracer.start_span(
            f"chat {model}",
            context=context_from_traceparent(parent_traceparent),
            kind=SpanKind.CLIENT,
            attributes={
                GENERATION_ID: generation_id,
                GEN_AI_OPERATION_NAME: "chat",
                GEN_AI_REQUEST_MODEL: model,
                GEN_AI_PROVIDER_NAME: provider,
                GEN_AI_SYSTEM: provider,
                ATTEMPT: attempt,
                TAKEOVER: takeover,
            },
            links=[link] if link else None,
        )
        if takeover:
            self.metrics.lease_takeovers.add(1)
        generation = GenerationSpan(
            span,
            self.metrics,
            {GEN_AI_PROVIDER_NAME: provider, GEN_AI_REQUEST_MODEL: model},
            self.gap_sample_every,
            self.clock.now,
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            with generation_context(generation_id):
                yield generation
        except asyncio.CancelledError:
            # The worker is stopping (drain, lease lost): another attempt continues it.
            span.set_attribute(INTERRUPTED, True)
            raise
        except Exception as exc:
            _failed(span, exc)
            raise
        finally:
            otel_context.detach(token)
            span.end()

    def reader_span(
        self,
        generation_id: str,
        *,
        position: int,
        resume: bool,
        link_to: str | bytes | None,
        headers: Mapping[str, str] | None = None,
    ) -> ReaderSpan:
        """Span for one SSE connection, linked to the generation span `link_to` names.

        Use as `with spans.reader_span(...) as reader:`. `link_to` is the metadata's
        `traceparent`; `headers` continue the client's trace if it sent one. A
        client that goes away is `client_gone`, never an error span.
        """
        link = link_from_traceparent(link_to)
        span = self.tracer.start_span(
            "sse read",
            context=context_from_headers(headers) if headers is not None else None,
            kind=SpanKind.SERVER,
            attributes={GENERATION_ID: generation_id, READ_POSITION: position, READ_RESUME: resume},
            links=[link] if link else None,
        )
        if resume:
            self.metrics.resumes.add(1)
        return ReaderSpan(span, self.metrics, generation_id, position)


def _failed(span: Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_attribute(ERROR_TYPE, type(exc).__qualname__)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
