"""The embedded default Redis of `tokentape serve`: started and stopped by tokentape itself.

With no Redis URL configured, `serve` needs *a* Redis-protocol server so a
newcomer sees streaming with one command. In order of preference:

1. a `redis-server` or `valkey-server` on PATH, run as a child process on a free
   loopback port with persistence off, in a temporary directory;
2. fakeredis's `TcpFakeServer` in a thread of this process (the `embedded`
   extra), with workarounds for the gaps tokentape hits (see `_FakeRequestHandler`).

Either way the data lives only as long as the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

logger = logging.getLogger("tokentape.embedded")

SERVER_BINARIES = ("redis-server", "valkey-server")
_START_TIMEOUT_SECONDS = 10.0

Which = Callable[[str], str | None]


class EmbeddedUnavailable(RuntimeError):
    """Neither a Redis binary nor fakeredis could be had; the message says what to install."""


class EmbeddedRedis(Protocol):
    """A running embedded server: where it listens, what it is, and how to stop it."""

    @property
    def url(self) -> str: ...

    @property
    def kind(self) -> str: ...

    def stop(self) -> None: ...


@contextlib.contextmanager
def embedded_redis(which: Which = shutil.which) -> Iterator[EmbeddedRedis]:
    """Start the best embedded server available, yield it, and stop it on exit.

    `which` looks a program up on PATH; tests pass one that finds nothing to force
    the fakeredis fallback.
    """
    server = start(which)
    try:
        yield server
    finally:
        server.stop()


def start(which: Which = shutil.which) -> EmbeddedRedis:
    for name in SERVER_BINARIES:
        binary = which(name)
        if binary is not None:
            return RedisProcess.start(binary)
    try:
        return FakeRedisServer.start()
    except ImportError:
        raise EmbeddedUnavailable(
            "no Redis to embed: install redis-server (e.g. `apt-get install redis-server`, "
            '`brew install redis`) or the fallback (`pip install "tokentape[embedded]"`), '
            "or pass --redis URL"
        ) from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def answers_ping(port: int) -> bool:
    """A Redis on 127.0.0.1:`port` answers PONG: listening and done loading its data."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess:
    """A `redis-server`/`valkey-server` child on 127.0.0.1, persistence off, own temp dir."""

    def __init__(self, binary: str, port: int, directory: tempfile.TemporaryDirectory[str]):
        self.binary = binary
        self.port = port
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def kind(self) -> str:
        return self.binary.rsplit("/", 1)[-1]

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @classmethod
    def start(cls, binary: str) -> RedisProcess:
        # Another process may take the free port between our probe and the server's
        # bind: try a few ports before giving up.
        for _ in range(3):
            directory = tempfile.TemporaryDirectory(prefix="tokentape-redis-")
            server = cls(binary, free_port(), directory)
            if server._launch():
                return server
        raise EmbeddedUnavailable(f"{binary} did not start; run it by hand to see why")

    def _launch(self) -> bool:
        self._process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._directory.name,
                "--daemonize", "no",
                "--loglevel", "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C reaches tokentape only, which then
            # shuts down in order (web, worker, Redis client) before stopping the server.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )  # fmt: skip
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if answers_ping(self.port):
                return True
            if self._process.poll() is not None:
                break
            # Polling a port until a process listens: there is no event to await.
            time.sleep(0.01)
        self.stop()
        return False

    def stop(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            self._process = None
        self._directory.cleanup()


def die_with_parent() -> None:
    """In the child before exec: have Linux send it SIGTERM when its parent dies, even by
    SIGKILL (the embedded redis-server, the readers of `serve --processes`).

    Trap: the signal follows the *thread* that forked, so start the child from the
    main thread (the event loop's is fine), never from `asyncio.to_thread`.
    """
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class FakeRedisServer:
    """fakeredis's TcpFakeServer on 127.0.0.1 in a background thread of this process."""

    kind = "fakeredis"

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls) -> FakeRedisServer:
        from fakeredis import TcpFakeServer

        _patch_fakeredis()
        server = TcpFakeServer(("127.0.0.1", 0))
        server.RequestHandlerClass = _fake_request_handler()
        # A client blocked in XREADGROUP BLOCK holds its handler thread inside the
        # command: never join those threads on close, nor let them keep the process alive.
        server.daemon_threads = True
        server.block_on_close = False
        thread = threading.Thread(
            target=server.serve_forever, name="tokentape-fakeredis", daemon=True
        )
        thread.start()
        logger.warning(
            "no redis-server or valkey-server on PATH: using fakeredis in this process. "
            "It only approximates Redis; tokentape works around the gaps it hits "
            "(a connection closed after any error reply, XREADGROUP BLOCK not blocking). "
            "Install redis-server for anything beyond a demo"
        )
        return cls(server, thread)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _fake_request_handler() -> type:
    from fakeredis._clients._tcp_server import TCPFakeRequestHandler
    from redis.exceptions import ResponseError

    class _FakeRequestHandler(TCPFakeRequestHandler):
        """Answer an error reply and keep the connection, as Redis does.

        fakeredis 2.40's handler closes the connection after any error reply, so
        redis-py's EVALSHA → NOSCRIPT → SCRIPT LOAD fallback (how every Lua script of
        the log is first loaded) dies with "Connection closed by server"
        (seen with 2.40; related: fakeredis-py issue #432).
        """

        def setup(self) -> None:
            super().setup()
            read_response = self.current_client.read_response

            def read_response_or_error(*args: Any, **kwargs: Any) -> Any:
                try:
                    return read_response(*args, **kwargs)
                except ResponseError as exc:
                    return exc  # encoded as a `-ERR …` reply

            self.current_client.read_response = read_response_or_error  # type: ignore[method-assign]

    return _FakeRequestHandler


_patched = False


def _patch_fakeredis() -> None:
    """Make fakeredis's XREADGROUP BLOCK block, as workers rely on it.

    fakeredis 2.40 answers `XREADGROUP … COUNT n BLOCK ms` at once with nothing when
    no entry is new (a worker would spin), and without COUNT it takes the entries
    into the pending list yet answers nothing. Here the first pass reads with a
    finite COUNT and answers "nothing yet" (None) so the blocking loop waits.
    """
    global _patched
    if _patched:
        return
    from fakeredis.commands_mixins.streams_mixin import StreamsCommandsMixin

    original = StreamsCommandsMixin._xreadgroup
    expected = ["self", "consumer_name", "group_params", "count", "noack", "min_idle_time"]
    if list(inspect.signature(original).parameters)[:6] != expected:
        logger.warning(
            "this fakeredis version's XREADGROUP is not the one tokentape patches: "
            "left as it is; a worker may spin instead of blocking on an empty queue"
        )
        _patched = True
        return

    def _xreadgroup(
        self: Any,
        consumer_name: bytes,
        group_params: Any,
        count: int | None,
        noack: bool,
        min_idle_time: int | None,
        first_pass: bool,
    ) -> Any:
        count = sys.maxsize if count is None else count
        result = original(
            self, consumer_name, group_params, count, noack, min_idle_time, first_pass
        )
        if first_pass and not result:
            return None
        return result

    StreamsCommandsMixin._xreadgroup = _xreadgroup  # type: ignore[method-assign]
    _patched = True
