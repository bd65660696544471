"""Subscriptions in a reader: the API's work across streams and subscriptions, what a write
does to them, and delivering their wakes.

- **Writes.** After a write to a stream (a create with data, an append), the reader matches
  the stream against every subscription's interest (the registry, cached here and read
  again whenever any reader changes it) and touches those that hear of it: their tails
  move, and an idle one with pending work gets a wake.
- **Delivery.** A supervised loop (`app.loops`) takes the subscriptions that are due from
  the store. For each it ends a lease that ran out and, when a delivery is due and no
  other reader is making it, makes it: a signed webhook POSTed (or a pull-wake's event
  appended to its wake stream). At most `webhook_concurrency` requests are out at once,
  each bounded by `webhook_timeout_seconds`. A failed one is retried with tenacity on the
  protocol's schedule (1 s doubling to 60 s, 20 % jitter), each failure recorded in Redis
  first: the subscription says `failed` meanwhile, and if this reader goes away another
  takes the delivery over at its next attempt. A wake this reader issues is delivered at
  once; one another reader issued and could not deliver, within `POLL_SECONDS`.
- **Sweep.** Every `subscription_sweep_seconds` one reader (whichever takes the turn) reads
  the tails of every subscription's streams and touches it with them: a write whose touch
  was lost (its reader died in between), a stream that expired, a delivery or a lease whose
  filing was lost, are caught up with there.

Delivery is at least once: a receiver can get a wake twice (a reader that went away after
POSTing it, before recording it), and tells them apart by `wake_id` and `generation`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Sequence

import aiohttp
import msgspec
from aiohttp.abc import AbstractResolver, ResolveResult
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from app import loops
from app.durable_streams.errors import (
    SubscriptionExists,
    SubscriptionNotFound,
    WakeFenced,
    WebhookUrlRejected,
)
from app.durable_streams.subscriptions import (
    WEBHOOK,
    Interest,
    Subscription,
    SubscriptionConfig,
    Wake,
    WakeRequest,
    notification,
    verify_token,
    wake_event,
)
from app.durable_streams.webhooks import WebhookPolicy, WebhookSigner
from app.errors import TokentapeError
from app.hub import StreamNotifier
from app.settings import Settings
from app.store import StreamStore
from app.store.subscriptions import SubscriptionStore

logger = logging.getLogger(__name__)

# How long the delivery loop waits at most before it looks at what is due again (a wake
# another reader issued, whose delivery it left).
POLL_SECONDS = 1.0
DUE_BATCH = 100
# The registry is read again at least this often, besides whenever it changes.
REGISTRY_SECONDS = 60.0
# The protocol's retry schedule of a webhook: from 1 s, doubling, to 60 s, with 20 % jitter.
FIRST_RETRY_SECONDS = 1.0
LONGEST_RETRY_SECONDS = 60.0
RETRY_JITTER = 0.2
# What a webhook's answer is read for ({"done": true}); the rest is not read.
ANSWER_BYTES = 64 * 1024
# Paths a sweep touches a subscription with in one call.
SWEEP_SLICE = 500


def retry_delay(failures: int) -> float:
    """The pause after `failures` failed deliveries in a row (1, 2, ...), jittered."""
    base: float = min(LONGEST_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** min(failures - 1, 16))
    return base * (1 + RETRY_JITTER * random.uniform(-1, 1))


class DeliveryFailed(Exception):
    """A wake did not reach its receiver (what happened is the message)."""


class _NotDelivered(Exception):
    """Tried again after `delay` seconds: recorded in Redis, the wake still current."""

    def __init__(self, delay: float) -> None:
        super().__init__(f"retrying in {delay:.1f} s")
        self.delay = delay


def _planned_delay(state: RetryCallState) -> float:
    """tenacity wait: the delay the failed attempt recorded."""
    exc = state.outcome.exception() if state.outcome is not None else None
    return float(exc.delay) if isinstance(exc, _NotDelivered) else FIRST_RETRY_SECONDS


class AddressRefused(OSError):
    """A webhook host resolved to an address webhooks may not go to."""


class PublicAddressResolver(AbstractResolver):
    """Resolves webhook hosts, refusing any that resolves to an address the policy forbids;
    the connection goes to the very addresses checked."""

    def __init__(self, policy: WebhookPolicy) -> None:
        self._policy = policy
        self._resolver = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        try:
            self._policy.check_addresses(host, [each["host"] for each in found])
        except WebhookUrlRejected as exc:
            raise AddressRefused(exc.message) from None
        return found

    async def close(self) -> None:
        await self._resolver.close()


def _done(answer: bytes) -> bool:
    """Whether a webhook's answer is `{"done": true}` (anything else: not done)."""
    try:
        decoded = msgspec.json.decode(answer) if answer.strip() else None
    except msgspec.DecodeError:
        return False
    return isinstance(decoded, dict) and decoded.get("done") is True


