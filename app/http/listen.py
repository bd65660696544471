"""An aiohttp site that accepts every waiting connection at once.

uvloop's libuv (since 1.45) accepts one connection per loop iteration. A busy
reader's iterations last 20-100 ms, so a burst of clients (scenario (a) of
scripts/bench.py, a reconnect storm after a restart) waited seconds in the listen
queue before its requests were even read: ~70 accepts/s with 1000 streams live.
Here the listening socket is polled by the loop and drained up to `backlog`
connections per wake-up, as asyncio's own loop does; each is handed to the
loop with `connect_accepted_socket`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)

# Out of descriptors or memory: accepting again at once would spin on a socket that
# stays readable. asyncio waits as long.
_PAUSE_SECONDS = 1.0
_PAUSE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class AcceptAllSite(web.BaseSite):
    """A plain TCP site (no TLS) on `host`:`port`, every address it resolves to.

    Only BaseSite's public contract is used: start and stop register it with its
    runner, whose cleanup stops it. Its sockets are its own, listed by `addresses`
    (the runner's `addresses` reads a private field of aiohttp's sites and omits them).
    """

    __slots__ = ("_host", "_listen_backlog", "_listener", "_port", "_reuse_port", "_site_runner")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        backlog: int = 1024,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._site_runner = runner
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._listen_backlog = backlog
        self._listener: _Listener | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def addresses(self) -> list[Any]:
        """The `getsockname()` of every listening socket, once started."""
        if self._listener is None:
            return []
        return [sock.getsockname() for sock in self._listener.sockets]

    async def start(self) -> None:
        await super().start()
        factory = self._site_runner.server
        assert factory is not None
        sockets = _listening_sockets(self._host, self._port, self._listen_backlog, self._reuse_port)
        self._listener = _Listener(sockets, factory, self._listen_backlog)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        await super().stop()


class _Listener:
    """Listening sockets whose waiting connections are all accepted at each wake-up."""

    def __init__(self, sockets: list[socket.socket], factory: web.Server, backlog: int) -> None:
        self._loop = asyncio.get_running_loop()
        self.sockets = tuple(sockets)
        self._factory = factory
        self._backlog = backlog
        self._connecting: set[asyncio.Task[Any]] = set()
        self._serving = True
        for sock in sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(self._backlog):
            try:
                connection, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while it waited
            except OSError as exc:
                if exc.errno not in _PAUSE_ERRNOS:
                    raise
                logger.warning("accepting connections paused %g s: %s", _PAUSE_SECONDS, exc)
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(_PAUSE_SECONDS, self._resume, sock)
                return
            connection.setblocking(False)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(
                self._loop.connect_accepted_socket(self._factory, connection)
            )
            self._connecting.add(task)
            task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[Any]) -> None:
        self._connecting.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.debug("an accepted connection failed to start: %s", exc)

    def _resume(self, sock: socket.socket) -> None:
        if self._serving:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()


def _listening_sockets(host: str, port: int, backlog: int, reuse_port: bool) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address `host` resolves to."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # As asyncio does: an IPv6 socket must not also claim the IPv4 port.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
