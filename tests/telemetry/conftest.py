"""A `Telemetry` with in-memory exporters and a hand-driven clock, one per test."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from app.telemetry import Telemetry
from tests.conftest import FakeClock

GENERATION_ID = "gen_0123456789abcdef"


def metric_points(reader: InMemoryMetricReader, metric: str) -> list[Any]:
    """The data points of one metric (OTel name) that `reader` collects now."""
    data = reader.get_metrics_data()
    if data is None:
        return []
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for m in scope.metrics
        if m.name == metric
        for point in m.data.data_points
    ]


@dataclasses.dataclass
class Recorded:
    telemetry: Telemetry
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    clock: FakeClock

    def finished(self, name: str | None = None) -> list[ReadableSpan]:
        return [
            span for span in self.spans.get_finished_spans() if name is None or span.name == name
        ]

    def points(self, metric: str) -> list[Any]:
        """The data points of one metric (OTel name), in the last collection."""
        return metric_points(self.metrics, metric)

    def counter(self, metric: str) -> float:
        points = self.points(metric)
        assert all(isinstance(p, NumberDataPoint) for p in points)
        return float(sum(p.value for p in points))

    def histogram(self, metric: str) -> HistogramDataPoint:
        (point,) = self.points(metric)
        assert isinstance(point, HistogramDataPoint)
        return point


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    spans = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    clock = FakeClock()
    telemetry = Telemetry(
        span_processors=[SimpleSpanProcessor(spans)], metric_readers=[reader], clock=clock
    )
    yield Recorded(telemetry, spans, reader, clock)
    telemetry.shutdown()


def samples_by_name(text: bytes) -> dict[str, list[Sample]]:
    """Parse strictly: prometheus_client's parser raises on anything malformed."""
    by_name: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            by_name.setdefault(sample.name, []).append(sample)
    return by_name
