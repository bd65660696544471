"""The embedded default Redis of `tokentape serve`, and the one way tokentape runs a redis-server.

With no Redis URL configured, `serve` needs *a* Redis-protocol server so a
newcomer sees streaming with one command. In order of preference:

1. a `redis-server` or `valkey-server` on PATH, run as a child process on a free
   loopback port, keeping its data in the data directory (`.tokentape/` by
   default) with AOF on: stop `serve`, start it again, and every generation is
   still there, so a client resumes after `Last-Event-ID` across the restart;
2. fakeredis's `TcpFakeServer` in a thread of this process (the `embedded`
   extra): in memory only, lost on exit.

The data directory also holds a lock (one `serve` per directory) and
`embedded.json`, where the incident tools find the running server's URL.

`RedisProcess` is also what the tests, scripts/test and the benchmark run their
own redis-server with, and `RedisClusterProcesses` their own Redis Cluster.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

logger = logging.getLogger("tokentape.embedded")

SERVER_BINARIES = ("redis-server", "valkey-server")
CLI_BINARIES = {"redis-server": "redis-cli", "valkey-server": "valkey-cli"}
# What the embedded server keeps on disk: every write in an append-only file, synced
# once a second; a clean stop (SIGTERM, also sent when tokentape dies) writes it all.
PERSISTENCE = ("--appendonly", "yes", "--appendfsync", "everysec")
_START_TIMEOUT_SECONDS = 10.0
_LOCK_FILE = "serve.lock"
_INFO_FILE = "embedded.json"

Which = Callable[[str], str | None]


class EmbeddedUnavailable(RuntimeError):
    """No embedded Redis could be had, or the data directory is in use; the message says why."""


class EmbeddedRedis(Protocol):
    """A running embedded server: where it listens, what it is, and how to stop it."""

    @property
    def url(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def persistent(self) -> bool: ...

    def stop(self) -> None: ...


def find_server(which: Which = shutil.which) -> str | None:
    """The path of a redis-server (or valkey-server) on PATH."""
    for name in SERVER_BINARIES:
        binary = which(name)
        if binary is not None:
            return binary
    return None


@contextlib.contextmanager
def embedded_redis(data_dir: Path, which: Which = shutil.which) -> Iterator[EmbeddedRedis]:
    """Start the best embedded server available on `data_dir`, yield it, stop it on exit.

    Holds the directory's lock throughout: a second `serve` on the same directory is
    refused instead of corrupting the first one's files. `which` looks a program up
    on PATH; tests pass one that finds nothing to force the fakeredis fallback.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(data_dir):
        server = start(data_dir, which)
        info = data_dir / _INFO_FILE
        try:
            info.write_text(json.dumps({"url": server.url, "kind": server.kind}))
            yield server
        finally:
            info.unlink(missing_ok=True)
            server.stop()


def start(data_dir: Path, which: Which = shutil.which) -> EmbeddedRedis:
    binary = find_server(which)
    if binary is not None:
        server = RedisProcess(binary, data_dir / "redis", config=PERSISTENCE)
        server.start()
        return server
    try:
        return FakeRedisServer.start()
    except ImportError:
        raise EmbeddedUnavailable(
            "no Redis to embed: install redis-server (e.g. `apt-get install redis-server`, "
            '`brew install redis`) or the fallback (`pip install "tokentape[embedded]"`), '
            "or pass --redis URL"
        ) from None


