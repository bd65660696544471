"""`tokentape serve`: the HTTP reader, in one process or N on one port, with the embedded
Redis and a worker in-process when no Redis is configured."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app import embedded, work
from app.access import Access
from app.errors import ConfigError
from app.http import create_app
from app.http.health import READINESS
from app.http.listen import AcceptAllSite
from app.http.server import ServiceRunner
from app.http.state import ACCESS
from app.runtime import announce, connect, reachable, run_loop, stop_on_signals
from app.settings import Settings
from app.telemetry import Telemetry
from workers.runner import Worker

logger = logging.getLogger("tokentape")

AppFactory = Callable[[Settings, Redis | RedisCluster, Telemetry], web.Application]


def main(settings: Settings, *, processes: int, with_worker: bool, reuse_port: bool) -> int:
    """Run `serve` until SIGTERM/SIGINT; with no Redis configured, embed one (and a worker).

    Raises ConfigError (exit 2) when access is misconfigured, or open on a network.
    """
    # The readers of `--processes` (started with --reuse-port) leave the warning to it.
    check_access(settings, warn=not reuse_port)
    if settings.redis_url is not None:
        return _run(settings, processes, with_worker=with_worker, note="", reuse_port=reuse_port)
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
        return _run(settings, processes, with_worker=True, note=note, reuse_port=reuse_port)


def check_access(settings: Settings, *, warn: bool = True) -> Access:
    """The access `settings` configure. Without API keys: one warning line, or a refusal
    when listening beyond loopback unless `insecure` says the operator means it."""
    access = Access.from_settings(settings)
    if not access.open:
        return access
    if not _loopback(settings.host) and not settings.insecure:
        raise ConfigError(
            message=f"refusing to serve on {settings.host or 'every address'} without API keys: "
            "anyone who can reach it could start generations on your provider accounts, and "
            "read or cancel any. Set TOKENTAPE_API_KEYS and TOKENTAPE_SECRET "
            "(docs/security.md), or pass --insecure (TOKENTAPE_INSECURE=true) if an open "
            "service is what you mean"
        )
    if warn:
        logger.warning(
            "open service: no API keys (TOKENTAPE_API_KEYS), so anyone who can reach it may "
            "create, read and cancel generations"
        )
    return access


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or "" (every address): not known to stay on this machine


def _run(
    settings: Settings, processes: int, *, with_worker: bool, note: str, reuse_port: bool
) -> int:
    if processes == 1:
        return run_loop(
            settings, serve(settings, with_worker=with_worker, note=note, reuse_port=reuse_port)
        )
    return run_loop(
        settings, serve_processes(settings, processes, with_worker=with_worker, note=note)
    )


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
        *(["--cluster"] if settings.redis_cluster else []),
        "--host", settings.host,
        "--port", str(port),
        "--reuse-port",
        *(["--insecure"] if settings.insecure else []),
    ]  # fmt: skip
    with stop_on_signals(stop), _on_sighup(lambda: _forward(readers, signal.SIGHUP)):
        # A reader outlives nothing: if this supervisor is killed (even by SIGKILL, the
        # OOM killer), its readers get SIGTERM and drain, instead of serving on as orphans.
        readers: list[asyncio.subprocess.Process] = []
        readers += [
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
            async with work.beside(settings, factory, stop, telemetry) as worker:
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
    worker_factory: work.WorkerFactory | None = None,
    reuse_port: bool = False,
) -> int:
    """Run the HTTP service (and optionally a worker) until SIGTERM/SIGINT or `stop`."""
    stop = stop or asyncio.Event()
    with stop_on_signals(stop):
        return await _serve(
            settings,
            stop,
            app_factory or create_app,
            (worker_factory or Worker) if with_worker else None,
            note,
            reuse_port,
        )


async def _serve(
    settings: Settings,
    stop: asyncio.Event,
    app_factory: AppFactory,
    worker_factory: work.WorkerFactory | None,
    note: str,
    reuse_port: bool,
) -> int:
    # One of the reader's connections is the hub's pub/sub one, which it opens itself.
    redis = connect(settings, "reader", max(1, settings.reader_redis_connections - 1))
    telemetry = Telemetry.from_env("tokentape-reader")
    try:
        if not await reachable(redis, settings):
            return 1
        runner = ServiceRunner(app_factory(settings, redis, telemetry), settings)
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
            with _keys_reloaded_on_sighup(runner.app):
                async with work.beside(settings, worker_factory, stop, telemetry) as worker:
                    await stop.wait()
                    logger.info("stopping: no new connections; open streams end")
                    if READINESS in runner.app:
                        runner.app[READINESS].drain()
        finally:
            await runner.cleanup()
    finally:
        await redis.aclose()
        telemetry.shutdown()  # flushes the exporters
    return 1 if worker.failed else 0


@contextlib.contextmanager
def _on_sighup(callback: Callable[[], None]) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, callback)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


@contextlib.contextmanager
def _keys_reloaded_on_sighup(app: web.Application) -> Iterator[None]:
    """SIGHUP re-reads the API key file (TOKENTAPE_API_KEYS=@FILE) while this runs."""
    access = app.get(ACCESS)
    if access is None:
        yield
        return
    with _on_sighup(partial(_reload_keys, access)):
        yield


def _reload_keys(access: Access) -> None:
    """Read the API key file again; a file that is unusable keeps the keys there were."""
    if access.keys is None or access.keys.path is None:
        logger.info("SIGHUP: no API key file to read again (TOKENTAPE_API_KEYS is not @FILE)")
        return
    try:
        count = access.keys.reload()
    except ConfigError as exc:
        logger.error("API keys not reloaded, the previous ones stay: %s", exc.message)
        return
    logger.info("API keys reloaded: %d", count)


def _forward(readers: list[asyncio.subprocess.Process], signum: int) -> None:
    for reader in readers:
        if reader.returncode is None:
            reader.send_signal(signum)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
