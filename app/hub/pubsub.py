"""The hub's pub/sub connection: one socket per process, read in bulk.

Not redis-py's PubSub: its get_message costs a coroutine chain, a dict and
observability hooks per message, a large share of a busy reader's CPU. The connection is
opened here, to the server a redis-py client points at (address, TLS, credentials
and client name read from the client's settings), and speaks RESP through hiredis:
commands packed with `pack_command`, replies parsed many to a read.

Besides its listener, whose messages are parsed, a channel may have a watcher, which
takes them as published: a channel whose messages only say that something changed (a
Durable Stream's, or a generation's read through that protocol) shares the socket.

It keeps the channel of every listener and watcher subscribed across reconnects. A
channel that is always subscribed (the anchor) is listed last when (re)connecting:
its confirmation says every channel before it is subscribed again, and every
listener and watcher is told it may have missed messages.

On a Redis Cluster (`ShardedPubSub`) channels are sharded (SSUBSCRIBE): each is
subscribed on the primary that serves its slot, over one connection per such
primary, and needs no anchor, since each channel's own confirmation tells its
listener and its watcher that they may have missed messages. A channel its node lets
go of (its slot moved, the node became a replica) or refuses is subscribed again
where the cluster's slot map now puts it.

A Redis that stops answering can keep its sockets open (SIGSTOP, a stalled host):
a connection silent for `timeout` is pinged, and one still silent after another
`timeout` is dropped and reconnected, like a connection Redis closed.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import ssl
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.credentials import CredentialProvider, UsernamePasswordCredentialProvider
from redis.exceptions import SlotNotCoveredError

from app.store.cluster import node_of, refresh_slot_map

logger = logging.getLogger(__name__)

READ_SIZE = 64 * 1024  # per read of the connection
# Slot maps read (each after a growing pause) before a channel goes back to the cluster
# node that let it go (see ShardedPubSub).
STALE_MAP_TRIES = 8
CONNECT_TIMEOUT_SECONDS = 5.0  # connect and log in, when the client sets no connect timeout
SILENCE_TIMEOUT_SECONDS = 5.0  # default `timeout`: silence before a ping, then before a reconnect
_PING = b"*1\r\n$4\r\nPING\r\n"

Message = TypeVar("Message")
Message_contra = TypeVar("Message_contra", contravariant=True)


class Listener(Protocol[Message_contra]):
    """The owner of one channel, as the connection talks to it."""

    def dispatch(self, message: Message_contra, now: float) -> None:
        """A message published on the channel, parsed."""

    def subscribed(self) -> None:
        """The channel's SUBSCRIBE is confirmed: what is published from now on arrives."""

    def missed(self) -> None:
        """Messages published on the channel may have been lost (reconnect, malformed message)."""


class Confirmable:
    """A listener whose channel's confirmation any number of tasks may wait for."""

    __slots__ = ("_confirming", "confirmed")

    def __init__(self) -> None:
        self.confirmed = False  # subscribed: what is published from now on arrives
        # Made only while someone waits: listeners live as long as their streams.
        self._confirming: asyncio.Future[None] | None = None

    async def until_confirmed(self, seconds: float | None = None) -> bool:
        """Wait (up to `seconds`) for the channel to be subscribed; whether it is."""
        if not self.confirmed:
            if self._confirming is None:
                self._confirming = asyncio.get_running_loop().create_future()
            # asyncio.wait, not a timeout around the future: that would cancel it for the
            # others waiting on the same channel.
            await asyncio.wait([self._confirming], timeout=seconds)
        return self.confirmed

    def subscribed(self) -> None:
        if not self.confirmed:
            self.confirmed = True
            if self._confirming is not None:
                self._confirming.set_result(None)
                self._confirming = None


