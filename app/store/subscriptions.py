"""Durable Streams' subscriptions kept in Redis: their cursors, their wakes, the registry every
reader matches writes against, and the deliveries due.

Each subscription's keys share the hash tag `{dssub:<id>}` (`app.keys.Keys.subscription_keys`)
and every change of its state is one Lua script over them (`app.store.subscription_scripts`):
issuing a wake, handing its delivery to one reader, acking, fencing. Streams live in slots of
their own, so what a script needs of them (their tails) is read first and passed in.

Beside them, under `{dssubs}`: the registry (each subscription's pattern and explicit
streams, which every reader caches and matches its writes against), the deliveries due (a
sorted set of subscription ids by the time their delivery or lease is due, which every
reader's delivery loop polls), and the seed webhooks are signed from when there is no
secret. On a cluster these are in another slot than the subscriptions: each script answers
when its subscription is next due, and the caller files that in the sorted set after it; a
reader that dies in between leaves the sweep to file it (`app.durable_streams.delivery`).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app.durable_streams.errors import (
    AlreadyClaimed,
    InvalidAckOffset,
    InvalidSubscriptionRequest,
    NoPendingWork,
    SubscriptionExists,
    SubscriptionNotFound,
    WakeFenced,
)
from app.durable_streams.subscriptions import (
    PULL_WAKE,
    WEBHOOK,
    Interest,
    StreamLink,
    Subscription,
    SubscriptionConfig,
    Wake,
    decode_config,
    encode_config,
)
from app.keys import Keys
from app.settings import Settings
from app.store.cluster import ClusterRoutes, routes_for
from app.store.scripts import A, Reply, Script, UnexpectedReply
from app.store.state import map_reply, scored_reply
from app.store.subscription_scripts import (
    SUB_ACK,
    SUB_ATTEMPT,
    SUB_CLAIM,
    SUB_CREATE,
    SUB_DELIVER,
    SUB_DELIVERED,
    SUB_FAILED,
    SUB_READ,
    SUB_RELEASE,
    SUB_STREAMS,
    SUB_TOUCH,
    AckArgs,
    AttemptArgs,
    ClaimArgs,
    CreateSubscriptionArgs,
    DeliverArgs,
    DeliveredArgs,
    FailedArgs,
    NoArgs,
    ReleaseArgs,
    StreamsArgs,
    SubscriptionKeys,
    TouchArgs,
)
from app.store.transport import Pipeline

# A wake's fresh id, made for every call that may issue one (used only when one is).
_WAKE_ID_BYTES = 12


def _new_wake_id() -> str:
    return f"w_{secrets.token_hex(_WAKE_ID_BYTES)}"


def _links(flat: Sequence[bytes]) -> tuple[StreamLink, ...]:
    return tuple(
        StreamLink(
            path=flat[i].decode(),
            explicit=b"e" in flat[i + 1],
            acked_seq=int(flat[i + 2]),
            tail_seq=int(flat[i + 3]),
        )
        for i in range(0, len(flat), 4)
    )


def _missing(subscription_id: str) -> SubscriptionNotFound:
    return SubscriptionNotFound(message=f"no subscription {subscription_id}")


class SubscriptionStore:
    """All reads and writes of subscriptions go through here.

    Built on a Redis client its caller owns (a `RedisCluster` for a cluster); nothing
    outside `app.store` sends commands on that client.
    """

    def __init__(self, redis: Redis | RedisCluster, settings: Settings) -> None:
        self.keys = Keys(settings.key_prefix, settings.key_shards)
        timeout = settings.redis_timeout_seconds
        routes = routes_for(redis, timeout)
        self.sharded = isinstance(routes, ClusterRoutes)
        self._publish = b"SPUBLISH" if self.sharded else b"PUBLISH"
        self._commands = Pipeline(routes, in_flight=1, timeout=timeout)

    def _keys(self, subscription_id: str) -> SubscriptionKeys:
        return SubscriptionKeys(*self.keys.subscription_keys(subscription_id))

    async def _script(
        self,
        script: Script[SubscriptionKeys, A],
        subscription_id: str,
        args: A,
        rest: Sequence[str | bytes] = (),
    ) -> tuple[Reply, list[Any]]:
        reply: list[Any] = await self._commands.run_script(
            script, self._keys(subscription_id), args, rest
        )
        return script.reply(reply[0]), reply

    # -- the registry ---------------------------------------------------------

    @property
    def registry_channel(self) -> str:
        return self.keys.subscription_registry_channel

    async def registry(self) -> dict[str, Interest]:
        """Every subscription's interest, by id."""
        reply = await self._commands.run(b"HGETALL", self.keys.subscription_registry)
        return {
            subscription_id.decode(): Interest.decode(interest)
            for subscription_id, interest in map_reply(reply).items()
        }

    async def register(self, subscription_id: str, interest: Interest | None) -> None:
        """File (None: take away) a subscription's interest, and tell every reader."""
        registry = self.keys.subscription_registry
        if interest is None:
            await self._commands.run(b"HDEL", registry, subscription_id)
        else:
            await self._commands.run(b"HSET", registry, subscription_id, interest.encode())
        await self._commands.run(self._publish, self.registry_channel, subscription_id)

    # -- deliveries due -------------------------------------------------------

    async def schedule(self, subscription_id: str, due: bytes | str) -> None:
        """File when the subscription is next due (epoch ms; empty: never)."""
        if due:
            await self._commands.run(b"ZADD", self.keys.subscriptions_due, due, subscription_id)
        else:
            await self._commands.run(b"ZREM", self.keys.subscriptions_due, subscription_id)

    async def due(self, limit: int) -> tuple[list[str], int | None, int]:
        """Up to `limit` subscriptions due now, the time the next one is due (None: none
        is), and now, by Redis's clock (the one the scripts use)."""
        due_key = self.keys.subscriptions_due
        # One round trip: the clock of the node that holds the sorted set, and its head.
        clock, first = await asyncio.gather(
            self._commands.submit(b"TIME", key=due_key),
            self._commands.submit(b"ZRANGE", due_key, 0, limit, b"WITHSCORES"),
        )
        now = int(clock[0]) * 1000 + int(clock[1]) // 1000
        head = scored_reply(first)
        ready = [subscription_id for score, subscription_id in head if score <= now]
        later = [score for score, _ in head if score > now]
        return ready[:limit], int(min(later)) if later else None, now

    async def take_sweep(self, holder: str, seconds: float) -> bool:
        """Whether the sweep of every subscription is `holder`'s turn for `seconds`."""
        taken = await self._commands.run(
            b"SET", self.keys.subscription_sweep, holder, b"NX", b"PX", int(seconds * 1000)
        )
        return taken is not None

    async def signing_seed(self) -> bytes:
        """The service's random seed of webhook signing keys, made by the first caller."""
        key = self.keys.webhook_signing_seed
        await self._commands.run(b"SET", key, secrets.token_hex(32), b"NX")
        seed: bytes = await self._commands.run(b"GET", key)
        return seed

    # -- create, read, delete -----------------------------------------------------

    async def existing_hash(self, subscription_id: str) -> str | None:
        """The configuration hash of the subscription, None if there is none."""
        meta = self._keys(subscription_id).meta
        found: bytes | None = await self._commands.run(b"HGET", meta, "config_hash")
        return None if found is None else found.decode()

    async def create(
        self,
        subscription_id: str,
        config: SubscriptionConfig,
        callback_base: str,
        links: Sequence[tuple[str, str, int]],
    ) -> bool:
        """Create the subscription with `links` (path, 'e' or 'g', tail); False if it exists
        with this configuration, SUBSCRIPTION_ALREADY_EXISTS with another."""
        code, _ = await self._script(
            SUB_CREATE,
            subscription_id,
            CreateSubscriptionArgs(
                config=encode_config(config),
                config_hash=config.config_hash,
                subscription_type=config.type,
                lease_ttl_ms=config.lease_ttl_ms,
                callback_base=callback_base,
                token_key=secrets.token_hex(32),
                incarnation=secrets.token_urlsafe(12),
            ),
            [part for path, kind, tail in links for part in (path, kind, str(tail))],
        )
        if code is Reply.CONFLICT:
            raise SubscriptionExists(
                message=f"subscription {subscription_id} exists with another configuration"
            )
        return code is Reply.CREATED

    async def read(self, subscription_id: str) -> Subscription:
        code, reply = await self._script(SUB_READ, subscription_id, NoArgs())
        if code is Reply.MISSING:
            raise _missing(subscription_id)
        flat = reply[1]
        meta = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
        return Subscription(
            id=subscription_id,
            config=decode_config(meta[b"config"]),
            created_ms=int(meta[b"created_ms"]),
            failing=meta.get(b"status") == b"failed",
            links=_links(reply[2]),
        )

    async def delete(self, subscription_id: str) -> None:
        """Delete the subscription (if there is one): its tokens, wake and cursors go."""
        await self._commands.run(b"DEL", *self._keys(subscription_id))
        await self.register(subscription_id, None)
        await self.schedule(subscription_id, "")

    async def add_streams(
        self, subscription_id: str, tails: Sequence[tuple[str, int]]
    ) -> list[str]:
        """Link `tails` (path, tail) explicitly, cursors at their tails; the explicit paths now."""
        rest = [part for path, tail in tails for part in (path, str(tail))]
        return await self._streams(subscription_id, "add", rest)

    async def remove_stream(self, subscription_id: str, path: str) -> list[str]:
        """Take `path`'s explicit link away; the explicit paths now."""
        return await self._streams(subscription_id, "remove", [path])

    async def _streams(self, subscription_id: str, op: str, rest: Sequence[str]) -> list[str]:
        code, reply = await self._script(SUB_STREAMS, subscription_id, StreamsArgs(op), rest)
        if code is Reply.MISSING:
            raise _missing(subscription_id)
        return [path.decode() for path in reply[1:]]

    # -- wakes --------------------------------------------------------------------

    async def touch(self, subscription_id: str, writes: Sequence[tuple[str, int, str]]) -> bool:
        """Streams were written to (path, tail, how: see sub_touch.lua); whether a wake
        was issued. A subscription gone meanwhile is no error."""
        rest = [part for path, tail, how in writes for part in (path, str(tail), how)]
        code, reply = await self._script(
            SUB_TOUCH, subscription_id, TouchArgs(_new_wake_id()), rest
        )
        if code is Reply.MISSING:
            return False
        await self.schedule(subscription_id, reply[1])
        return code is Reply.WOKEN

    def _wake(self, subscription_id: str, reply: list[Any]) -> Wake:
        config = decode_config(reply[5])
        return Wake(
            subscription_id=subscription_id,
            type=config.type,
            generation=int(reply[2]),
            wake_id=reply[3].decode(),
            lease_ttl_ms=config.lease_ttl_ms,
            retry_count=int(reply[4]),
            webhook_url=config.webhook_url or "",
            wake_stream=config.wake_stream or "",
            callback_base=reply[6].decode(),
            token_key=bytes.fromhex(reply[7].decode()),
            links=_links(reply[8]),
        )

    async def deliver(self, subscription_id: str, attempt_ms: int) -> Wake | None:
        """The subscription's wake if its delivery is due and now the caller's to make (for
        `attempt_ms`); None if not. Ends a lease that ran out, issues a wake that is owed."""
        code, reply = await self._script(
            SUB_DELIVER, subscription_id, DeliverArgs(_new_wake_id(), attempt_ms)
        )
        if code is Reply.MISSING:
            await self.schedule(subscription_id, "")
            return None
        await self.schedule(subscription_id, reply[1])
        return self._wake(subscription_id, reply) if code is Reply.DELIVER else None

    async def attempt(self, wake: Wake, attempt_ms: int) -> Wake | None:
        """`wake` again for another attempt (its tails as of now); None if it is over."""
        code, reply = await self._script(
            SUB_ATTEMPT,
            wake.subscription_id,
            AttemptArgs(wake.generation, wake.wake_id, attempt_ms),
        )
        if code is Reply.MISSING:
            return None
        await self.schedule(wake.subscription_id, reply[1])
        return self._wake(wake.subscription_id, reply) if code is Reply.DELIVER else None

    async def delivered(self, wake: Wake, *, done: bool) -> None:
        code, reply = await self._script(
            SUB_DELIVERED,
            wake.subscription_id,
            DeliveredArgs(wake.generation, wake.wake_id, "1" if done else "", _new_wake_id()),
        )
        if code is not Reply.MISSING:
            await self.schedule(wake.subscription_id, reply[1])

    async def failed(self, wake: Wake, delay_ms: int, attempt_ms: int) -> bool:
        """Record a failed delivery, to be tried again in `delay_ms`; whether `wake` is
        still the subscription's to deliver."""
        code, reply = await self._script(
            SUB_FAILED,
            wake.subscription_id,
            FailedArgs(wake.generation, wake.wake_id, delay_ms, attempt_ms),
        )
        if code is Reply.MISSING:
            return False
        await self.schedule(wake.subscription_id, reply[1])
        return code is Reply.RETRY

    # -- workers and receivers ------------------------------------------------------

    async def claim(self, subscription_id: str, worker: str) -> Wake:
        code, reply = await self._script(
            SUB_CLAIM, subscription_id, ClaimArgs(worker, _new_wake_id())
        )
        if code is Reply.MISSING:
            raise _missing(subscription_id)
        if code is Reply.WRONG_TYPE:
            raise InvalidSubscriptionRequest(message="only a pull-wake subscription is claimed")
        if code is Reply.CLAIMED:
            raise AlreadyClaimed(reply[1].decode(), int(reply[2]))
        if code is Reply.IDLE:
            raise NoPendingWork(message=f"subscription {subscription_id} has no pending work")
        await self.schedule(subscription_id, reply[1])
        return self._wake(subscription_id, reply)

    async def token_key(self, subscription_id: str) -> tuple[bytes, str]:
        """The key the subscription's tokens are signed with, and its incarnation."""
        key, incarnation = await self._commands.run(
            b"HMGET", self._keys(subscription_id).meta, "token_key", "incarnation"
        )
        if key is None:
            raise _missing(subscription_id)
        return bytes.fromhex(key.decode()), incarnation.decode()

    async def ack(
        self,
        subscription_id: str,
        *,
        webhook: bool,
        incarnation: str,
        generation: int,
        wake_id: str,
        acks: Sequence[tuple[str, int, int | None]],
        done: bool,
    ) -> bool:
        """Apply a callback's (`webhook`) or a worker's acks (path, seq, the stream's tail);
        whether a new wake was issued."""
        code, reply = await self._script(
            SUB_ACK,
            subscription_id,
            AckArgs(
                subscription_type=WEBHOOK if webhook else PULL_WAKE,
                incarnation=incarnation,
                generation=generation,
                wake_id=wake_id,
                done="1" if done else "",
                new_wake_id=_new_wake_id(),
            ),
            [
                part
                for path, seq, tail in acks
                for part in (path, str(seq), "" if tail is None else str(tail))
            ],
        )
        self._refused(subscription_id, code, reply, webhook=webhook)
        await self.schedule(subscription_id, reply[1])
        return bool(reply[2] == b"1")

    async def release(
        self, subscription_id: str, *, incarnation: str, generation: int, wake_id: str
    ) -> None:
        code, reply = await self._script(
            SUB_RELEASE,
            subscription_id,
            ReleaseArgs(incarnation, generation, wake_id, _new_wake_id()),
        )
        self._refused(subscription_id, code, reply, webhook=False)
        await self.schedule(subscription_id, reply[1])

    @staticmethod
    def _refused(subscription_id: str, code: Reply, reply: list[Any], *, webhook: bool) -> None:
        if code is Reply.OK:
            return
        if code is Reply.MISSING:
            raise _missing(subscription_id)
        if code is Reply.WRONG_TYPE:
            kind = "a webhook's callback" if webhook else "a pull-wake's"
            raise InvalidSubscriptionRequest(
                message=f"subscription {subscription_id} is not {kind}"
            )
        if code is Reply.FENCED:
            raise WakeFenced(message="that wake is over: its generation or wake_id is stale")
        if code is Reply.INVALID_OFFSET:
            why, path = reply[1].decode(), reply[2].decode()
            raise InvalidAckOffset(
                message={
                    "unknown": f"the subscription links no stream {path}",
                    "behind": f"the ack of {path} is before its acked offset",
                    "beyond": f"the ack of {path} is past the stream's tail",
                }[why]
            )
        raise UnexpectedReply(f"a subscription script answered {code.value!r}")
