"""One `Telemetry` per process: tracer, instruments and exporters, configured from `OTEL_*`.

The app and the worker receive a `Telemetry` rather than reaching for
OpenTelemetry's global providers, which can be set only once per process; tests
build theirs with in-memory exporters (`Telemetry(span_processors=…)`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from urllib.parse import unquote

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from app.clock import MONOTONIC, Clock
from app.telemetry.metrics import Metrics, PrometheusText
from app.telemetry.tracing import Spans

log = logging.getLogger("tokentape.telemetry")

_INSTRUMENTATION_SCOPE = "tokentape"
# What `from_env` processes record of the inter-token gaps and of each appender's
# append latencies: one in this many. A record costs a few µs, as much as the rest
# of a token's path through the worker: recording every gap and every append would
# add a noticeable share to a worker's CPU per token.
GAP_SAMPLE_EVERY = 10
_OTLP_PACKAGE = "opentelemetry-exporter-otlp-proto-http"


class Telemetry(Spans):
    """Tracer, instruments, Prometheus text and the providers to flush on shutdown.

    With no trace exporter the tracer is OpenTelemetry's no-op tracer: spans
    cost a function call and record nothing. Metrics are always recorded, for
    `GET /metrics`.
    """

    def __init__(
        self,
        *,
        resource: Resource | None = None,
        span_processors: Sequence[SpanProcessor] = (),
        metric_readers: Sequence[MetricReader] = (),
        gap_sample_every: int = 1,
        clock: Clock = MONOTONIC,
    ) -> None:
        self.resource = resource or Resource.create({SERVICE_NAME: "tokentape"})
        self.tracer_provider: TracerProvider | None = None
        tracer: trace.Tracer = trace.NoOpTracer()
        if span_processors:
            self.tracer_provider = TracerProvider(resource=self.resource)
            for processor in span_processors:
                self.tracer_provider.add_span_processor(processor)
            tracer = self.tracer_provider.get_tracer(_INSTRUMENTATION_SCOPE)
        self.prometheus = PrometheusText()
        self.meter_provider = MeterProvider(
            resource=self.resource, metric_readers=[self.prometheus.reader, *metric_readers]
        )
        super().__init__(
            tracer,
            Metrics(self.meter_provider.get_meter(_INSTRUMENTATION_SCOPE)),
            gap_sample_every=gap_sample_every,
            clock=clock,
        )
        self._shut_down = False

    @classmethod
    def from_env(
        cls, service_name: str = "tokentape", *, gap_sample_every: int = GAP_SAMPLE_EVERY
    ) -> Telemetry:
        """Exporters from `OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER` (otlp, console, none).

        Unset means none, unless an `OTEL_EXPORTER_OTLP_*ENDPOINT` is set, which
        means otlp. `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` name the
        resource; `service_name` is the default. `OTEL_SDK_DISABLED=true` turns
        the SDK off: no exporter, and /metrics has only the process metrics.
        `gap_sample_every=N` records one inter-token gap in N and one append latency
        in N; token counts and every other instrument are not sampled.
        """
        # os.environ, not a mapping passed in: the OTLP exporters read their endpoint,
        # headers and timeouts from it themselves.
        environ = os.environ
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls(resource=_resource(service_name, environ), gap_sample_every=gap_sample_every)
        span_exporters = _span_exporters(_exporter_names(environ, "TRACES"))
        metric_exporters = _metric_exporters(_exporter_names(environ, "METRICS"))
        return cls(
            resource=_resource(service_name, environ),
            span_processors=[BatchSpanProcessor(exporter) for exporter in span_exporters],
            metric_readers=[PeriodicExportingMetricReader(exp) for exp in metric_exporters],
            gap_sample_every=gap_sample_every,
        )

    @property
    def tracing(self) -> bool:
        """True when spans are recorded and exported."""
        return self.tracer_provider is not None

    def render_prometheus(self) -> bytes:
        """Every instrument's current value as Prometheus text, for `GET /metrics`."""
        return self.prometheus.render()

    def shutdown(self) -> None:
        """Flush and stop every exporter (on SIGTERM). Safe to call twice."""
        if self._shut_down:
            return
        self._shut_down = True
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def _exporter_names(environ: Mapping[str, str], signal: str) -> list[str]:
    raw = environ.get(f"OTEL_{signal}_EXPORTER", "").strip()
    if not raw:
        # The SDK's own default is otlp, which would send to localhost:4318 from every
        # `tokentape serve`; here an unconfigured process exports nothing.
        endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
            f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    if "otlp" in names:
        protocol = environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
        if protocol != "http/protobuf":
            log.warning(
                "OTLP protocol %r is not supported: exporting %s over http/protobuf",
                protocol,
                signal.lower(),
            )
    return [name for name in names if name != "none"]


def _span_exporters(names: Sequence[str]) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                _warn_otlp_missing("OTEL_TRACES_EXPORTER", "traces")
                continue
            exporters.append(OTLPSpanExporter())
        else:
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console, none)", name)
    return exporters


def _metric_exporters(names: Sequence[str]) -> list[MetricExporter]:
    exporters: list[MetricExporter] = []
    for name in names:
        if name == "console":
            exporters.append(ConsoleMetricExporter())
        elif name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                    OTLPMetricExporter,
                )
            except ImportError:
                _warn_otlp_missing("OTEL_METRICS_EXPORTER", "metrics")
                continue
            exporters.append(OTLPMetricExporter())
        elif name == "prometheus":
            pass  # always on: GET /metrics
        else:
            log.warning(
                "OTEL_METRICS_EXPORTER=%s is not supported (otlp, console, prometheus, none)", name
            )
    return exporters


def _warn_otlp_missing(variable: str, signal: str) -> None:
    log.warning(
        "%s asks for otlp but %s is not installed (pip install 'tokentape[otlp]'): "
        "%s are not exported",
        variable,
        _OTLP_PACKAGE,
        signal,
    )


def _resource(service_name: str, environ: Mapping[str, str]) -> Resource:
    attributes: dict[str, str] = {}
    for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = unquote(value.strip())
    attributes[SERVICE_NAME] = (
        environ.get("OTEL_SERVICE_NAME") or attributes.get(SERVICE_NAME) or service_name
    )
    return Resource.create(attributes)