class Changes:
    """Something tasks wait on until it reaches a state (`until`); whoever changes it
    says so (`announce`). The future they wait on is made only while someone waits:
    announcing to nobody, on every subscribe or watch, costs nothing."""

    __slots__ = ("_changed",)

    def __init__(self) -> None:
        self._changed: asyncio.Future[None] | None = None

    async def until(self, reached: Callable[[], bool]) -> None:
        while not reached():
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._changed)

    def announce(self) -> None:
        if self._changed is not None:
            self._changed.set_result(None)
            self._changed = None


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A Redis server and how to log in to it."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None  # a Unix socket, instead of host and port
    tls: ssl.SSLContext | None = None
    credentials: CredentialProvider | None = None
    client_name: str | None = None
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS

    @classmethod
    def of(cls, redis: Redis) -> Endpoint:
        """Where `redis` connects, and as whom.

        A connection of its pool is made, never connected, and read: redis-py itself
        interprets the URL and the client's options (defaults, TLS files, credentials).
        """
        pool = redis.connection_pool
        return cls._of(pool.connection_class(**pool.connection_kwargs))

    @classmethod
    def of_node(cls, node: ClusterNode) -> Endpoint:
        """Where the cluster node `node` is, and how redis-py's cluster client logs in to it."""
        return cls._of(node.connection_class(**node.connection_kwargs))

    @classmethod
    def _of(cls, connection: AbstractConnection) -> Endpoint:
        credentials = connection.credential_provider
        if credentials is None and (connection.username or connection.password):
            credentials = UsernamePasswordCredentialProvider(
                connection.username, connection.password
            )
        endpoint = cls(
            credentials=credentials,
            client_name=connection.client_name,
            connect_timeout=connection.socket_connect_timeout or CONNECT_TIMEOUT_SECONDS,
        )
        if isinstance(connection, UnixDomainSocketConnection):
            return dataclasses.replace(endpoint, path=connection.path)
        if isinstance(connection, Connection):
            tls = connection.ssl_context.get() if isinstance(connection, SSLConnection) else None
            return dataclasses.replace(
                endpoint, host=connection.host, port=connection.port, tls=tls
            )
        raise ValueError(f"cannot open a pub/sub connection like a {type(connection).__name__}")


def _pack(*command: str | bytes) -> bytes:
    """One command as RESP."""
    # hiredis's stub types the argument as a tuple of one element.
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed


