"""The benchmark's coordinator: scenarios, client jobs, the workers' settings, the table.

Nothing here times anything: the scenarios' sizes, how their streams are split
between client processes, and that a run in a row checks every stream it makes.
"""

from __future__ import annotations

import dataclasses
import time

import aiohttp
import pytest

from scripts.bench import (
    COLUMNS,
    Figures,
    Scenario,
    client_jobs,
    parse_args,
    percentile,
    render_table,
    scenarios_from,
    worker_env,
)
from scripts.bench_client import ClientJob, ClientRun
from tests.scripts.conftest import Client, StartNaive


def scenario(key: str, *argv: str) -> Scenario:
    (found,) = scenarios_from(parse_args(["--scenarios", key, *argv]))
    return found


def test_first_tokens_are_one_stream_of_many_generations_in_a_row() -> None:
    first = scenario("f")
    assert (first.label, first.kind, first.in_a_row) == ("(f) first", "generate", True)
    assert (first.streams, first.reads, first.attempts) == (1, 100, 100)
    assert (first.tokens, first.rate) == (20, 200.0)


def test_scaling_leaves_at_least_20_first_generations_and_their_tokens() -> None:
    assert scenario("first", "--quick").reads == 20
    assert scenario("f", "--quick").tokens == 20
    assert scenario("f", "--scale", "2").reads == 200
    # Fewer than 20 asked for: what was asked.
    assert scenario("f", "--quick", "--first-generations", "5").reads == 5


def test_a_run_in_a_row_is_one_job_and_others_are_split_between_processes() -> None:
    template = ClientJob(kind="generate", base_url="http://127.0.0.1:1", streams=0, deadline=0.0)
    first = scenario("f", "--first-generations", "7")
    (only,) = client_jobs(first, dataclasses.replace(template, reads=first.reads), processes=4)
    assert (only.streams, only.reads) == (1, 7)
    live = scenario("a", "--live-generations", "10")
    jobs = client_jobs(live, template, processes=4)
    assert [(j.streams, j.seed, j.reads) for j in jobs] == [
        (3, 0, 1),
        (3, 3, 1),
        (2, 6, 1),
        (2, 8, 1),
    ]


def test_catch_up_reads_are_reads_in_a_row_of_each_reader() -> None:
    catchup = scenario("d", "--catchup-reads", "3")
    assert (catchup.streams, catchup.reads, catchup.in_a_row) == (1, 3, False)


def test_the_target_rows_are_expressed_by_flags() -> None:
    fanout = scenario("c", "--fanout-readers", "2000", "--fanout-rate", "100")
    assert (fanout.streams, fanout.rate, fanout.tokens) == (2000, 100.0, 1500)
    fast = scenario(
        "c", "--fanout-readers", "500", "--fanout-rate", "300", "--fanout-tokens", "4500"
    )
    assert (fast.streams, fast.rate, fast.tokens, fast.seconds) == (500, 300.0, 4500, 15.0)
    assert scenario("e", "--idle-connections", "5000").streams == 5000
    live = scenario("a", "--live-tokens", "60")
    assert (live.streams, live.tokens, live.rate) == (1000, 60, 20.0)


def test_workers_keep_tokentape_default_concurrency_unless_asked() -> None:
    env = {"TOKENTAPE_KEY_PREFIX": "ttbench-x"}
    assert worker_env(parse_args(["--scenarios", "a"]), env) == env
    asked = worker_env(parse_args(["--worker-concurrency", "2000"]), env)
    assert asked == {**env, "TOKENTAPE_WORKER_CONCURRENCY": "2000"}


def figures(implementation: str, drift: list[float]) -> Figures:
    none: dict[str, float | None] = {"p50": None, "p90": None, "p99": None}
    return Figures(
        scenario="(a) live", implementation=implementation, streams=2, complete=2,
        failures={}, events=10, events_per_second=None, ttft_p50=None, ttft_p99=None,
        created=none, connected=none, ttft=none,
        drift_p50=percentile(drift, 50), drift_p99=percentile(drift, 99),
        drift_max=max(drift, default=None), drift_samples=len(drift),
        rss_before=0, rss_peak=0, rss_per_connection=None, redis_connections_before=0,
        redis_connections_peak=0, reader_processes=1, wall_seconds=1.0, reader_cpu_seconds=0.0,
        workers_cpu_seconds=0.0, redis_cpu_seconds=0.0, busiest_client_cpu=0.0,
    )  # fmt: skip


def test_drift_max_is_a_column_after_drift_p99_with_its_advantage() -> None:
    titles = [column.title for column in COLUMNS]
    assert titles.index("drift max ms") == titles.index("drift p99 ms") + 1
    # The worst token, which no percentile of these 200 shows.
    naive = figures("naive", [0.001] * 199 + [0.4])
    tokentape = figures("tokentape", [0.002] * 199 + [0.05])
    assert (naive.drift_p99, naive.drift_max) == (0.001, 0.4)
    header, _separator, *rows = render_table([naive, tokentape]).splitlines()
    column = [cell.strip() for cell in header.split("|")].index("drift max ms")
    cells = [[cell.strip() for cell in row.split("|")][column] for row in rows]
    assert cells == ["400", "50", "8.0x"]


def test_no_live_token_no_drift_max() -> None:
    assert figures("tokentape", []).drift_max is None


@pytest.fixture
async def naive_inprocess(start_naive: StartNaive) -> Client:
    """The naive reader with its own producer: a generation streams with no worker."""
    return await start_naive("inprocess")


async def test_first_generations_in_a_row_are_each_created_read_and_checked(
    naive_inprocess: Client,
) -> None:
    first = scenario("f", "--first-generations", "3", "--first-tokens", "4", "--first-rate", "1000")
    template = ClientJob(
        kind=first.kind,
        base_url=str(naive_inprocess.make_url("")).rstrip("/"),
        streams=0,
        deadline=time.monotonic() + 60,
        tokens=first.tokens,
        rate=first.rate,
        reads=first.reads,
    )
    (job,) = client_jobs(first, template, processes=2)
    async with aiohttp.ClientSession() as session:
        run = ClientRun(job, session)
        await run.run()
    report = run.report
    assert (report.streams, report.complete, dict(report.failures)) == (3, 3, {})
    # Three generations, each started, 4 tokens, done: ids 1..6 checked on each.
    assert report.events == 3 * 6
    assert len(report.ttft) == len(report.created) == len(report.connected) == 3
