"""Cancel requests as a worker process receives them: one subscription to every shard's
cancel channel.

`GenerationLog.request_cancel` raises a generation's cancel flag and publishes its
id on the cancel channel of its shard; every worker hears it and the one running
the generation stops it. A message missed (pub/sub is at-most-once, e.g. during a
reconnect) is not lost: the flag is read back by the holder's next lease renewal.

On a cluster the channels are sharded (SSUBSCRIBE): redis-py's `ClusterPubSub`
keeps a connection to each node that serves one and moves a channel when its slot
moves; each such connection is read by a task of its own, so a request is heard as
soon as it is published, whichever node it comes from.

A Redis that stops answering can keep the subscription's socket open (frozen, a
stalled host): on one Redis, a subscription silent for `timeout` is pinged, and one
still silent after another `timeout` is dropped and subscribed again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.keys import Shard
from app.store.transport import dedicated

logger = logging.getLogger("tokentape.store")

# Pause before reading again after the subscription's connection failed.
RECONNECT_SECONDS = 0.5
# On a cluster: how often the nodes that serve the channels are looked at again (each
# node's read waits this long at most, so one that left the cluster is let go of).
NODE_CHECK_SECONDS = 1.0


class CancelRequests:
    """The ids of generations whose cancel was requested, as they are published.

    `async with` subscribes (on a connection of its own) and returns once Redis
    confirmed it; `async for` then yields ids until the subscription is closed. A
    failed connection is reconnected and resubscribed (redis-py does both on the
    next read); a new `async for` continues on the same subscription.
    """

    def __init__(
        self, redis: Redis | RedisCluster, shards: Sequence[Shard], timeout: float
    ) -> None:
        self._channels = [shard.cancel_channel.encode() for shard in shards]
        self.timeout = timeout
        self._redis: Redis | None = None
        self._pubsub: PubSub
        self._sharded: ClusterPubSub | None = None
        if isinstance(redis, RedisCluster):
            self._pubsub = self._sharded = redis.pubsub()
        else:
            self._redis = dedicated(redis)
            self._pubsub = self._redis.pubsub()
        # Cluster: what each node's reader took off its connection, in arrival order.
        self._arrived: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._follower: asyncio.Task[None] | None = None

    async def __aenter__(self) -> CancelRequests:
        try:
            if self._sharded is not None:
                await self._sharded.ssubscribe(*self._channels)
                self._follower = asyncio.create_task(self._follow_nodes(self._sharded))
            else:
                await self._pubsub.subscribe(*self._channels)
            confirmed: set[bytes] = set()
            while len(confirmed) < len(self._channels):
                message = await self._next()
                if message is not None and message["type"] in ("subscribe", "ssubscribe"):
                    confirmed.add(message["channel"])
            return self
        except BaseException:
            await self.aclose()
            raise

    async def _next(self) -> dict[str, Any] | None:
        if self._sharded is None:
            message: dict[str, Any] | None = await self._pubsub.get_message(timeout=None)
            return message
        return await self._arrived.get()

    async def _follow_nodes(self, pubsub: ClusterPubSub) -> None:
        """Keep a reader on every node that holds one of the channels."""
        while True:
            for name in list(pubsub.node_pubsub_mapping):
                reader = self._readers.get(name)
                if reader is None or reader.done():
                    self._readers[name] = asyncio.create_task(self._read_node(pubsub, name))
            await asyncio.sleep(NODE_CHECK_SECONDS)

    async def _read_node(self, pubsub: ClusterPubSub, name: str) -> None:
        while name in pubsub.node_pubsub_mapping:
            node = pubsub.cluster.get_node(node_name=name)
            if node is None:
                return
            try:
                message = await pubsub.get_sharded_message(
                    target_node=node, timeout=NODE_CHECK_SECONDS
                )
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning("cancel subscription on %s failed: %s; reconnecting", name, exc)
                await asyncio.sleep(RECONNECT_SECONDS)
                continue
            if message is not None:
                self._arrived.put_nowait(message)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        tasks = [task for task in (self._follower, *self._readers.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        if self._redis is not None:
            await self._redis.aclose()

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        heard = loop.time()  # anything from Redis: a message, a pong, a confirmation
        while True:
            try:
                if self._sharded is not None:
                    message = await self._arrived.get()
                else:
                    # The bound covers a reconnect, whose log-in redis-py does not time.
                    async with asyncio.timeout(2 * self.timeout):
                        received = await self._pubsub.get_message(timeout=self.timeout)
                        if received is None and loop.time() - heard < 2 * self.timeout:
                            await self._pubsub.ping()  # its pong is a message too
                            continue
                    if received is None:
                        raise RedisTimeoutError(f"no reply to a ping within {self.timeout:g} s")
                    message = received
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning("cancel subscription failed: %s; reconnecting", exc)
                if self._sharded is None and self._pubsub.connection is not None:
                    # A read cut short leaves the socket mid-reply: the next one is new.
                    await self._pubsub.connection.disconnect()
                await asyncio.sleep(RECONNECT_SECONDS)
                heard = loop.time()
                continue
            heard = loop.time()
            if message["type"] not in ("message", "smessage"):
                continue
            try:
                generation_id = message["data"].decode()
            except UnicodeDecodeError:
                logger.warning("dropped a cancel request for %r: not a generation id", message)
                continue
            yield generation_id