class PubSubConnection(Generic[Message]):
    """Subscribes the channels of its listeners and hands each its messages, parsed by `parse`.

    `parse` raises ValueError on a message it cannot read: the message is dropped and
    its listener told it missed something. `listen` runs the connection until `close`.

    With no `anchor`, the channels are sharded (one cluster node's): `lost` hears of a
    channel the node let go of or refused, `failed` of the connection failing.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        anchor: bytes | None,
        parse: Callable[[bytes], Message],
        *,
        lost: Callable[[bytes], None] | None = None,
        failed: Callable[[], None] | None = None,
        timeout: float = SILENCE_TIMEOUT_SECONDS,
    ):
        self.endpoint = endpoint
        self.timeout = timeout
        self._anchor = anchor
        self._parse = parse
        self._sharded = anchor is None
        self._subscribe, self._unsubscribe = (
            (b"SSUBSCRIBE", b"SUNSUBSCRIBE") if self._sharded else (b"SUBSCRIBE", b"UNSUBSCRIBE")
        )
        self._lost = lost
        self._failed = failed
        # Sharded: the (command, channel) of each SSUBSCRIBE or SUNSUBSCRIBE not yet
        # answered, in order: an error reply names no channel.
        self._unanswered: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._listeners: dict[bytes, Listener[Message]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._subscribed = False  # the (re)connect subscribed every channel: commands may go out
        self._replies = hiredis.Reader()
        # Per connection: a reconnect starts both at the SUBSCRIBE that lists every channel.
        self._subscribes_sent: collections.Counter[bytes] = collections.Counter()
        self._subscribes_acked: collections.Counter[bytes] = collections.Counter()
        # Which SUBSCRIBE of its channel confirms a listener.
        self._confirmed_by: dict[bytes, int] = {}
        self._watchers: dict[bytes, Listener[bytes]] = {}
        self._watch_confirmed_by: dict[bytes, int] = {}  # and a watcher
        self._failures = 0
        self._closing = False
        self._last_read = 0.0  # loop time of the connection's last bytes (or of connecting)
        self._silenced = False  # the keep-alive dropped the connection

    def retry_delay(self) -> float:
        """A pause before trying Redis again, growing while the connection keeps failing."""
        delay: float = min(2.0, 0.05 * 2 ** min(self._failures, 6))
        return delay * (0.5 + random.random())

    def subscribe(self, channel: bytes, listener: Listener[Message]) -> None:
        """Hand `channel`'s messages to `listener`, which hears when that is confirmed."""
        self._listeners[channel] = listener
        self._confirmed_by[channel] = 0
        writer = self._command_writer()
        if writer is not None:
            self._subscribes_sent[channel] += 1
            self._confirmed_by[channel] = self._subscribes_sent[channel]
            self._write(writer, self._subscribe, channel)

    def unsubscribe(self, channel: bytes) -> None:
        del self._listeners[channel]
        del self._confirmed_by[channel]
        self._forget(channel)
        self._unsubscribe_unheard(channel)

    def watch(self, channel: bytes, watcher: Listener[bytes]) -> None:
        """Hand `channel`'s messages to `watcher` as published, beside the channel's
        listener if it has one; `watcher` hears when that is confirmed."""
        self._watchers[channel] = watcher
        self._watch_confirmed_by[channel] = 0
        writer = self._command_writer()
        if writer is not None:
            self._subscribes_sent[channel] += 1
            self._watch_confirmed_by[channel] = self._subscribes_sent[channel]
            self._write(writer, self._subscribe, channel)

    def unwatch(self, channel: bytes) -> None:
        del self._watchers[channel]
        del self._watch_confirmed_by[channel]
        self._forget(channel)
        self._unsubscribe_unheard(channel)

    def _unsubscribe_unheard(self, channel: bytes) -> None:
        """UNSUBSCRIBE `channel` once neither a listener nor a watcher has it."""
        if channel in self._listeners or channel in self._watchers:
            return
        writer = self._command_writer()
        if writer is not None:
            self._write(writer, self._unsubscribe, channel)

    @property
    def channels(self) -> list[bytes]:
        """The channels of its listeners and watchers."""
        return [*dict.fromkeys([*self._listeners, *self._watchers])]

    def _heard(self, channel: bytes) -> bool:
        return channel in self._listeners or channel in self._watchers

    def _write(self, writer: asyncio.StreamWriter, command: bytes, channel: bytes) -> None:
        if self._sharded:
            self._unanswered.append((command, channel))
        writer.write(_pack(command, channel))

    def close(self) -> None:
        """End `listen`: its read ends as the connection closes."""
        self._closing = True
        self._disconnect()

    def _command_writer(self) -> asyncio.StreamWriter | None:
        """Where a command goes now; None while (re)connecting, which subscribes every channel."""
        writer = self._writer
        if self._subscribed and writer is not None and not writer.is_closing():
            return writer
        return None

    def _forget(self, channel: bytes) -> None:
        """Drop a channel's counts once nobody listens and no SUBSCRIBE of it is in flight."""
        if (
            channel not in self._listeners
            and channel not in self._watchers
            and self._subscribes_acked[channel] >= self._subscribes_sent[channel]
        ):
            self._subscribes_sent.pop(channel, None)
            self._subscribes_acked.pop(channel, None)

    async def listen(self) -> None:
        """Connect, subscribe and dispatch every reply of each read at once, until `close`.

        A lost connection, a silent one (see `_keep_alive`), or bytes hiredis cannot
        parse (nothing after them can be trusted), cost a warning and a reconnect
        after a backoff.
        """
        loop = asyncio.get_running_loop()
        try:
            while not self._closing:
                keep_alive: asyncio.Task[None] | None = None
                try:
                    stream = await self._connect()
                    self._last_read = loop.time()
                    keep_alive = asyncio.create_task(self._keep_alive(loop))
                    while True:
                        data = await stream.read(READ_SIZE)
                        if not data:
                            if self._closing:
                                return
                            if self._silenced:
                                raise ConnectionError(
                                    f"no reply to a ping within {self.timeout:g} s"
                                )
                            raise ConnectionError("closed by the server")
                        now = self._last_read = loop.time()
                        self.received(data, now)
                        if self._failures:
                            self._failures = 0
                except (OSError, hiredis.ProtocolError) as exc:
                    if self._closing:
                        return
                    self._disconnect()
                    self._failures += 1
                    logger.warning("pub/sub connection lost, reconnecting: %s", exc)
                    if self._failed is not None:
                        self._failed()
                    await asyncio.sleep(self.retry_delay())
                finally:
                    if keep_alive is not None:
                        keep_alive.cancel()
        finally:
            self._disconnect()

    async def _keep_alive(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ping the connection once it has been silent for `timeout`; drop it once silent
        for twice that. Costs nothing per message: reads only stamp `_last_read`."""
        self._silenced = False
        while True:
            await asyncio.sleep(self.timeout / 2)
            silent = loop.time() - self._last_read
            if silent >= 2 * self.timeout:
                self._silenced = True
                self._disconnect()  # ends the read in `listen`, which reconnects
                return
            writer = self._command_writer()
            if silent >= self.timeout and writer is not None:
                writer.write(_PING)

    async def _connect(self) -> asyncio.StreamReader:
        """(Re)connect, log in and subscribe every channel, the anchor last; counts start over."""
        self._disconnect()
        endpoint = self.endpoint
        try:
            async with asyncio.timeout(endpoint.connect_timeout):
                if endpoint.path is not None:
                    stream, writer = await asyncio.open_unix_connection(endpoint.path)
                else:
                    stream, writer = await asyncio.open_connection(
                        endpoint.host, endpoint.port, ssl=endpoint.tls
                    )
                self._writer = writer  # from here `close` can end a log-in that hangs
                replies = hiredis.Reader()
                await self._log_in(stream, writer, replies)
        except TimeoutError:
            raise ConnectionError(
                f"no answer within {endpoint.connect_timeout:g} s while connecting"
            ) from None
        if self._closing:  # closed while connecting, before the writer was there to close
            raise ConnectionError("pub/sub connection closed while connecting")
        # No await from here on: a channel subscribed meanwhile is in this SUBSCRIBE.
        self._replies = replies
        self._subscribes_sent.clear()
        self._subscribes_acked.clear()
        self._unanswered.clear()
        heard = [*dict.fromkeys([*self._listeners, *self._watchers])]
        channels = heard if self._anchor is None else [*heard, self._anchor]
        for channel in channels:
            self._subscribes_sent[channel] = 1
        for channel in self._listeners:
            self._confirmed_by[channel] = 1
        for channel in self._watchers:
            self._watch_confirmed_by[channel] = 1
        if self._sharded:
            # One SSUBSCRIBE each: channels of different slots in one are refused (CROSSSLOT).
            for channel in channels:
                self._write(writer, b"SSUBSCRIBE", channel)
        else:
            writer.write(_pack(b"SUBSCRIBE", *channels))
        self._subscribed = True
        return stream

    async def _log_in(
        self, stream: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: hiredis.Reader
    ) -> None:
        """AUTH and CLIENT SETNAME as the client would, each answered OK before going on."""
        endpoint = self.endpoint
        commands: list[tuple[str, ...]] = []
        if endpoint.credentials is not None:
            commands.append(("AUTH", *await endpoint.credentials.get_credentials_async()))
        if endpoint.client_name:
            commands.append(("CLIENT", "SETNAME", endpoint.client_name))
        if not commands:
            return
        writer.write(b"".join(_pack(*command) for command in commands))
        answers: list[object] = []
        while len(answers) < len(commands):
            data = await stream.read(READ_SIZE)
            if not data:
                raise ConnectionError("closed by the server while logging in")
            replies.feed(data)
            while len(answers) < len(commands) and (reply := replies.gets()) is not False:
                answers.append(reply)
        for command, answer in zip(commands, answers, strict=True):
            if isinstance(answer, hiredis.ReplyError):
                raise ConnectionError(f"{command[0]} refused: {answer}")

    def _disconnect(self) -> None:
        self._subscribed = False
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.transport.abort()

    def received(self, data: bytes, now: float) -> None:
        """Dispatch every reply `data` completes (a read may end inside one).

        Raises hiredis.ProtocolError where the bytes are not RESP.
        """
        replies = self._replies
        replies.feed(data)
        listeners = self._listeners
        watchers = self._watchers
        parse = self._parse
        malformed: list[ValueError] = []
        try:
            while (reply := replies.gets()) is not False:
                if not isinstance(reply, list):
                    if isinstance(reply, Exception):
                        self._refused(reply)
                    continue
                kind = reply[0]
                if kind == b"message" or kind == b"smessage":
                    # Mostly empty: a lookup only when something watches.
                    if watchers and (watcher := watchers.get(reply[1])) is not None:
                        watcher.dispatch(reply[2], now)
                    listener = listeners.get(reply[1])
                    if listener is not None:
                        try:
                            message = parse(reply[2])
                        except ValueError as exc:
                            malformed.append(exc)
                            listener.missed()
                            continue
                        listener.dispatch(message, now)
                elif kind == b"subscribe" or kind == b"ssubscribe":
                    self._confirmed(reply[1])
                elif kind == b"sunsubscribe":
                    self._sunsubscribed(reply[1])
        finally:
            if malformed:
                # One line per read: a flood of bad messages must not flood the log.
                logger.warning(
                    "dropped %d malformed live message(s), their readers re-check the log: %s",
                    len(malformed),
                    malformed[0],
                )

    def _refused(self, error: Exception) -> None:
        """An error reply; sharded, the answer to the oldest SSUBSCRIBE or SUNSUBSCRIBE."""
        logger.warning("pub/sub command failed: %s", error)
        if not self._unanswered:
            return
        command, channel = self._unanswered.popleft()
        if command == b"SSUBSCRIBE" and self._heard(channel) and self._lost is not None:
            self._lost(channel)  # not served here (MOVED): subscribed where it is

    def _sunsubscribed(self, channel: bytes) -> None:
        """Our SUNSUBSCRIBE answered, or the node let the channel go (its slot left it)."""
        if self._unanswered and self._unanswered[0] == (b"SUNSUBSCRIBE", channel):
            self._unanswered.popleft()
        elif self._heard(channel) and self._lost is not None:
            self._lost(channel)

    def _confirmed(self, channel: bytes) -> None:
        self._subscribes_acked[channel] += 1
        if self._unanswered and self._unanswered[0] == (b"SSUBSCRIBE", channel):
            self._unanswered.popleft()
        if channel == self._anchor:
            # (Re)connected: every channel is subscribed again. What was published while
            # none was must be looked for elsewhere.
            for each in list(self._listeners.values()):
                each.missed()
            for watching in list(self._watchers.values()):
                watching.missed()
        acked = self._subscribes_acked[channel]
        listener = self._listeners.get(channel)
        watcher = self._watchers.get(channel)
        if listener is None and watcher is None:
            self._forget(channel)
        if listener is not None and acked >= self._confirmed_by[channel]:
            if self._sharded:
                # No anchor: whatever was published while the channel was not subscribed
                # here (a reconnect, a move from another node) must be looked for elsewhere.
                listener.missed()
            listener.subscribed()
        if watcher is not None and acked >= self._watch_confirmed_by[channel]:
            if self._sharded:
                watcher.missed()
            watcher.subscribed()


class ShardedPubSub(Generic[Message]):
    """The hub's pub/sub on a Redis Cluster: one sharded `PubSubConnection` per primary
    that serves a subscribed channel (see the module docstring).

    A channel (its listener, its watcher, or both) goes to the primary that serves its
    slot in redis-py's slot map. When a node lets a channel go or refuses it, or its
    connection fails, the slot map is read again and every channel whose primary changed
    is subscribed on the new one (its listener and watcher are told they may have missed
    messages once that is confirmed). A connection left with no channel is closed. A
    primary that a failover made a replica may keep its channels (whether Redis lets them
    go then varies): it still delivers them, since Redis passes a shard's messages on to
    the shard's replicas.

    Trap: right after a failover or a migration, the node the map is read from may not
    know yet, and a replica accepts SSUBSCRIBE: a channel is not put back on the node
    that let it go until the map has said so for `STALE_MAP_TRIES` reads.
    """

    def __init__(
        self,
        cluster: RedisCluster,
        parse: Callable[[bytes], Message],
        *,
        timeout: float = SILENCE_TIMEOUT_SECONDS,
    ) -> None:
        self._cluster = cluster
        self._parse = parse
        self._timeout = timeout
        self._listeners: dict[bytes, Listener[Message]] = {}
        self._watchers: dict[bytes, Listener[bytes]] = {}
        self._node_of: dict[bytes, str] = {}  # channel -> name of the node it is subscribed on
        # Channels a node let go of or refused: that node's name, and maps read since.
        self._left: dict[bytes, tuple[str, int]] = {}
        self._connections: dict[str, PubSubConnection[Message]] = {}
        self._listening: set[asyncio.Task[None]] = set()
        self._moving = asyncio.Event()  # some channel must be placed again
        self._failures = 0
        self._closing = False
        self._started = False

    @property
    def connections(self) -> dict[str, PubSubConnection[Message]]:
        """The connection to each node, by node name ("host:port")."""
        return dict(self._connections)

    def retry_delay(self) -> float:
        """A pause before trying the cluster again, growing while moves keep failing."""
        delay: float = min(2.0, 0.05 * 2 ** min(self._failures, 6))
        return delay * (0.5 + random.random())

    def subscribe(self, channel: bytes, listener: Listener[Message]) -> None:
        self._listeners[channel] = listener
        name = self._node_of.get(channel)
        if name is None:
            self._place(channel)
        else:  # its watcher placed it
            self._connections[name].subscribe(channel, listener)

    def unsubscribe(self, channel: bytes) -> None:
        del self._listeners[channel]
        name = self._let_go(channel)
        if name is not None:
            self._connections[name].unsubscribe(channel)

    def watch(self, channel: bytes, watcher: Listener[bytes]) -> None:
        """As `PubSubConnection.watch`, on the node that serves `channel`."""
        self._watchers[channel] = watcher
        name = self._node_of.get(channel)
        if name is None:
            self._place(channel)
        else:  # its listener placed it
            self._connections[name].watch(channel, watcher)

    def unwatch(self, channel: bytes) -> None:
        del self._watchers[channel]
        name = self._let_go(channel)
        if name is not None:
            self._connections[name].unwatch(channel)

    def _let_go(self, channel: bytes) -> str | None:
        """The node `channel` is subscribed on; forgotten here once nothing hears it."""
        if channel in self._listeners or channel in self._watchers:
            return self._node_of.get(channel)
        self._left.pop(channel, None)
        return self._node_of.pop(channel, None)

    def _channels(self) -> list[bytes]:
        """Every channel a listener or a watcher hears."""
        return [*dict.fromkeys([*self._listeners, *self._watchers])]

    def _detach(self, name: str, channel: bytes) -> None:
        """Take `channel`'s listener and watcher off the connection to node `name`."""
        connection = self._connections[name]
        if channel in self._listeners:
            connection.unsubscribe(channel)
        if channel in self._watchers:
            connection.unwatch(channel)

    def close(self) -> None:
        """End `listen` and every node's connection."""
        self._closing = True
        self._moving.set()
        for connection in self._connections.values():
            connection.close()

    async def listen(self) -> None:
        """Run every node's connection, and place channels again when asked to, until `close`."""
        self._started = True
        for connection in self._connections.values():
            self._start(connection)
        try:
            while not self._closing:
                await self._moving.wait()
                self._moving.clear()
                if self._closing:
                    return
                await refresh_slot_map(self._cluster)
                if self._replace():
                    self._failures = 0
                else:
                    # Some channel is not served anywhere the map says yet (a failover
                    # under way): look again after a pause.
                    self._failures += 1
                    await asyncio.sleep(self.retry_delay())
                    self._moving.set()
        finally:
            self.close()
            await asyncio.gather(*self._listening, return_exceptions=True)

    def _place(self, channel: bytes) -> bool:
        """Subscribe `channel` on the primary the slot map names; False if it names none,
        or (for a while) the node that let the channel go."""
        try:
            node = node_of(self._cluster, channel)
        except SlotNotCoveredError:
            self._moving.set()
            return False
        left = self._left.pop(channel, None)
        if left is not None and left[0] == node.name and left[1] < STALE_MAP_TRIES:
            self._left[channel] = (left[0], left[1] + 1)
            return False
        connection = self._connections.get(node.name)
        if connection is None:
            connection = PubSubConnection(
                Endpoint.of_node(node),
                None,
                self._parse,
                lost=self._lost,
                failed=self._moving.set,
                timeout=self._timeout,
            )
            self._connections[node.name] = connection
            if self._started:
                self._start(connection)
        self._node_of[channel] = node.name
        listener = self._listeners.get(channel)
        if listener is not None:
            connection.subscribe(channel, listener)
        watcher = self._watchers.get(channel)
        if watcher is not None:
            connection.watch(channel, watcher)
        if left is not None:
            logger.info("live channel %r moved from %s to %s", channel, left[0], node.name)
        return True

    def _start(self, connection: PubSubConnection[Message]) -> None:
        endpoint = connection.endpoint
        task = asyncio.create_task(
            connection.listen(), name=f"hub-listen-{endpoint.host}:{endpoint.port}"
        )
        self._listening.add(task)
        task.add_done_callback(self._listening.discard)

    def _lost(self, channel: bytes) -> None:
        """A node let `channel` go, or refused it: drop it there, place it again."""
        name = self._node_of.pop(channel, None)
        if name is not None and (channel in self._listeners or channel in self._watchers):
            self._detach(name, channel)
            self._left[channel] = (name, 0)
        self._moving.set()

    def _replace(self) -> bool:
        """Every channel on the node the (fresh) slot map names; whether all found one."""
        placed = True
        for channel in self._channels():
            name = self._node_of.get(channel)
            try:
                if name is not None and node_of(self._cluster, channel).name == name:
                    continue
            except SlotNotCoveredError:
                placed = False
                continue
            if name is not None:
                del self._node_of[channel]
                self._detach(name, channel)
            placed = self._place(channel) and placed
        for name, connection in list(self._connections.items()):
            if not connection.channels:
                connection.close()
                del self._connections[name]
        return placed
