"""The `tokentape` command line (also `python -m app`).

Each subcommand is a `Command`: a name, a function that adds its arguments and a
function that runs it. To add one, append a `Command` to `COMMANDS`. The CLI only
parses arguments into a `Settings`; what runs lives with the code it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from aiohttp import web
from redis.asyncio import BlockingConnectionPool, Redis

from app import embedded
from app.errors import InvalidRequest, TokentapeError
from app.http import create_app
from app.http.listen import AcceptAllSite
from app.settings import Settings
from app.telemetry import Telemetry, configure_logging
from app.telemetry.web import metrics_app
from app.tools import commands as tools
from workers.runner import Worker

logger = logging.getLogger("tokentape")

# Open SSE streams are given this long to end on SIGTERM before their handlers are
# cancelled; a browser EventSource reconnects (to another instance) on its own.
SHUTDOWN_GRACE_SECONDS = 5.0
# A worker's command connections (its blocking reads have two more of their own).
WORKER_REDIS_CONNECTIONS = 16


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- seams to code that other modules own --------------------------------------


class WorkerRuntime(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


AppFactory = Callable[[Settings, Redis, Telemetry], web.Application]
# Called as factory(redis, settings, telemetry=...), like workers.runner.Worker.
WorkerFactory = Callable[..., WorkerRuntime]


def connect(settings: Settings, role: str = "worker", max_connections: int | None = None) -> Redis:
    """A Redis client named `tokentape-<role>-<pid>`, as CLIENT LIST shows it.

    With `max_connections`, callers wait for a free connection instead of opening
    more: a reader holds a fixed number whatever the number of open streams.
    """
    assert settings.redis_url is not None
    # socket_timeout=None: redis-py's default 5 s socket timeout would cut blocking
    # reads (XREADGROUP BLOCK, pub/sub) short.
    options: dict[str, Any] = {
        "socket_timeout": None,
        "socket_connect_timeout": 5,
        "client_name": f"tokentape-{role}-{os.getpid()}",
    }
    if max_connections is None:
        return Redis.from_url(settings.redis_url, **options)
    pool = BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=max_connections, timeout=None, **options
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


# -- serve ---------------------------------------------------------------------


def _add_redis_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="Redis URL, e.g. redis://127.0.0.1:6379/0 (default: $TOKENTAPE_REDIS_URL)",
    )


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    _add_redis_argument(parser)
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where the embedded Redis keeps its data (default: .tokentape; only without --redis)",
    )
    parser.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default: 8080; 0: any)")
    parser.add_argument(
        "--with-worker",
        action="store_true",
        help="also run a worker in this process (always on with the embedded Redis)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="run N reader processes on the same port (Linux SO_REUSEPORT; default 1)",
    )
    # Set by `--processes` on the readers it starts.
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)


def serve_settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        redis_url=args.redis, host=args.host, port=args.port, data_dir=args.data_dir
    )


def _run_serve(args: argparse.Namespace) -> int:
    settings = serve_settings(args)
    if args.processes < 1:
        raise InvalidRequest("invalid_processes", "--processes must be at least 1")
    if settings.redis_url is not None:
        return _serve_in_processes(settings, args, with_worker=args.with_worker, note="")
    data_dir = Path(settings.data_dir).resolve()
    # Started here, on the main thread, before the event loop (see embedded.die_with_parent).
    with embedded.embedded_redis(data_dir) as server:
        kept = (
            f"data in {data_dir}, kept across restarts; to start empty, stop and delete it"
            if server.persistent
            else "data in memory only, lost on exit: install redis-server to keep it"
        )
        # The in-process worker is the only one: on stop it interrupts its generations
        # at once (no grace to finish), and the next start continues them from the log.
        settings = settings.replace(redis_url=server.url, shutdown_grace_seconds=0.0)
        note = f"embedded Redis at {server.url} via {server.kind}; {kept}"
        return _serve_in_processes(settings, args, with_worker=True, note=note)


def _serve_in_processes(
    settings: Settings, args: argparse.Namespace, *, with_worker: bool, note: str
) -> int:
    if args.processes == 1:
        return run_loop(
            settings,
            serve(settings, with_worker=with_worker, note=note, reuse_port=args.reuse_port),
        )
    return run_loop(
        settings, serve_processes(settings, args.processes, with_worker=with_worker, note=note)
    )


T = TypeVar("T")


def loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop unless `event_loop` is "asyncio" or uvloop is not installed.

    Every event costs a reader a socket write and a worker a few task switches; on
    uvloop those run in C (about 10 % less CPU per event in scripts/bench.py (a)).
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
    # keep it out of the collector's full passes, each of which walked all of it, a
    # 25-70 ms stall of every stream on a busy reader or worker.
    gc.freeze()
    with asyncio.Runner(loop_factory=loop_factory(settings)) as runner:
        return runner.run(main)


async def serve_processes(
    settings: Settings,
    processes: int,
    *,
    with_worker: bool,
    note: str = "",
    stop: asyncio.Event | None = None,
) -> int:
    """Run `processes` reader processes on one port, and a worker here if asked.

    Readers share nothing but Redis, so they need no coordination: the kernel
    spreads new connections over them, and any reader can serve any generation.
    """
    stop = stop or asyncio.Event()
    port = settings.port or embedded.free_port(settings.host)
    assert settings.redis_url is not None
    command = [
        sys.executable, "-m", "app", "serve",
        "--redis", settings.redis_url,
        "--host", settings.host,
        "--port", str(port),
        "--reuse-port",
    ]  # fmt: skip
    with _stop_on_signals(stop):
        # A reader outlives nothing: if this supervisor is killed (even by SIGKILL, the
        # OOM killer), its readers get SIGTERM and drain, instead of serving on as orphans.
        readers = [
            await asyncio.create_subprocess_exec(*command, preexec_fn=embedded.die_with_parent)
            for _ in range(processes)
        ]
        announce(
            f"tokentape serving on http://{_url_host(settings.host)}:{port}"
            f" with {processes} reader processes" + (f" ({note})" if note else "")
        )
        telemetry = Telemetry.from_env("tokentape-worker")
        factory = Worker if with_worker else None
        try:
            async with _worker(settings, factory, stop, telemetry) as worker:
                exits = [asyncio.create_task(reader.wait()) for reader in readers]
                stopping = asyncio.create_task(stop.wait())
                # A reader that dies stops the whole service: a silent half-service is worse.
                await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
                stop.set()
                for reader in readers:
                    if reader.returncode is None:
                        reader.terminate()
                codes = await asyncio.gather(*exits)
                stopping.cancel()
        finally:
            telemetry.shutdown()  # flushes the exporters
    failed = worker.failed or any(code not in (0, -signal.SIGTERM) for code in codes)
    return 1 if failed else 0


async def serve(
    settings: Settings,
    *,
    with_worker: bool,
    note: str = "",
    stop: asyncio.Event | None = None,
    app_factory: AppFactory | None = None,
    worker_factory: WorkerFactory | None = None,
    reuse_port: bool = False,
) -> int:
    """Run the HTTP service (and optionally a worker) until SIGTERM/SIGINT or `stop`."""
    stop = stop or asyncio.Event()
    with _stop_on_signals(stop):
        return await _serve(
            settings, with_worker, note, stop, app_factory, worker_factory, reuse_port
        )


async def _serve(
    settings: Settings,
    with_worker: bool,
    note: str,
    stop: asyncio.Event,
    app_factory: AppFactory | None,
    worker_factory: WorkerFactory | None,
    reuse_port: bool,
) -> int:
    app_factory = app_factory or create_app
    if with_worker:
        worker_factory = worker_factory or Worker
    # One of the reader's connections is the hub's pub/sub one, which it opens itself.
    redis = connect(settings, "reader", max(1, settings.reader_redis_connections - 1))
    telemetry = Telemetry.from_env("tokentape-reader")
    try:
        if not await _reachable(redis, settings):
            return 1
        runner = web.AppRunner(
            app_factory(settings, redis, telemetry),
            # A client disconnect cancels its SSE handler at once, releasing what it held.
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
        )
        await runner.setup()
        try:
            # reuse_port: `--processes N` runs N readers on one port (the kernel spreads
            # connections over them).
            site = AcceptAllSite(runner, settings.host, settings.port, reuse_port=reuse_port)
            await site.start()
            host, port = site.addresses[0][:2]
            announce(
                f"tokentape serving on http://{_url_host(host)}:{port}"
                + (f" ({note})" if note else "")
            )
            factory = worker_factory if with_worker else None
            async with _worker(settings, factory, stop, telemetry) as worker:
                await stop.wait()
                logger.info("stopping: no new connections; open streams end")
        finally:
            await runner.cleanup()
    finally:
        await redis.aclose()
        telemetry.shutdown()  # flushes the exporters
    return 1 if worker.failed else 0


def announce(line: str) -> None:
    """A line on stdout in one write: the readers of `serve --processes` share the
    supervisor's stdout, and print() writes a line's text and its newline apart when
    stdout is unbuffered (PYTHONUNBUFFERED), so two readers' lines could interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- worker --------------------------------------------------------------------


