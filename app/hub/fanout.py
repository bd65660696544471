"""Feeds and the hub: every client of one generation in this process shares one feed."""

from __future__ import annotations

import asyncio
import functools
import logging

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from app import loops
from app.clock import MONOTONIC, Clock
from app.hub.alarms import Alarms
from app.hub.pubsub import Changes, Confirmable, Endpoint, PubSubConnection, ShardedPubSub
from app.hub.subscription import Page, Subscription, read_page
from app.sse import Frame, live_frames
from app.store import GenerationLog

logger = logging.getLogger(__name__)

# How long stop() waits for the hub's own tasks once cancelled and disconnected.
STOP_TIMEOUT_SECONDS = 5.0

# After a round of live writes that took t, the next starts t later at the earliest: when
# one generation has thousands of clients, its writes take at most half of the loop, the
# other half serves clients joining and catching up, and the batches that arrive in the
# pause go out in one write per client instead of one each (a write costs about the same
# whatever its size). A round shorter than the loop's timer resolution (about a
# millisecond) never waits: single-client streams see no pause. Nor does a pause ever
# exceed a few tokens' time, even after a round that a descheduled process made long.
WRITE_PAUSE_MIN_SECONDS = 0.001
WRITE_PAUSE_MAX_SECONDS = 0.05

# Live batches a feed keeps while it has no subscription: a GET's first page is read a
# few milliseconds before its subscription is made, when a generation has just started.
RECENT_BATCHES = 8

# How long a channel subscribed at a generation's creation waits for its first reader:
# a client's GET comes within a few round trips of the POST's answer, often on another
# connection (to another process of `serve --processes`, which hears every live batch
# of that generation meanwhile for nobody). Never longer than the hub's linger.
LISTEN_AHEAD_SECONDS = 2.0


class Feed(Confirmable):
    """All subscriptions of one generation in this process: the listener of its live channel."""

    __slots__ = (
        "channel",
        "generation_id",
        "heard",
        "linger",
        "listening",
        "recent",
        "silent_since",
        "subscriptions",
    )

    def __init__(self, generation_id: str, channel: bytes, now: float) -> None:
        super().__init__()
        self.generation_id = generation_id
        self.channel = channel
        self.subscriptions: set[Subscription] = set()
        self.silent_since = now
        self.linger: asyncio.TimerHandle | None = None
        self.listening = False  # its live channel is subscribed
        # Counts what a page read before may not hold: live batches, losses, and the
        # channel's confirmation (what was published before it was never heard).
        self.heard = 0
        # The last live batches, up to `heard`, heard while no subscription was here to
        # be offered them; made only then (see `add`).
        self.recent: list[list[Frame]] | None = None

    def add(self, subscription: Subscription) -> None:
        """A new subscription, offered the batches heard while nobody was here: the reader
        whose first page was read before it subscribed (`Hub.first_page`) finds what
        followed that page among them, and need not read the log again."""
        self.subscriptions.add(subscription)
        recent = self.recent or ()
        for frames in recent:
            subscription.offer(frames)
        subscription.offered_since(self.heard - len(recent))

    def recheck(self, last_seq: int | None = None) -> None:
        """Every subscription looks at the log (with `last_seq`, those behind it)."""
        for subscription in list(self.subscriptions):
            subscription.recheck(last_seq)

    # -- the live channel's listener ----------------------------------------

    def dispatch(self, frames: list[Frame], now: float) -> None:
        self.silent_since = now
        self.heard += 1
        if self.subscriptions:
            self.recent = None
            for subscription in list(self.subscriptions):
                subscription.offer(frames)
            return
        recent = self.recent
        if recent is None:
            self.recent = recent = []
        elif len(recent) == RECENT_BATCHES:
            del recent[0]
        recent.append(frames)

    def missed(self) -> None:
        self._lost()
        self.recheck()

    def subscribed(self) -> None:
        if not self.confirmed:
            # What was published before was never heard: a page read before is not enough.
            self._lost()
            for subscription in self.subscriptions:
                subscription.offered_since(self.heard)
        super().subscribed()

    def _lost(self) -> None:
        self.heard += 1
        self.recent = None