class Subscriptions:
    """The subscriptions as one reader serves and delivers them: see the module docstring."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        streams: StreamStore,
        notifier: StreamNotifier,
        settings: Settings,
    ) -> None:
        self.store = SubscriptionStore(redis, settings)
        self.policy = WebhookPolicy(settings.webhook_allowed_host_list)
        self._streams = streams
        self._notifier = notifier
        self._settings = settings
        self._interests: dict[str, Interest] = {}
        self._registry_read = asyncio.Condition()
        self._signer: WebhookSigner | None = None
        self._slots = asyncio.Semaphore(settings.webhook_concurrency)
        # A delivery may take this long before another reader may make it instead.
        self._attempt_ms = int(
            (settings.webhook_timeout_seconds + settings.redis_timeout_seconds + 1) * 1000
        )
        self._delivering: dict[str, asyncio.Task[None]] = {}
        self._due = asyncio.Event()  # a wake was issued here: look at once
        self._loops: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

    # -- running ---------------------------------------------------------------

    async def start(self) -> None:
        settings = self._settings
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                resolver=PublicAddressResolver(self.policy), limit=settings.webhook_concurrency
            ),
            timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout_seconds),
            # No proxy from the environment: the address policy must see where it connects.
            trust_env=False,
        )
        sweep = functools.partial(
            loops.periodic, "subscription-sweep", settings.subscription_sweep_seconds, self.sweep
        )
        self._loops = [
            loops.start("subscription-registry", self._follow_registry),
            loops.start("subscription-delivery", self._deliver_due),
            loops.start("subscription-sweep", sweep),
        ]

    async def stop(self) -> None:
        tasks = [*self._loops, *self._delivering.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loops = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def signer(self) -> WebhookSigner:
        """The signer of webhooks: keys from the secrets, else from the seed in Redis."""
        if self._signer is None:
            settings = self._settings
            given = [s.encode() for s in (settings.secret, settings.previous_secret) if s]
            self._signer = WebhookSigner(given or [await self.store.signing_seed()])
        return self._signer

    async def _follow_registry(self) -> None:
        async with self._notifier.watch(self.store.registry_channel) as watch:
            while True:
                # Read once subscribed: a change made meanwhile is in what is read.
                interests = await self.store.registry()
                async with self._registry_read:
                    self._interests = interests
                    self._registry_read.notify_all()
                await watch.wait_for_append(REGISTRY_SECONDS)

    async def until_registered(self, subscription_id: str, *, present: bool = True) -> None:
        """Until this reader matches its writes against the subscription (or, with
        `present` False, no longer does)."""
        async with self._registry_read:
            await self._registry_read.wait_for(
                lambda: (subscription_id in self._interests) is present
            )

    # -- the API ---------------------------------------------------------------

    async def create(
        self, subscription_id: str, config: SubscriptionConfig, callback_base: str
    ) -> tuple[bool, Subscription]:
        """Create the subscription (True), or confirm the same one (False)."""
        if config.webhook_url is not None:
            self.policy.check_url(config.webhook_url)
        existing = await self.store.existing_hash(subscription_id)
        if existing is not None and existing != config.config_hash:
            raise SubscriptionExists(
                message=f"subscription {subscription_id} exists with another configuration"
            )
        created = False
        if existing is None:
            links: list[tuple[str, str, int]] = []
            explicit = list(config.streams)
            for path, tail in zip(explicit, await self._streams.tails(explicit), strict=True):
                links.append((path, "e", tail or 0))
            if config.pattern is not None:
                pattern = config.pattern
                found = [
                    name
                    for name in await self._streams.names(pattern.literal_prefix)
                    if pattern.matches(name)
                ]
                for path, tail in zip(found, await self._streams.tails(found), strict=True):
                    if tail is not None:
                        links.append((path, "g", tail))
            created = await self.store.create(subscription_id, config, callback_base, links)
        subscription = await self.store.read(subscription_id)
        await self._register(subscription)
        return created, subscription

    async def _register(self, subscription: Subscription) -> None:
        explicit = frozenset(link.path for link in subscription.links if link.explicit)
        interest = Interest(subscription.config.pattern, explicit)
        await self.store.register(subscription.id, interest)
        self._interests[subscription.id] = interest

    async def get(self, subscription_id: str) -> Subscription:
        return await self.store.read(subscription_id)

    async def delete(self, subscription_id: str) -> None:
        await self.store.delete(subscription_id)
        self._interests.pop(subscription_id, None)

    async def add_streams(self, subscription_id: str, paths: Sequence[str]) -> None:
        tails = await self._streams.tails(paths)
        await self.store.add_streams(
            subscription_id, [(path, tail or 0) for path, tail in zip(paths, tails, strict=True)]
        )
        await self._register(await self.store.read(subscription_id))

    async def remove_stream(self, subscription_id: str, path: str) -> None:
        await self.store.remove_stream(subscription_id, path)
        await self._register(await self.store.read(subscription_id))

    async def claim(self, subscription_id: str, worker: str) -> Wake:
        return await self.store.claim(subscription_id, worker)

    async def _checked(self, subscription_id: str, token: str, request: WakeRequest) -> str:
        """The incarnation of the subscription `token` is valid for, for `request`'s wake."""
        key, incarnation = await self.store.token_key(subscription_id)
        if verify_token(key, subscription_id, token, time.time()) != request.generation:
            raise WakeFenced(message="the token is for another wake generation")
        return incarnation

    async def acknowledge(
        self, subscription_id: str, token: str, request: WakeRequest, *, webhook: bool
    ) -> bool:
        """A webhook's callback or a worker's ack; whether the subscription was woken again."""
        incarnation = await self._checked(subscription_id, token, request)
        paths = [ack.path for ack in request.acks]
        tails = await self._streams.tails(paths)
        woken = await self.store.ack(
            subscription_id,
            webhook=webhook,
            incarnation=incarnation,
            generation=request.generation,
            wake_id=request.wake_id,
            acks=[(ack.path, ack.seq, tail) for ack, tail in zip(request.acks, tails, strict=True)],
            done=request.done,
        )
        if woken:
            self._due.set()
        return woken

    async def release(self, subscription_id: str, token: str, request: WakeRequest) -> None:
        incarnation = await self._checked(subscription_id, token, request)
        await self.store.release(
            subscription_id,
            incarnation=incarnation,
            generation=request.generation,
            wake_id=request.wake_id,
        )
        self._due.set()

    # -- what writes do --------------------------------------------------------

    async def stream_written(self, name: str, tail: int) -> None:
        """A write made `name`'s tail `tail`: every subscription that hears of it is touched.
        A failure is logged, not raised: the write happened, and the sweep catches up."""
        await self._touch(name, tail, None)

    async def stream_deleted(self, name: str) -> None:
        await self._touch(name, 0, "gone")

    async def _touch(self, name: str, tail: int, gone: str | None) -> None:
        heard = [
            (subscription_id, how)
            for subscription_id, interest in self._interests.items()
            if (how := interest.how(name)) is not None
        ]
        if not heard:
            return
        try:
            woken = await asyncio.gather(
                *(
                    self.store.touch(subscription_id, [(name, tail, gone or how)])
                    for subscription_id, how in heard
                )
            )
        except (RedisError, OSError) as exc:
            logger.warning("subscriptions of %s not touched (the sweep will): %s", name, exc)
            return
        if any(woken):
            self._due.set()

    async def sweep(self) -> None:
        """Every subscription touched with the tails of its streams, if it is this reader's
        turn (see the module docstring)."""
        interval = self._settings.subscription_sweep_seconds
        if not await self.store.take_sweep(self._name, interval):
            return
        for subscription_id in await self.store.registry():
            try:
                subscription = await self.store.read(subscription_id)
            except SubscriptionNotFound:
                # Its reader went away between deleting it and unregistering it.
                await self.store.register(subscription_id, None)
                continue
            paths = [link.path for link in subscription.links]
            tails = await self._streams.tails(paths)
            writes = [
                (path, 0, "gone") if tail is None else (path, tail, "")
                for path, tail in zip(paths, tails, strict=True)
            ]
            woken = False
            for start in range(0, max(1, len(writes)), SWEEP_SLICE):
                touched = await self.store.touch(
                    subscription_id, writes[start : start + SWEEP_SLICE]
                )
                woken = woken or touched
            if woken:
                self._due.set()

    # -- delivery --------------------------------------------------------------

    async def _deliver_due(self) -> None:
        while True:
            self._due.clear()
            ready, next_at, now = await self.store.due(DUE_BATCH)
            for subscription_id in ready:
                if subscription_id not in self._delivering:
                    task = asyncio.create_task(self._deliver(subscription_id))
                    self._delivering[subscription_id] = task
            wait = POLL_SECONDS if next_at is None else (next_at - now) / 1000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, min(POLL_SECONDS, wait))):
                    await self._due.wait()

    async def _deliver(self, subscription_id: str) -> None:
        try:
            wake = await self.store.deliver(subscription_id, self._attempt_ms)
            if wake is not None:
                await self._send(wake)
        except (RedisError, OSError) as exc:
            # The delivery stays due: this or another reader takes it again.
            logger.warning("delivery of subscription %s interrupted: %s", subscription_id, exc)
        except Exception:
            logger.exception("delivery of subscription %s failed", subscription_id)
        finally:
            self._delivering.pop(subscription_id, None)

    async def _send(self, first: Wake) -> None:
        """Deliver `first`, retrying (tenacity) until it is delivered or no longer current."""
        wake: Wake | None = first
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_NotDelivered), wait=_planned_delay, reraise=True
        )
        async for attempt in retrying:
            with attempt:
                if attempt.retry_state.attempt_number > 1 and wake is not None:
                    wake = await self.store.attempt(wake, self._attempt_ms)
                if wake is None:
                    return
                await self._attempt(wake)

    async def _attempt(self, wake: Wake) -> None:
        try:
            if wake.type == WEBHOOK:
                done = await self._post(wake)
            else:
                await self._append_wake_event(wake)
                done = False
        except DeliveryFailed as exc:
            delay = retry_delay(wake.retry_count + 1)
            logger.warning(
                "wake %s of subscription %s not delivered (%d in a row), next try in %.1f s: %s",
                wake.generation,
                wake.subscription_id,
                wake.retry_count + 1,
                delay,
                exc,
            )
            if await self.store.failed(wake, int(delay * 1000), self._attempt_ms):
                raise _NotDelivered(delay) from exc
            return
        await self.store.delivered(wake, done=done)
        if done:
            self._due.set()  # the next wake, if work is pending, is this reader's to deliver

    async def _post(self, wake: Wake) -> bool:
        """POST the wake to its webhook; whether the receiver answered it done."""
        assert self._session is not None, "delivering before start()"
        try:
            url = self.policy.check_url(wake.webhook_url)
        except WebhookUrlRejected as exc:  # the allowed hosts changed since it was created
            raise DeliveryFailed(exc.message) from None
        signer = await self.signer()
        now = time.time()
        body = notification(wake, now)
        headers = {
            "Content-Type": "application/json",
            "Webhook-Signature": signer.signature(body, now),
            "User-Agent": "tokentape",
        }
        async with self._slots:
            try:
                async with self._session.post(
                    url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    if not 200 <= response.status < 300:
                        raise DeliveryFailed(f"{url.host} answered {response.status}")
                    answer = await response.content.read(ANSWER_BYTES)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise DeliveryFailed(f"{url.host}: {exc or type(exc).__name__}") from None
        return _done(answer)

    async def _append_wake_event(self, wake: Wake) -> None:
        # Appended as any write, but no subscription is touched by it: one whose pattern
        # covers its own wake stream would wake itself forever.
        async with self._slots:
            try:
                await self._streams.append(
                    wake.wake_stream,
                    content_type="application/json",
                    data=wake_event(wake, time.time()),
                )
            except TokentapeError as exc:
                raise DeliveryFailed(f"wake stream {wake.wake_stream}: {exc.message}") from None
