"""The benchmark's coordinator: the workers' settings, the table.

Nothing here times anything.
"""

from __future__ import annotations

from scripts.bench import COLUMNS, Figures, parse_args, percentile, render_table, worker_env


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


def test_workers_keep_tokentape_default_concurrency_unless_asked() -> None:
    env = {"TOKENTAPE_KEY_PREFIX": "ttbench-x"}
    assert worker_env(parse_args(["--scenarios", "a"]), env) == env
    asked = worker_env(parse_args(["--worker-concurrency", "2000"]), env)
    assert asked == {**env, "TOKENTAPE_WORKER_CONCURRENCY": "2000"}
