"""`Telemetry.from_env`: exporters chosen by OTEL_* variables, never a crash, flush on shutdown."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from app.telemetry import Telemetry
from app.telemetry.setup import _exporter_names, _metric_exporters, _span_exporters
from tests.telemetry.conftest import GENERATION_ID

OtelEnv = Callable[[dict[str, str]], None]


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> OtelEnv:
    """Replace every OTEL_* variable of the process with `values` for this test."""

    def set_env(values: dict[str, str]) -> None:
        for name in [name for name in os.environ if name.startswith("OTEL_")]:
            monkeypatch.delenv(name)
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


def service_name(telemetry: Telemetry) -> object:
    return telemetry.resource.attributes["service.name"]


def test_no_exporter_configured_means_no_tracing(otel_env: OtelEnv) -> None:
    otel_env({})
    telemetry = Telemetry.from_env("tokentape-reader")
    try:
        assert not telemetry.tracing
        assert service_name(telemetry) == "tokentape-reader"
    finally:
        telemetry.shutdown()


@pytest.mark.parametrize(
    ("environ", "traces", "metrics"),
    [
        ({}, [], []),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}, [], []),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"], []),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"], []),
        ({"OTEL_METRICS_EXPORTER": "otlp"}, [], ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"], ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"], []),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"},
            [],
            ["otlp"],
        ),
    ],
    ids=[
        "unset",
        "none",
        "console",
        "two",
        "metrics-otlp",
        "endpoint-implies-otlp",
        "traces-endpoint",
        "none-beats-endpoint",
    ],
)
def test_exporter_names_from_env(
    environ: dict[str, str], traces: list[str], metrics: list[str]
) -> None:
    assert _exporter_names(environ, "TRACES") == traces
    assert _exporter_names(environ, "METRICS") == metrics


def test_exporters_are_built_for_each_name(caplog: pytest.LogCaptureFixture) -> None:
    spans = _span_exporters(["otlp", "console", "zipkin"])
    metrics = _metric_exporters(["otlp", "console", "prometheus"])

    assert [type(e) for e in spans] == [OTLPSpanExporter, ConsoleSpanExporter]
    assert [type(e) for e in metrics] == [OTLPMetricExporter, ConsoleMetricExporter]
    assert "OTEL_TRACES_EXPORTER=zipkin is not supported" in caplog.text
    for span_exporter in spans:
        span_exporter.shutdown()
    for metric_exporter in metrics:
        metric_exporter.shutdown()


def test_otlp_without_its_package_warns_and_carries_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, otel_env: OtelEnv
) -> None:
    # A None entry in sys.modules makes `import` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.metric_exporter", None)
    caplog.set_level(logging.WARNING, "tokentape.telemetry")

    otel_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "otlp"})
    telemetry = Telemetry.from_env()
    try:
        assert not telemetry.tracing
        with telemetry.generation_span(GENERATION_ID, model="m", provider="p") as generation:
            generation.token()
        assert b"tokentape_time_to_first_token_seconds" in telemetry.render_prometheus()
    finally:
        telemetry.shutdown()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert all("pip install 'tokentape[otlp]'" in w for w in warnings)


def test_resource_comes_from_otel_service_name_and_resource_attributes(
    otel_env: OtelEnv,
) -> None:
    otel_env(
        {
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,team=ml%20infra",
            "OTEL_SERVICE_NAME": "tt-worker-eu",
        }
    )
    telemetry = Telemetry.from_env("tokentape-worker")
    try:
        attributes = telemetry.resource.attributes
        assert attributes["service.name"] == "tt-worker-eu"
        assert attributes["deployment.environment"] == "prod"
        assert attributes["team"] == "ml infra"
    finally:
        telemetry.shutdown()


def test_shutdown_flushes_batched_spans_and_can_be_called_twice() -> None:
    exporter = InMemorySpanExporter()
    # A long delay: only shutdown's flush can have exported the span.
    processor = BatchSpanProcessor(exporter, schedule_delay_millis=3_600_000)
    telemetry = Telemetry(span_processors=[processor])
    with telemetry.generation_span(GENERATION_ID, model="m", provider="p"):
        pass
    assert exporter.get_finished_spans() == ()

    telemetry.shutdown()
    telemetry.shutdown()

    assert [span.name for span in exporter.get_finished_spans()] == ["chat m"]


def test_otel_sdk_disabled_records_nothing_and_metrics_stays_scrapeable(
    otel_env: OtelEnv,
) -> None:
    otel_env({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"})
    telemetry = Telemetry.from_env()
    try:
        assert not telemetry.tracing
        with telemetry.reader_span(GENERATION_ID, position=0, resume=False, link_to=None):
            pass
        text = telemetry.render_prometheus()
        assert b"tokentape_" not in text  # the SDK's meters are no-ops too
        assert list(text_string_to_metric_families(text.decode()))
    finally:
        telemetry.shutdown()


class Collector(BaseHTTPRequestHandler):
    """A stand-in OTLP/http collector that remembers which paths it was sent."""

    received: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[str]:
    Collector.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_otlp_endpoint_gets_traces_and_metrics_on_shutdown(
    collector: str, otel_env: OtelEnv
) -> None:
    otel_env({"OTEL_EXPORTER_OTLP_ENDPOINT": collector})
    telemetry = Telemetry.from_env()
    with telemetry.generation_span(GENERATION_ID, model="m", provider="p") as generation:
        generation.token()
    assert telemetry.tracing

    telemetry.shutdown()

    assert sorted(set(Collector.received)) == ["/v1/metrics", "/v1/traces"]
