"""Cancel requests as a worker process receives them: one subscription to the cancel channel.

`GenerationLog.request_cancel` raises a generation's cancel flag and publishes its
id here; every worker hears it and the one running the generation stops it. A
message missed (pub/sub is at-most-once, e.g. during a reconnect) is not lost:
the flag is read back by the holder's next lease renewal.

A Redis that stops answering can keep the subscription's socket open (frozen, a
stalled host): a subscription silent for `timeout` is pinged, and one still silent
after another `timeout` is dropped and subscribed again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from types import TracebackType

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.keys import Keys
from app.store.transport import dedicated

logger = logging.getLogger("tokentape.store")

# Pause before reading again after the subscription's connection failed.
RECONNECT_SECONDS = 0.5


class CancelRequests:
    """The ids of generations whose cancel was requested, as they are published.

    `async with` subscribes (on a connection of its own) and returns once Redis
    confirmed it; `async for` then yields ids until the subscription is closed. A
    failed connection is reconnected and resubscribed (redis-py does both on the
    next read); a new `async for` continues on the same subscription.
    """

    def __init__(self, redis: Redis, keys: Keys, timeout: float) -> None:
        self._redis = dedicated(redis)
        self._pubsub = self._redis.pubsub()
        self._channel = keys.cancel_channel
        self.timeout = timeout

    async def __aenter__(self) -> CancelRequests:
        try:
            await self._pubsub.subscribe(self._channel)
            while True:
                message = await self._pubsub.get_message(timeout=None)
                if message is not None and message["type"] == "subscribe":
                    return self
        except BaseException:
            await self.aclose()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._redis.aclose()

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        heard = loop.time()  # anything from Redis: a message, a pong, a confirmation
        while True:
            try:
                # The bound covers a reconnect, whose log-in redis-py does not time.
                async with asyncio.timeout(2 * self.timeout):
                    message = await self._pubsub.get_message(timeout=self.timeout)
                    if message is None and loop.time() - heard < 2 * self.timeout:
                        await self._pubsub.ping()  # its pong is a message too
                        continue
                if message is None:
                    raise RedisTimeoutError(f"no reply to a ping within {self.timeout:g} s")
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning("cancel subscription failed: %s; reconnecting", exc)
                if self._pubsub.connection is not None:
                    # A read cut short leaves the socket mid-reply: the next one is new.
                    await self._pubsub.connection.disconnect()
                await asyncio.sleep(RECONNECT_SECONDS)
                heard = loop.time()
                continue
            heard = loop.time()
            if message["type"] != "message":
                continue
            try:
                generation_id = message["data"].decode()
            except UnicodeDecodeError:
                logger.warning("dropped a cancel request for %r: not a generation id", message)
                continue
            yield generation_id
