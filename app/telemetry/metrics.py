"""The instruments tokentape records, and their Prometheus text.

Instruments are OpenTelemetry instruments on one `MeterProvider`; a
`PrometheusMetricReader` feeds them into a private prometheus_client registry,
which `render_prometheus` renders for `GET /metrics`. Recording is one
`.record()`/`.add()` call on a prebuilt instrument, with prebuilt attributes.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Counter, Histogram, Meter, Observation
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

# What `generate_latest` writes by default. Not prometheus_client's CONTENT_TYPE_LATEST,
# which newer releases point at the 1.0.0 (UTF-8 names) format.
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. The SDK's default buckets (0..10000) assume milliseconds.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
# The limits `limit_refusals` counts, by the name of their setting.
LIMITS = ("max_streams", "max_running_per_key", "max_creations_per_minute")
_GAP_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    """Every tokentape instrument, created once per process (or per test)."""

    def __init__(self, meter: Meter) -> None:
        def histogram(name: str, description: str, buckets: Sequence[float]) -> Histogram:
            return meter.create_histogram(
                f"tokentape.{name}",
                unit="s",
                description=description,
                explicit_bucket_boundaries_advisory=buckets,
            )

        def counter(name: str, unit: str, description: str) -> Counter:
            return meter.create_counter(f"tokentape.{name}", unit=unit, description=description)

        # Worker side.
        self.time_to_first_token = histogram(
            "time_to_first_token",
            "From a worker taking a generation to its first token.",
            _TTFT_BUCKETS,
        )
        self.inter_token_gap = histogram(
            "inter_token_gap", "Time between consecutive tokens of a generation.", _GAP_BUCKETS
        )
        self.append_latency = histogram(
            "append_latency", "One append to the generation log, as the worker waited for it.",
            _LATENCY_BUCKETS,
        )  # fmt: skip
        self.lease_takeovers = counter(
            "lease_takeovers", "{takeover}", "Generations a worker took over from a lost lease."
        )
        self.cancellations = counter(
            "cancellations", "{generation}", "Generations that ended cancelled."
        )
        self.log_resets = counter(
            "log_resets",
            "{reset}",
            "Resets a worker recorded: Redis came back without events it had appended.",
        )
        self.worker_busy = counter(
            "worker_busy",
            "{pause}",
            "Times a worker stopped taking jobs because its event loop lagged (CPU saturated).",
        )

        # Reader side.
        self.delivery_latency = histogram(
            "delivery_latency", "From an event's append to its write on a client's socket.",
            _LATENCY_BUCKETS,
        )  # fmt: skip
        # Both added to by every stream or every write to a client: plain ints, read when
        # metrics are collected, instead of an instrument call each time.
        self.active_streams = 0
        meter.create_observable_up_down_counter(
            "tokentape.active_streams",
            callbacks=[lambda _: [Observation(self.active_streams)]],
            unit="{stream}",
            description="Open SSE connections.",
        )
        self.resumes = counter("resumes", "{connection}", "SSE connections that resumed.")
        self.gaps = counter("gaps", "{gap}", "Reads that asked for events retention removed.")
        self.slow_client_disconnects = counter(
            "slow_client_disconnects", "{connection}", "Connections closed for falling behind."
        )
        self.events_sent = 0
        meter.create_observable_counter(
            "tokentape.events_sent",
            callbacks=[lambda _: [Observation(self.events_sent)]],
            unit="{event}",
            description="Events written to SSE clients.",
        )
        self.limit_refusals = counter(
            "limit_refusals",
            "{request}",
            "Requests turned away by a limit (attribute `limit`: a setting's name).",
        )

        # A series exists only once something is recorded: start counters at 0 so a
        # fresh process's /metrics already has them (and rate() has a first point).
        for zero_first in (
            self.lease_takeovers,
            self.cancellations,
            self.log_resets,
            self.resumes,
            self.gaps,
            self.slow_client_disconnects,
        ):
            zero_first.add(0)
        for limit in LIMITS:
            self.limit_refusals.add(0, {"limit": limit})


class PrometheusText:
    """A private prometheus_client registry fed by OpenTelemetry, rendered on demand."""

    def __init__(self) -> None:
        # A registry of our own, not prometheus_client's global one: tests and embedded
        # servers can hold several of these in one process.
        self.registry = CollectorRegistry()
        self.reader = PrometheusMetricReader(registry=self.registry)
        ProcessCollector(registry=self.registry)

    def render(self) -> bytes:
        """The current values in the Prometheus text exposition format (version 0.0.4)."""
        return generate_latest(self.registry)
