"""Wakes the readers that wait for the next write to a stream (long-poll and SSE).

One pub/sub connection per process, opened when the first reader waits, carries
every channel that some request here waits on. A reader watches a channel, reads,
then waits: subscribed before it reads, it cannot miss a write made between its read
and its wait. Every write script publishes on the stream's channel; a wake-up means
"read again", nothing more, so the payload is not parsed. Pub/sub is at-most-once:
when the connection drops, every watcher is woken to read again, so a lost message
costs a read, never an append.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from app import loops

logger = logging.getLogger(__name__)

# A channel nobody waits on stays subscribed this long: a reader that long-polls in a
# loop comes back within it, and SUBSCRIBE/UNSUBSCRIBE do not churn.
LINGER_SECONDS = 5.0
RECONNECT_SECONDS = 0.5


class Watch:
    """One request's view of one channel."""

    __slots__ = ("_future", "_woken")

    def __init__(self) -> None:
        self._woken = False
        self._future: asyncio.Future[None] | None = None

    async def wait_for_append(self, within: float) -> bool:
        """True once the stream was written to since the last call (or since the watch
        began), False when `within` seconds passed without a write."""
        if not self._woken:
            self._future = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(within):
                    await self._future
            except TimeoutError:
                return False
            finally:
                self._future = None
        self._woken = False
        return True

    def wake(self) -> None:
        self._woken = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)


@dataclasses.dataclass
class _Channel:
    subscribed: asyncio.Future[None]  # done once Redis confirmed the subscription
    watches: set[Watch] = dataclasses.field(default_factory=set)
    unsubscribing: asyncio.Future[None] | None = None
    linger: asyncio.TimerHandle | None = None


class StreamNotifier:
    """Per-process wake-ups for readers waiting on streams: see the module docstring."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pubsub: PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._channels: dict[bytes, _Channel] = {}
        self._unsubscribing: set[asyncio.Task[None]] = set()
        # Resolved, and replaced, whenever a watch begins or ends.
        self._changed: asyncio.Future[None] | None = None

    @contextlib.asynccontextmanager
    async def watch(self, channel: str) -> AsyncIterator[Watch]:
        """Subscribed to `channel` (confirmed by Redis) while the block runs."""
        key = channel.encode()
        record = await self._subscribed(key)
        watch = Watch()
        record.watches.add(watch)
        if record.linger is not None:
            record.linger.cancel()
            record.linger = None
        try:
            await asyncio.shield(record.subscribed)
            self._announce_change()
            yield watch
        finally:
            record.watches.discard(watch)
            self._announce_change()
            if not record.watches and record.unsubscribing is None:
                record.linger = asyncio.get_running_loop().call_later(
                    LINGER_SECONDS, self._unsubscribe, key
                )

    async def until_watchers(self, channel: str, count: int) -> None:
        """Until `count` requests here watch `channel`, their subscription confirmed."""

        def watchers() -> int:
            record = self._channels.get(channel.encode())
            return len(record.watches) if record and record.subscribed.done() else 0

        while watchers() != count:
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._changed)

    def _announce_change(self) -> None:
        if self._changed is not None:
            self._changed.set_result(None)
            self._changed = None

    async def _subscribed(self, key: bytes) -> _Channel:
        loop = asyncio.get_running_loop()
        while (record := self._channels.get(key)) is not None:
            if record.unsubscribing is None:
                return record
            # A confirmation of the old subscription must not count for the new one.
            await asyncio.shield(record.unsubscribing)
        record = _Channel(loop.create_future())
        self._channels[key] = record
        try:
            if self._pubsub is None:
                self._pubsub = self._redis.pubsub()
            await self._pubsub.subscribe(key)
        except BaseException as exc:
            del self._channels[key]
            record.subscribed.set_exception(exc if isinstance(exc, Exception) else RedisError())
            record.subscribed.exception()  # retrieved: no "never retrieved" warning
            raise
        if self._listener is None:
            self._listener = loops.start("stream-notifier", self._listen)
        return record

    def _unsubscribe(self, key: bytes) -> None:
        record = self._channels.get(key)
        if record is None or record.watches or self._pubsub is None:
            return
        record.linger = None
        record.unsubscribing = asyncio.get_running_loop().create_future()
        pubsub = self._pubsub

        async def unsubscribe() -> None:
            try:
                await pubsub.unsubscribe(key)
            except (RedisError, OSError):
                self._forget(key)  # the reconnect resubscribes it; nobody waits on it

        task = asyncio.create_task(unsubscribe())
        self._unsubscribing.add(task)
        task.add_done_callback(self._unsubscribing.discard)

    def _forget(self, key: bytes) -> None:
        record = self._channels.pop(key, None)
        if record is not None and record.unsubscribing and not record.unsubscribing.done():
            record.unsubscribing.set_result(None)

    async def _listen(self) -> None:
        assert self._pubsub is not None
        while True:
            try:
                message = await self._pubsub.get_message(timeout=None)
            except (RedisError, OSError) as exc:
                logger.warning("stream notifier: pub/sub connection lost: %s", exc)
                self._connection_lost()
                await asyncio.sleep(RECONNECT_SECONDS)
                continue
            if message is None:
                continue
            record = self._channels.get(message["channel"])
            if record is None:
                continue
            kind = message["type"]
            if kind == "message":
                for watch in record.watches:
                    watch.wake()
            elif kind == "subscribe":
                if not record.subscribed.done():
                    record.subscribed.set_result(None)
                else:
                    # Subscribed again after a reconnect: what was published in between is lost.
                    for watch in record.watches:
                        watch.wake()
            elif kind == "unsubscribe" and record.unsubscribing is not None:
                self._forget(message["channel"])

    def _connection_lost(self) -> None:
        for key, record in list(self._channels.items()):
            if record.unsubscribing is not None:
                self._forget(key)
            for watch in record.watches:
                watch.wake()

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        for record in self._channels.values():
            if record.linger is not None:
                record.linger.cancel()
            for watch in record.watches:
                watch.wake()
        self._channels.clear()
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            self._pubsub = None