def running_url(data_dir: Path) -> str | None:
    """The URL of the embedded Redis that a running `serve` keeps in `data_dir`, if one does."""
    info = data_dir / _INFO_FILE
    if not info.is_file() or not _locked_by_another(data_dir):
        return None  # no file, or one left behind by a serve that was killed
    try:
        url = json.loads(info.read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url if isinstance(url, str) else None


@contextlib.contextmanager
def _exclusive(data_dir: Path) -> Iterator[None]:
    if sys.platform == "win32":  # no flock: one serve per directory is on the user
        yield
        return
    import fcntl

    with open(data_dir / _LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EmbeddedUnavailable(
                f"another tokentape serve keeps its data in {data_dir}: stop it, "
                "or give this one its own --data-dir"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _locked_by_another(data_dir: Path) -> bool:
    if sys.platform == "win32":
        return True
    import fcntl

    lock: IO[str]
    try:
        lock = open(data_dir / _LOCK_FILE)  # noqa: SIM115 - closed below on every path
    except OSError:
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
        return False


def find_cli(server: str, which: Which = shutil.which) -> str | None:
    """The redis-cli (or valkey-cli) that goes with the server binary `server`."""
    name = CLI_BINARIES.get(Path(server).name, "redis-cli")
    beside = Path(server).with_name(name)
    return str(beside) if beside.is_file() else which(name)


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
    """A `redis-server`/`valkey-server` child on 127.0.0.1, with its files in `directory`.

    Persistence is off unless `config` turns it on (`PERSISTENCE`). It can be
    stopped (SIGTERM: Redis writes its AOF and exits), killed (SIGKILL: a crash),
    frozen (SIGSTOP: its connections stay open and nothing answers) and thawed, and
    started again on the same port and files.
    """

    def __init__(
        self,
        binary: str,
        directory: Path,
        *,
        port: int | None = None,
        config: Sequence[str] = (),
        log_file: Path | None = None,
        cluster_bus: bool = False,
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        self._port_fixed = port is not None
        # A cluster node's bus listens on a port of its own, chosen like `port`.
        self.cluster_port = free_port() if cluster_bus else None
        self.config = tuple(config)
        self.log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def kind(self) -> str:
        return Path(self.binary).name

    @property
    def persistent(self) -> bool:
        options = list(self.config)
        if "--appendonly" not in options:
            return False
        last = len(options) - 1 - options[::-1].index("--appendonly")
        return options[last + 1 : last + 2] == ["yes"]

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start the server and return once it answers PONG (its data loaded)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        # Another process may take the free port between our probe and the server's
        # bind: with a port of our choosing, try a few before giving up.
        for attempt in range(3):
            if self._launch():
                # A restart keeps the port: clients hold the URL.
                self._port_fixed = True
                return
            if attempt < 2 and not self._port_fixed:
                self.port = free_port()
                if self.cluster_port is not None:
                    self.cluster_port = free_port()
        raise EmbeddedUnavailable(
            f"{self.binary} did not start on port {self.port}; run it by hand to see why"
        )

    def _launch(self) -> bool:
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._process = subprocess.Popen(
                [
                    self.binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.directory),
                    "--daemonize", "no",
                    "--loglevel", "warning",
                    *(("--cluster-port", str(self.cluster_port)) if self.cluster_port else ()),
                    *self.config,  # later options win
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Its own session: a terminal's Ctrl-C reaches tokentape only, which then
                # shuts down in order (web, worker, Redis client) before stopping the server.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )  # fmt: skip
        finally:
            if not isinstance(log, int):
                log.close()
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if answers_ping(self.port):
                return True
            if self._process.poll() is not None:
                break
            # Polling a port until a process answers: there is no event to await.
            time.sleep(0.01)
        self.kill()
        return False

    def freeze(self) -> None:
        """SIGSTOP: the server stops answering, its sockets stay open (a stalled host)."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: a frozen server answers again, what it was sent meanwhile first."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM and wait: a clean shutdown that writes what the AOF has pending."""
        if self._process is not None:
            if self._process.poll() is None:
                self.thaw()  # a frozen server would hold SIGTERM until then
                self._process.terminate()
                try:
                    self._process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            self._process = None

    def kill(self) -> None:
        """SIGKILL and reap: a crash, nothing written on the way out."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            self._process = None


# A node is taken for failed after this many ms: short, so that failovers in tests and
# drills finish in seconds (production runs the default, 15 s).
CLUSTER_NODE_TIMEOUT_MS = 2000
_SETTLE_TIMEOUT_SECONDS = 30.0


class RedisClusterProcesses:
    """A Redis Cluster of `redis-server` children on 127.0.0.1: `primaries` primaries,
    each with `replicas` replicas, joined by `redis-cli --cluster create`.

    Every node is a `RedisProcess` (its files in `directory/node-<i>`, its cluster bus
    on a port of its own), so a test can kill, stop or restart any one of them.
    """

    def __init__(
        self,
        binary: str,
        directory: Path,
        *,
        primaries: int = 3,
        replicas: int = 1,
        config: Sequence[str] = (),
        log_dir: Path | None = None,
    ) -> None:
        cli = find_cli(binary)
        if cli is None:
            raise EmbeddedUnavailable(f"no redis-cli beside {binary} to create a cluster with")
        self.cli = cli
        self.replicas = replicas
        self.nodes: list[RedisProcess] = []
        for i in range(primaries * (1 + replicas)):
            options = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
                # A replica syncs at once, not after the default 5 s of waiting for others.
                "--repl-diskless-sync-delay", "0",
            )  # fmt: skip
            log_file = None if log_dir is None else log_dir / f"node-{i}.log"
            node = RedisProcess(
                binary,
                directory / f"node-{i}",
                config=(*options, *config),
                log_file=log_file,
                cluster_bus=True,
            )
            self.nodes.append(node)

    @property
    def url(self) -> str:
        """Any node names the cluster: a cluster client learns the rest from it."""
        return self.nodes[0].url

    @property
    def kind(self) -> str:
        return f"{self.nodes[0].kind} cluster"

    @property
    def persistent(self) -> bool:
        return self.nodes[0].persistent

    def start(self) -> None:
        """Start every node, join them, and return once every node sees the whole cluster."""
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        created = subprocess.run(
            [self.cli, "--cluster", "create", *addresses,
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip
        if created.returncode != 0:
            self.kill()
            raise EmbeddedUnavailable(f"redis-cli --cluster create failed: {created.stdout}")
        self.wait_settled()

    def wait_settled(self, timeout: float = _SETTLE_TIMEOUT_SECONDS) -> None:
        """Return once every running node reports the cluster ok with every slot served,
        knows every node, and every replica is in sync with its primary."""
        deadline = time.monotonic() + timeout
        while not self.settled():
            if time.monotonic() > deadline:
                raise EmbeddedUnavailable(f"the cluster did not settle within {timeout:g} s")
            # Gossip converging: there is no event to await.
            time.sleep(0.05)

    def settled(self) -> bool:
        import redis

        running = self._running()
        try:
            for node in running:
                with redis.Redis(port=node.port, socket_timeout=1) as client:
                    info: dict[str, Any] = client.cluster("INFO")
                    if (
                        info.get("cluster_state") != "ok"
                        or int(info.get("cluster_slots_ok", 0)) != 16384
                        or int(info.get("cluster_known_nodes", 0)) != len(self.nodes)
                    ):
                        return False
                    replication = client.info("replication")
                    if replication["role"] == "slave" and (
                        replication.get("master_link_status") != "up"
                    ):
                        return False
                    slots = {
                        (start, end, primary[1])
                        for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS")
                    }
                if running[0] is node:
                    first = slots
                elif slots != first:
                    return False
        except (redis.RedisError, OSError):
            return False
        return True

    def primary_of(self, slot: int) -> RedisProcess:
        """The node that serves `slot` now."""
        import redis

        with redis.Redis(port=self._running()[0].port) as client:
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return self._node(primary[1])
        raise EmbeddedUnavailable(f"no node serves slot {slot}")

    def replica_of(self, primary: RedisProcess) -> RedisProcess:
        import redis

        for node in self._running():
            with redis.Redis(port=node.port) as client:
                replication = client.info("replication")
            if replication["role"] == "slave" and replication["master_port"] == primary.port:
                return node
        raise EmbeddedUnavailable(f"the node on port {primary.port} has no replica")

    def fail_over(self, replica: RedisProcess) -> None:
        """`CLUSTER FAILOVER` on `replica`: it takes its primary's place (a manual failover,
        nothing lost); returns once every node agrees."""
        import redis

        with redis.Redis(port=replica.port) as client:
            client.execute_command("CLUSTER", "FAILOVER")
        self.wait_settled()

    def move_slot(self, slot: int, target: RedisProcess, *, pause: float = 0.0) -> None:
        """Migrate `slot` to `target` as `redis-cli --cluster reshard` does (CLUSTER SETSLOT,
        MIGRATE), one key at a time with `pause` s between keys, so that clients meet the
        migration half done."""
        import redis

        source = self.primary_of(slot)
        with (
            redis.Redis(port=source.port) as source_client,
            redis.Redis(port=target.port) as target_client,
        ):
            source_id = source_client.execute_command("CLUSTER", "MYID").decode()
            target_id = target_client.execute_command("CLUSTER", "MYID").decode()
            target_client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            source_client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := source_client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
                source_client.execute_command(
                    "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys
                )
                # Spreading the migration over time: there is no event to await.
                time.sleep(pause)
            for node in (target, source):
                with redis.Redis(port=node.port) as client:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.wait_settled()

    def _running(self) -> list[RedisProcess]:
        return [node for node in self.nodes if node.pid is not None]

    def _node(self, port: int) -> RedisProcess:
        return next(node for node in self.nodes if node.port == port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()


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
    persistent = False

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

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @classmethod
    def start(cls) -> FakeRedisServer:
        from fakeredis import TcpFakeServer

        server = TcpFakeServer(("127.0.0.1", 0))
        # A client blocked in XREADGROUP BLOCK holds its handler thread inside the
        # command: never join those threads on close, nor let them keep the process alive.
        server.daemon_threads = True
        server.block_on_close = False
        thread = threading.Thread(
            target=server.serve_forever, name="tokentape-fakeredis", daemon=True
        )
        thread.start()
        logger.warning(
            "no redis-server or valkey-server on PATH: using fakeredis in this process, "
            "which keeps nothing across restarts and only approximates Redis. "
            "Install redis-server for anything beyond a demo"
        )
        return cls(server, thread)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