def _add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    _add_redis_argument(parser)
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="serve Prometheus metrics at http://127.0.0.1:P/metrics (default: none)",
    )


def worker_settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(redis_url=args.redis)


def _run_worker(args: argparse.Namespace) -> int:
    settings = worker_settings(args)
    if settings.redis_url is None:
        print(
            "tokentape worker: needs a Redis: pass --redis URL or set TOKENTAPE_REDIS_URL",
            file=sys.stderr,
        )
        return 2
    return run_loop(settings, work(settings, metrics_port=getattr(args, "metrics_port", None)))


async def work(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    worker_factory: WorkerFactory | None = None,
    metrics_port: int | None = None,
) -> int:
    """Run a worker until SIGTERM/SIGINT or `stop`."""
    stop = stop or asyncio.Event()
    worker_factory = worker_factory or Worker
    with _stop_on_signals(stop):
        redis = connect(settings)
        try:
            if not await _reachable(redis, settings):
                return 1
        finally:
            await redis.aclose()
        telemetry = Telemetry.from_env("tokentape-worker")
        metrics = None
        if metrics_port is not None:
            metrics = web.AppRunner(metrics_app(telemetry))
            await metrics.setup()
            await web.TCPSite(metrics, "127.0.0.1", metrics_port).start()
        announce(f"tokentape worker consuming from {settings.redis_url}")
        try:
            async with _worker(settings, worker_factory, stop, telemetry) as worker:
                await stop.wait()
        finally:
            if metrics is not None:
                await metrics.cleanup()
            telemetry.shutdown()  # flushes the exporters
    return 1 if worker.failed else 0


