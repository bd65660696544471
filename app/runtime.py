"""What every long-running tokentape process shares: its event loop, its Redis clients,
its stop signal and its start-up line. `app.serve` and `app.work` run on it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

from app.settings import Settings

logger = logging.getLogger("tokentape")

T = TypeVar("T")

GC_YOUNG_THRESHOLD = 50_000


def loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop unless `event_loop` is "asyncio" or uvloop is not installed.

    Every event costs a reader a socket write and a worker a few task switches; on
    uvloop those run in C (docs/benchmarks.md: what the per-event budget buys).
    """
    if settings.event_loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_loop(settings: Settings, main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the loop `settings.event_loop` names."""
    # What is loaded by now (modules, classes, functions) lives as long as the process:
    # keep it out of the collector's full passes, each of which would walk all of it
    # and stall every stream of a busy reader or worker (docs/benchmarks.md).
    gc.freeze()
    # A burst of generations grows the heap fast, and with CPython's default thresholds
    # (700, 10, 10) a full pass follows every quarter of growth: a worker taking 1000 at
    # once paused 4-5 times, up to 89 ms, and every stream with it. Young collections
    # every 50,000 allocations, not 700, leave one such pass in that burst.
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
    with asyncio.Runner(loop_factory=loop_factory(settings)) as runner:
        return runner.run(main)


def connect(
    settings: Settings, role: str, max_connections: int | None = None
) -> Redis | RedisCluster:
    """A Redis client named `tokentape-<role>-<pid>`, as CLIENT LIST shows it; with
    `redis_cluster`, redis-py's cluster client, which learns the cluster from the node
    the URL names.

    With `max_connections`, callers wait for a free connection instead of opening
    more: a reader holds a fixed number whatever the number of open streams. On a
    cluster that number is per node.
    """
    assert settings.redis_url is not None
    # socket_timeout=None: redis-py's default 5 s socket timeout would cut blocking
    # reads (XREADGROUP BLOCK, pub/sub) short, and costs a timer per reply. The store
    # bounds each round trip itself (`redis_timeout_seconds`, app/store/transport.py).
    options: dict[str, Any] = {
        "socket_timeout": None,
        "socket_connect_timeout": settings.redis_timeout_seconds,
        "client_name": f"tokentape-{role}-{os.getpid()}",
    }
    if settings.redis_cluster:
        if max_connections is not None:
            options["max_connections"] = max_connections
        return RedisCluster.from_url(settings.redis_url, **options)
    if max_connections is None:
        return Redis.from_url(settings.redis_url, **options)
    pool = BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=max_connections, timeout=None, **options
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


async def reachable(redis: Redis | RedisCluster, settings: Settings) -> bool:
    """Redis answers PING; if not, say so in the log."""
    try:
        await redis.ping()
    except Exception as exc:
        logger.error("cannot reach Redis at %s: %s", _without_password(settings.redis_url), exc)
        return False
    return True


def _without_password(url: str | None) -> str | None:
    """`url` fit for a log line: its password, if any, replaced by `***`."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo = f"{parts.username or ''}:***"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc.rpartition('@')[2]}"))


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop` (from the first moment, startup included)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        yield
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def announce(line: str) -> None:
    """A line on stdout in one write: the readers of `serve --processes` share the
    supervisor's stdout, and print() writes a line's text and its newline apart when
    stdout is unbuffered (PYTHONUNBUFFERED), so two readers' lines could interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