class Hub:
    """The process's feeds, and the pub/sub connection that carries their live batches."""

    def __init__(
        self,
        log: GenerationLog,
        redis: Redis | RedisCluster,
        *,
        page_size: int = 500,
        buffer_limit: int = 1024,
        recheck_seconds: float = 5.0,
        linger_seconds: float = 5.0,
        clock: Clock = MONOTONIC,
    ) -> None:
        """`redis` says which server to subscribe on, and how: no connection of its is used.
        On a cluster (a `RedisCluster`), its slot map says which node serves each channel."""
        self.log = log
        self.page_size = page_size
        self.buffer_limit = buffer_limit
        self.recheck_seconds = recheck_seconds
        self.linger_seconds = linger_seconds
        self.pubsub: PubSubConnection[list[Frame]] | ShardedPubSub[list[Frame]]
        timeout = log.settings.redis_timeout_seconds
        if isinstance(redis, RedisCluster):
            self.pubsub = ShardedPubSub(redis, live_frames, timeout=timeout)
        else:
            self.pubsub = PubSubConnection(
                Endpoint.of(redis), log.keys.hub_channel.encode(), live_frames, timeout=timeout
            )
        self.alarms = Alarms()
        self._feeds: dict[str, Feed] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._closing = False
        self._subscriptions_changed = Changes()
        self.clock = clock
        self._to_flush: list[Subscription] = []
        self._next_flush_at = 0.0
        # Pages being read: by generation, the seq they follow, and the feed whose
        # subscriptions share them (None: read before any subscription, `early`).
        self._reading: dict[tuple[str, int, Feed | None], asyncio.Future[Page]] = {}

    @property
    def subscription_count(self) -> int:
        return sum(len(f.subscriptions) for f in self._feeds.values())

    @property
    def running(self) -> bool:
        """Whether a background loop of the hub still runs."""
        return any(not task.done() for task in self._loops)

    async def until_subscriptions(self, count: int) -> None:
        """Wait until exactly `count` subscriptions are open (drain, tests)."""
        await self._subscriptions_changed.until(lambda: self.subscription_count == count)

    def read_page(
        self, generation_id: str, after_seq: int, feed: Feed | None = None
    ) -> asyncio.Future[Page]:
        """The log's page after `after_seq`, read and framed once for every subscription of
        `feed` that asks while it is read: clients joining a generation together start
        from the same seq, and pages keep them on the same seqs until they are caught up.

        Without `feed`, an early page (`first_page`). Early pages are shared only with
        each other: what follows one may have been published before any channel heard it.

        Await it shielded: a reader that gives up must not cancel the others' read.
        """
        key = (generation_id, after_seq, feed)
        reading = self._reading.get(key)
        if reading is None:
            reading = asyncio.ensure_future(
                read_page(self.log, generation_id, after_seq, self.page_size, feed)
            )
            self._reading[key] = reading
            reading.add_done_callback(functools.partial(self._page_read, key))
        return reading

    def first_page(self, generation_id: str, after_seq: int) -> asyncio.Future[Page]:
        """The first page of a reader about to subscribe, read beside the log's state as a
        GET does (one round trip for both), and handed out first (`subscribe(first_page=)`).

        Under the generation's feed when its channel is confirmed already (a reader is
        here, or left a moment ago, or the generation was created here): then the page can
        be taken as caught up. Otherwise early: the log is read again once the channel is.
        """
        feed = self.feed(generation_id)
        if feed is not None and not (feed.listening and feed.confirmed):
            feed = None
        return self.read_page(generation_id, after_seq, feed)

    def feed(self, generation_id: str) -> Feed | None:
        """The generation's feed here, if it has one: readers, or lingering, or listened ahead."""
        return self._feeds.get(generation_id)

    def _page_read(self, key: tuple[str, int, Feed | None], reading: asyncio.Future[Page]) -> None:
        if self._reading.get(key) is reading:
            del self._reading[key]
        if not reading.cancelled():
            reading.exception()  # retrieved: every reader that asked may have left

    def flush_soon(self, subscription: Subscription) -> None:
        """Call `subscription.flush()` once what runs now (a read's live batches) is done,
        and the pause after the last round of live writes is over."""
        if not self._to_flush:
            loop = asyncio.get_running_loop()
            pause = self._next_flush_at - self.clock.now()
            if pause >= WRITE_PAUSE_MIN_SECONDS:
                loop.call_later(pause, self._flush)
            else:
                loop.call_soon(self._flush)
        self._to_flush.append(subscription)

    def _flush(self) -> None:
        started = self.clock.now()
        subscriptions, self._to_flush = self._to_flush, []
        for subscription in subscriptions:
            try:
                subscription.flush()
            except Exception:
                # Its client reconnects and resumes from its last event; the others
                # still get theirs.
                logger.exception("live write to a client failed; ending its stream")
                subscription.close()
        ended = self.clock.now()
        self._next_flush_at = ended + min(ended - started, WRITE_PAUSE_MAX_SECONDS)

    def retry_delay(self) -> float:
        """A pause before a failed log read is tried again."""
        return self.pubsub.retry_delay()

    async def start(self) -> None:
        recheck = functools.partial(
            loops.periodic, "hub-recheck", self.recheck_seconds, self._recheck
        )
        self._loops = [
            loops.start("hub-listen", self.pubsub.listen),
            loops.start("hub-recheck", recheck),
        ]

    async def stop(self) -> None:
        """Close every subscription (`server_drain`) and the pub/sub connection."""
        self._closing = True
        for feed in list(self._feeds.values()):
            for subscription in list(feed.subscriptions):
                subscription.close()
        for task in self._loops:
            task.cancel()
        # Closed before the loops are awaited: a listen loop whose cancellation was
        # swallowed (a known class of bugs in libraries it calls) sees its stream end
        # and, closing, returns instead of waiting forever.
        self.pubsub.close()
        self.alarms.close()
        if not self._loops:
            return
        _, stuck = await asyncio.wait(self._loops, timeout=STOP_TIMEOUT_SECONDS)
        for task in stuck:
            logger.warning("hub task %s did not stop in time", task.get_name())

    # -- subscriptions -------------------------------------------------------

    async def subscribe(
        self,
        generation_id: str,
        after_seq: int,
        *,
        live: bool = True,
        first_page: asyncio.Future[Page] | None = None,
        confirm_timeout: float = 5.0,
    ) -> Subscription:
        """A subscription positioned after `after_seq`, live channel confirmed first.

        Subscribing before reading the log is what makes the hand-over from
        catch-up to live lossless: anything appended after the confirmation
        arrives live; anything before it is in the log.

        `live=False` is for a generation whose terminal event is in the log: nothing
        more will be appended, so the subscription reads the log alone and its channel
        is not subscribed (no round trip before the first page). Should Redis come back
        with an older copy of that log, the recheck beat finds what is appended again.

        `first_page` (`Hub.first_page` after `after_seq`, read before this subscription
        was made) is handed out first; the log is read again after it unless what
        followed it has been offered here live (`Subscription._trusts`).
        """
        feed = self._feed_for(generation_id)
        if feed.linger is not None:
            feed.linger.cancel()
            feed.linger = None
        if live:
            self._listen(feed)
        subscription = Subscription(self, feed, after_seq, first_page)
        feed.add(subscription)
        self._subscriptions_changed.announce()
        if not live:
            return subscription
        try:
            confirmed = await feed.until_confirmed(confirm_timeout)
        except BaseException:
            # Cancelled (its client went away): nobody will unsubscribe what it never got.
            self.unsubscribe(subscription)
            raise
        if not confirmed:
            # The pub/sub connection is unwell; the recheck loop covers this feed.
            logger.warning("live channel of %s not confirmed in time", generation_id)
        return subscription

    def listen_ahead(self, generation_id: str) -> Feed | None:
        """Subscribe the live channel of a generation being created, before its first
        reader comes (the client that created it, in the usual case): that reader's GET
        then finds it confirmed and starts without waiting for a SUBSCRIBE. If no reader
        comes here within `LISTEN_AHEAD_SECONDS`, the channel goes.

        The generation's new feed; None if it had one, or feeds do not linger here."""
        if self._closing or self.linger_seconds <= 0 or generation_id in self._feeds:
            return None
        feed = self._feed_for(generation_id)
        self._listen(feed)
        wait = min(self.linger_seconds, LISTEN_AHEAD_SECONDS)
        feed.linger = asyncio.get_running_loop().call_later(wait, self._drop_feed, feed)
        return feed

    def _feed_for(self, generation_id: str) -> Feed:
        feed = self._feeds.get(generation_id)
        if feed is None:
            channel = self.log.keys.live_channel(generation_id).encode()
            feed = Feed(generation_id, channel, asyncio.get_running_loop().time())
            self._feeds[generation_id] = feed
        return feed

    def _listen(self, feed: Feed) -> None:
        if not feed.listening:
            feed.listening = True
            self.pubsub.subscribe(feed.channel, feed)

    def unsubscribe(self, subscription: Subscription) -> None:
        feed = subscription.feed
        feed.subscriptions.discard(subscription)
        subscription.close()
        self._subscriptions_changed.announce()
        if feed.subscriptions or feed.linger is not None or self._closing:
            return
        if self.linger_seconds > 0 and feed.listening:
            # Keep the channel a moment: reconnect storms come back to the same generation.
            loop = asyncio.get_running_loop()
            feed.linger = loop.call_later(self.linger_seconds, self._drop_feed, feed)
        else:
            self._drop_feed(feed)

    def _drop_feed(self, feed: Feed) -> None:
        feed.linger = None
        if feed.subscriptions or self._feeds.get(feed.generation_id) is not feed:
            return
        del self._feeds[feed.generation_id]
        if feed.listening:
            self.pubsub.unsubscribe(feed.channel)

    async def _recheck(self) -> None:
        """Silent feeds look at the log's last seq: the safety net under pub/sub.

        The same beat marks every generation with readers here as watched.
        """
        watched = [f.generation_id for f in self._feeds.values() if f.subscriptions]
        if watched:
            try:
                await self.log.mark_watched(watched)
            except (RedisError, OSError) as exc:
                logger.warning("marking watched generations failed: %s", exc)
        now = asyncio.get_running_loop().time()
        silent = [
            f
            for f in self._feeds.values()
            if f.subscriptions and now - f.silent_since >= self.recheck_seconds
        ]
        if not silent:
            return
        try:
            last_seqs = await self.log.last_seqs([f.generation_id for f in silent])
        except (RedisError, OSError) as exc:
            logger.warning("recheck failed: %s", exc)
            return
        for feed, last_seq in zip(silent, last_seqs, strict=True):
            feed.silent_since = now
            feed.recheck(last_seq)