@dataclasses.dataclass
class _WorkerOutcome:
    failed: bool = False


@contextlib.asynccontextmanager
async def _worker(
    settings: Settings, factory: WorkerFactory | None, stop: asyncio.Event, telemetry: Telemetry
) -> AsyncIterator[_WorkerOutcome]:
    """Run a worker (on a Redis client of its own) beside the body; on exit stop it."""
    outcome = _WorkerOutcome()
    if factory is None:
        yield outcome
        return
    redis = connect(settings, "worker", WORKER_REDIS_CONNECTIONS)
    worker = factory(redis, settings, telemetry=telemetry)
    task = asyncio.create_task(worker.run(stop), name="tokentape-worker")
    # A worker that dies on its own stops the process: a silent half-service is worse.
    task.add_done_callback(lambda _: stop.set())
    try:
        yield outcome
    finally:
        stop.set()
        # The worker finishes or hands off its generations; past that it is cancelled and
        # another worker takes them over when their leases expire.
        deadline = settings.shutdown_grace_seconds + settings.lease_seconds
        try:
            await asyncio.wait_for(task, timeout=deadline)
        except TimeoutError:
            logger.warning("worker did not stop within %.0f s; cancelled", deadline)
        except Exception:
            outcome.failed = True
            logger.exception("worker failed")
        finally:
            await redis.aclose()


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop` (from the first moment, startup included)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        yield
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _reachable(redis: Redis, settings: Settings) -> bool:
    try:
        await redis.ping()
    except Exception as exc:
        logger.error("cannot reach Redis at %s: %s", settings.redis_url, exc)
        return False
    return True


# -- entry point ---------------------------------------------------------------

COMMANDS: list[Command] = [
    Command(
        "serve",
        "run the HTTP service (with no Redis configured: an embedded one and a worker)",
        _add_serve_arguments,
        _run_serve,
    ),
    Command(
        "worker",
        "consume generation jobs and run the models",
        _add_worker_arguments,
        _run_worker,
    ),
]


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokentape",
        description="LLM generations as durable event logs on Redis, served as resumable SSE.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    tools.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # JSON lines when stderr is not a terminal, with generation, trace and span ids.
    configure_logging(os.environ.get("TOKENTAPE_LOG_LEVEL", "INFO"))
    run = cast(Callable[[argparse.Namespace], int], args.run)
    try:
        return run(args)
    except (TokentapeError, embedded.EmbeddedUnavailable) as exc:
        print(f"tokentape {args.command}: {exc}", file=sys.stderr)
        return 2
