"""Instrument values after known recordings, and `/metrics` as Prometheus text."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from app.telemetry import Telemetry
from app.telemetry.web import metrics_app
from tests.conftest import FakeClock
from tests.telemetry.conftest import GENERATION_ID, Recorded, samples_by_name

MODEL = {"gen_ai.provider.name": "sim", "gen_ai.request.model": "sim-1"}


def run_known_generation(recorded: Recorded) -> None:
    """Tokens at 0.5 s, then gaps of 0.02 and 0.04 s; a cancelled finish; two readers."""
    telemetry, clock = recorded.telemetry, recorded.clock
    with telemetry.generation_span(
        GENERATION_ID, model="sim-1", provider="sim", takeover=True
    ) as generation:
        clock.advance(0.5)
        generation.token()
        clock.advance(0.02)
        generation.token()
        clock.advance(0.04)
        generation.token()
        generation.finish("cancelled")
    telemetry.metrics.append_latency.record(0.002)
    telemetry.metrics.append_latency.record(0.004)
    with telemetry.reader_span(GENERATION_ID, position=0, resume=False, link_to=None) as reader:
        reader.sent(2, 100, appended_ms=int(time.time() * 1000))
        reader.sent(1, 50)
        reader.ended("slow_client")
        with telemetry.reader_span(GENERATION_ID, position=2, resume=True, link_to=None) as again:
            again.gap(requested=3, first_available=9)
            recorded.metrics.collect()  # while both are open
            assert recorded.counter("tokentape.active_streams") == 2
            again.ended("terminal")


def test_metric_values_after_a_known_run(recorded: Recorded) -> None:
    run_known_generation(recorded)
    recorded.metrics.collect()

    ttft = recorded.histogram("tokentape.time_to_first_token")
    assert ttft.count == 1
    assert ttft.sum == pytest.approx(0.5)
    assert dict(ttft.attributes or {}) == MODEL
    gaps = recorded.histogram("tokentape.inter_token_gap")
    assert gaps.count == 2
    assert gaps.sum == pytest.approx(0.06)
    assert gaps.min == pytest.approx(0.02)
    assert gaps.max == pytest.approx(0.04)
    appends = recorded.histogram("tokentape.append_latency")
    assert appends.count == 2
    assert appends.sum == pytest.approx(0.006)
    delivery = recorded.histogram("tokentape.delivery_latency")
    assert delivery.count == 1
    assert 0 <= delivery.sum < 60
    assert recorded.counter("tokentape.events_sent") == 3
    assert recorded.counter("tokentape.lease_takeovers") == 1
    assert recorded.counter("tokentape.cancellations") == 1
    assert recorded.counter("tokentape.resumes") == 1
    assert recorded.counter("tokentape.gaps") == 1
    assert recorded.counter("tokentape.slow_client_disconnects") == 1
    assert recorded.counter("tokentape.active_streams") == 0


def test_inter_token_gaps_can_be_sampled() -> None:
    clock = FakeClock()
    telemetry = Telemetry(gap_sample_every=3, clock=clock)
    with telemetry.generation_span(GENERATION_ID, model="m", provider="p") as generation:
        for _ in range(10):  # the first token, then 9 gaps: 3 recorded
            clock.advance(0.01)
            generation.token()
        assert generation.tokens == 10
    samples = samples_by_name(telemetry.render_prometheus())
    assert samples["tokentape_inter_token_gap_seconds_count"][0].value == 3
    telemetry.shutdown()


def test_render_prometheus_parses_and_names_every_instrument(recorded: Recorded) -> None:
    run_known_generation(recorded)

    text = recorded.telemetry.render_prometheus()
    families = {f.name: f.type for f in text_string_to_metric_families(text.decode())}
    samples = samples_by_name(text)

    assert families["tokentape_time_to_first_token_seconds"] == "histogram"
    assert families["tokentape_inter_token_gap_seconds"] == "histogram"
    assert families["tokentape_append_latency_seconds"] == "histogram"
    assert families["tokentape_delivery_latency_seconds"] == "histogram"
    assert families["tokentape_active_streams"] == "gauge"
    for counter in (
        "resumes",
        "gaps",
        "slow_client_disconnects",
        "lease_takeovers",
        "cancellations",
        "log_resets",
        "events_sent",
    ):
        assert families[f"tokentape_{counter}"] == "counter"
    (ttft_count,) = samples["tokentape_time_to_first_token_seconds_count"]
    assert ttft_count.value == 1
    assert ttft_count.labels["gen_ai_request_model"] == "sim-1"
    assert samples["tokentape_events_sent_total"][0].value == 3
    assert samples["tokentape_active_streams"][0].value == 0
    assert "process_cpu_seconds_total" in samples or "process_cpu_seconds" in families


def test_a_fresh_process_already_shows_its_counters_at_zero() -> None:
    telemetry = Telemetry()
    samples = samples_by_name(telemetry.render_prometheus())
    telemetry.shutdown()

    for counter in ("resumes", "gaps", "slow_client_disconnects", "events_sent"):
        assert samples[f"tokentape_{counter}_total"][0].value == 0
    assert samples["tokentape_active_streams"][0].value == 0


async def test_metrics_handler_serves_prometheus_text(
    recorded: Recorded, aiohttp_client: AiohttpClient
) -> None:
    run_known_generation(recorded)
    client = await aiohttp_client(metrics_app(recorded.telemetry))

    response = await client.get("/metrics")

    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = samples_by_name(await response.read())
    assert samples["tokentape_resumes_total"][0].value == 1
