"""Traces, metrics and logs for tokentape: see docs/observability.md."""

from app.telemetry.logs import configure_logging, generation_context, generation_logger
from app.telemetry.metrics import Metrics
from app.telemetry.setup import Telemetry
from app.telemetry.tracing import (
    EndReason,
    GenerationSpan,
    ReaderSpan,
    context_from_headers,
    context_from_traceparent,
    link_from_traceparent,
    traceparent_of,
)

__all__ = [
    "EndReason",
    "GenerationSpan",
    "Metrics",
    "ReaderSpan",
    "Telemetry",
    "configure_logging",
    "context_from_headers",
    "context_from_traceparent",
    "generation_context",
    "generation_logger",
    "link_from_traceparent",
    "traceparent_of",
]
