"""Wakes the requests that wait for the next write to a stream (Durable Streams'
long-poll and SSE reads).

The channels requests here wait on ride the hub's pub/sub connection, beside the
generations' live batches: one connection per process for everything (on a Redis
Cluster, one per primary, each channel on the primary of its slot, sharded). A request
watches a channel, reads, then waits: subscribed (confirmed by Redis) before it
reads, it cannot miss a write made between its read and its wait. Every write script
publishes on the stream's channel; a wake-up means "read again", nothing more, so
the payload is not parsed. Pub/sub is at-most-once: once the connection is back
after a loss, every watch is woken to read again, so a lost message costs a read,
never an append. On a cluster a channel whose slot moves is subscribed again on its new
primary, and its watches are woken to read again once that is confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from app.hub.fanout import Hub
from app.hub.pubsub import Changes, Confirmable

# A channel nobody waits on stays subscribed this long: a reader that long-polls in a
# loop comes back within it, and SUBSCRIBE/UNSUBSCRIBE do not churn.
LINGER_SECONDS = 5.0


class Watch:
    """One request's view of one channel."""

    __slots__ = ("_future", "_woken", "closed")

    def __init__(self) -> None:
        self._woken = False
        self._future: asyncio.Future[None] | None = None
        self.closed = False  # the notifier stopped: no wake-up will come

    async def wait_for_append(self, within: float) -> bool:
        """True once the stream was written to since the last call (or since the watch
        began), False when `within` seconds passed without a write, or at once once the
        notifier stopped."""
        if not self._woken:
            if self.closed:
                return False
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

    def close(self) -> None:
        """Woken to read once more; no wait after that."""
        self.closed = True
        self.wake()


class _Channel(Confirmable):
    """Every watch of one channel here: the channel's watcher on the hub."""

    __slots__ = ("joining", "linger", "watches")

    def __init__(self) -> None:
        super().__init__()
        self.watches: set[Watch] = set()
        # Watches waiting for the confirmation: they have not read yet, nothing to wake.
        self.joining: set[Watch] = set()
        self.linger: asyncio.TimerHandle | None = None

    def wake(self) -> None:
        for watch in self.watches:
            watch.wake()

    # -- as the hub's watcher of the channel ---------------------------------

    def dispatch(self, message: bytes, now: float) -> None:
        self.wake()

    def missed(self) -> None:
        self.wake()


class StreamNotifier:
    """Per-process wake-ups for requests waiting on streams: see the module docstring."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._channels: dict[bytes, _Channel] = {}
        self._watches_changed = Changes()  # a watch began or ended

    @contextlib.asynccontextmanager
    async def watch(self, channel: str) -> AsyncIterator[Watch]:
        """Subscribed to `channel` (confirmed by Redis) while the block runs."""
        key = channel.encode()
        record = self._channels.get(key)
        if record is None:
            record = self._channels[key] = _Channel()
            self._hub.pubsub.watch(key, record)
        elif record.linger is not None:
            record.linger.cancel()
            record.linger = None
        watch = Watch()
        record.joining.add(watch)
        try:
            await record.until_confirmed()
            record.joining.discard(watch)
            record.watches.add(watch)
            self._watches_changed.announce()
            yield watch
        finally:
            record.joining.discard(watch)
            record.watches.discard(watch)
            self._watches_changed.announce()
            self._linger(key, record)

    async def until_watchers(self, channel: str, count: int) -> None:
        """Until `count` requests here watch `channel`, their subscription confirmed."""

        def watchers() -> int:
            record = self._channels.get(channel.encode())
            return len(record.watches) if record and record.confirmed else 0

        await self._watches_changed.until(lambda: watchers() == count)

    @staticmethod
    def _unwatched(record: _Channel) -> bool:
        return not record.watches and not record.joining

    def _linger(self, key: bytes, record: _Channel) -> None:
        """Let go of a channel nobody watches any more, unless a watch begins meanwhile."""
        if self._unwatched(record) and record.linger is None and self._channels.get(key) is record:
            record.linger = asyncio.get_running_loop().call_later(
                LINGER_SECONDS, self._unwatch, key, record
            )

    def _unwatch(self, key: bytes, record: _Channel) -> None:
        record.linger = None
        if not self._unwatched(record) or self._channels.get(key) is not record:
            return
        del self._channels[key]
        self._hub.pubsub.unwatch(key)

    def stop(self) -> None:
        """Let go of every channel; the watches still open read once more, and wait no more."""
        for key, record in self._channels.items():
            if record.linger is not None:
                record.linger.cancel()
            for watch in record.watches | record.joining:
                watch.close()
            self._hub.pubsub.unwatch(key)
        self._channels.clear()
