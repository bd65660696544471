"""The hub's pub/sub connection: one socket per process, read in bulk.

Not redis-py's PubSub: its get_message costs a coroutine chain, a dict and
observability hooks per message, ~19% of a busy reader's CPU. The connection is
opened here, to the server a redis-py client points at (address, TLS, credentials
and client name read from the client's settings), and speaks RESP through hiredis:
commands packed with `pack_command`, replies parsed many to a read.

It keeps the channel of every listener subscribed across reconnects. A channel
that is always subscribed (the anchor) is listed last when (re)connecting: its
confirmation says every channel before it is subscribed again, and every listener
is told it may have missed messages.

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
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.credentials import CredentialProvider, UsernamePasswordCredentialProvider

logger = logging.getLogger(__name__)

READ_SIZE = 64 * 1024  # per read of the connection
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
        connection = pool.connection_class(**pool.connection_kwargs)
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
    """

    def __init__(
        self,
        endpoint: Endpoint,
        anchor: bytes,
        parse: Callable[[bytes], Message],
        *,
        timeout: float = SILENCE_TIMEOUT_SECONDS,
    ):
        self.endpoint = endpoint
        self.timeout = timeout
        self._anchor = anchor
        self._parse = parse
        self._listeners: dict[bytes, Listener[Message]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._subscribed = False  # the (re)connect subscribed every channel: commands may go out
        self._replies = hiredis.Reader()
        # Per connection: a reconnect starts both at the SUBSCRIBE that lists every channel.
        self._subscribes_sent: collections.Counter[bytes] = collections.Counter()
        self._subscribes_acked: collections.Counter[bytes] = collections.Counter()
        # Which SUBSCRIBE of its channel confirms a listener.
        self._confirmed_by: dict[bytes, int] = {}
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
            writer.write(_pack(b"SUBSCRIBE", channel))

    def unsubscribe(self, channel: bytes) -> None:
        del self._listeners[channel]
        del self._confirmed_by[channel]
        self._forget(channel)
        writer = self._command_writer()
        if writer is not None:
            writer.write(_pack(b"UNSUBSCRIBE", channel))

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
        if channel not in self._listeners and (
            self._subscribes_acked[channel] >= self._subscribes_sent[channel]
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
        channels = [*self._listeners, self._anchor]
        for channel in channels:
            self._subscribes_sent[channel] = 1
        for channel in self._listeners:
            self._confirmed_by[channel] = 1
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
        parse = self._parse
        malformed: list[ValueError] = []
        try:
            while (reply := replies.gets()) is not False:
                if not isinstance(reply, list):
                    if isinstance(reply, Exception):
                        logger.warning("pub/sub command failed: %s", reply)
                    continue
                kind = reply[0]
                if kind == b"message":
                    listener = listeners.get(reply[1])
                    if listener is not None:
                        try:
                            message = parse(reply[2])
                        except ValueError as exc:
                            malformed.append(exc)
                            listener.missed()
                            continue
                        listener.dispatch(message, now)
                elif kind == b"subscribe":
                    self._confirmed(reply[1])
        finally:
            if malformed:
                # One line per read: a flood of bad messages must not flood the log.
                logger.warning(
                    "dropped %d malformed live message(s), their readers re-check the log: %s",
                    len(malformed),
                    malformed[0],
                )

    def _confirmed(self, channel: bytes) -> None:
        self._subscribes_acked[channel] += 1
        if channel == self._anchor:
            # (Re)connected: every channel is subscribed again. What was published while
            # none was must be looked for elsewhere.
            for each in list(self._listeners.values()):
                each.missed()
        listener = self._listeners.get(channel)
        if listener is None:
            self._forget(channel)
        elif self._subscribes_acked[channel] >= self._confirmed_by[channel]:
            listener.subscribed()
