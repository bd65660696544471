"""Per-process fan-out of generation logs to SSE clients.

One pub/sub connection per process carries the live batches of every generation
that has a reader here; all readers of one generation share one `Feed`. A
`Subscription` is one client: it catches up from the log in pages, then takes
live batches from its feed. The channel is subscribed before the log is read, so
nothing falls between the two; live batches that arrive during a read are kept
and take over when they continue the page. Delivery is exactly-once and in order
because every
subscription tracks the last seq it handed out and falls back to the log
whenever live delivery cannot be trusted:

- a live batch that starts after the next expected seq (pub/sub is at-most-once:
  a message was missed) -> back-fill from the log;
- more than `client_buffer_events` pending for a slow client -> drop the buffer
  and read from the log at the client's pace (the log is durable; memory stays
  bounded);
- the pub/sub connection dropped, or a feed has been silent for a while -> every
  affected subscription re-checks the log.

Each live event is framed once, straight from the published message
(`app.sse.live_frames`), and its bytes are shared by every subscription that receives
it; catch-up pages are framed straight from the XRANGE reply
(`app.sse.event_frames`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import Coroutine, Iterable

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError, RedisError

from app import sse
from app.events import TERMINAL_TYPES, Gap, encode
from app.log import GenerationLog
from app.sse import Frame, live_frames

logger = logging.getLogger(__name__)

_READ_SIZE = 64 * 1024  # per read of the pub/sub connection
# How long stop() waits for the hub's own tasks once cancelled and disconnected.
STOP_TIMEOUT_SECONDS = 5.0


class Subscription:
    """One client's position in one generation's log."""

    # Thousands of these live at once in one process: no per-instance __dict__.
    __slots__ = (
        "_deadline",
        "_feed",
        "_first_read",
        "_hub",
        "_live_hint",
        "_pending",
        "_pending_gap",
        "_queued_until",
        "_read_log",
        "_timer",
        "_waiter",
        "closed",
        "delivered",
        "fell_behind",
        "finished",
        "gap",
        "last_appended_ms",
        "requested_after",
    )

    def __init__(self, hub: Hub, feed: Feed, after_seq: int) -> None:
        self._hub = hub
        self._feed = feed
        self.requested_after = after_seq
        self.delivered = after_seq  # last seq handed to the client
        self._queued_until = after_seq  # live: last seq handed out or in `_pending`
        # A list and a future made only while waiting, not a deque and an asyncio.Event:
        # an idle connection costs ~1.5 KiB less (each deque is 760 bytes).
        self._pending: list[Frame] = []
        self._pending_gap: bytes | None = None
        self._read_log = True  # catch-up, back-fill or slow-client mode
        self._first_read = True
        self._live_hint = 0  # highest seq announced live
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # of the current wait in `next_chunk`
        self.finished = False  # the terminal event was handed out
        self.closed = False  # unsubscribed, or the server is draining
        self.fell_behind = 0  # times the client's buffer overflowed
        self.gap: Gap | None = None
        self.last_appended_ms: int | None = None  # of the last event handed out

    @property
    def generation_id(self) -> str:
        return self._feed.generation_id

    # -- called by the feed --------------------------------------------------

    def _offer(self, frames: list[Frame]) -> None:
        self._live_hint = max(self._live_hint, frames[-1].seq)
        if self.finished:
            return
        if self._read_log:
            # Kept (bounded) while the log is read: when they continue the page just
            # read, live delivery takes over without another read. Otherwise, under
            # load, every read would be overtaken by the next live batch and a client
            # would pay a log read per event.
            if len(self._pending) + len(frames) <= self._hub.buffer_limit:
                self._pending.extend(frames)
            else:
                self._pending.clear()
            return
        expected = self._queued_until + 1
        if frames[0].seq > expected:
            self._switch_to_log()  # a live batch was missed: back-fill from the log
            return
        fresh = frames[expected - frames[0].seq :] if frames[0].seq < expected else frames
        if not fresh:
            return
        if len(self._pending) + len(fresh) > self._hub.buffer_limit:
            self.fell_behind += 1
            self._switch_to_log()
            return
        self._pending.extend(fresh)
        self._queued_until = fresh[-1].seq
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _switch_to_log(self) -> None:
        self._pending.clear()
        self._queued_until = self.delivered
        self._read_log = True
        self._wake()

    def _continue_live(self, last_seq: int, *, caught_up: bool) -> None:
        """After the log was read up to `last_seq`: go live if what is buffered continues it.

        A hole in the buffer (a lost live message) or live batches announced but not
        buffered (the buffer overflowed) mean: read the log again.
        """
        pending = [f for f in self._pending if f.seq > last_seq]
        contiguous = all(f.seq == last_seq + 1 + i for i, f in enumerate(pending))
        self._pending = pending if contiguous else []
        if caught_up and contiguous and (pending or self._live_hint <= last_seq):
            self._read_log = False
            self._queued_until = pending[-1].seq if pending else last_seq

    def _recheck(self) -> None:
        """Something may have been missed (pub/sub reconnect, silent feed): look at the log."""
        if not self.finished and not self._read_log:
            self._switch_to_log()

    def _close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    # -- called by the client's handler ----------------------------------------

    async def next_chunk(self, wait_seconds: float) -> bytes | None:
        """The SSE bytes of everything ready for this client, in one piece.

        Waits up to `wait_seconds`; returns b"" when nothing came (write a heartbeat),
        None when the subscription ended (terminal event delivered, or closed).
        """
        if self.finished or self.closed:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while True:
            if self.closed:
                return None
            if self._read_log:
                chunk = await self._read_page(deadline - loop.time())
                if chunk is not None:
                    return chunk
            elif self._pending:
                return self._take_pending()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return b""
            if self._read_log or self._pending or self.closed:
                continue
            self._wait_until(loop, deadline)
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _wait_until(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """Wake the coming wait at `deadline`, keeping the timer armed by an earlier wait.

        Not a timeout per wait: under load every wait ends with an event well before
        its deadline, and arming and cancelling a timer each time was ~9% of a busy
        reader's CPU. One timer per subscription fires at most once per `wait_seconds`
        of events and moves itself on to the latest deadline.
        """
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        if self._waiter is None:
            return  # not waiting: the next wait arms a timer
        loop = self._waiter.get_loop()
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._timer_fired)
        else:
            self._wake()

    def _take_pending(self) -> bytes:
        frames, self._pending = self._pending, []
        return self._hand_out(frames)

    def _hand_out(self, frames: list[Frame]) -> bytes:
        last = frames[-1]
        return self._deliver(
            b"".join(f.data for f in frames), last.seq, last.appended_ms, last.terminal
        )

    def _deliver(self, chunk: bytes, last_seq: int, appended_ms: int, terminal: bool) -> bytes:
        self.delivered = last_seq
        self.last_appended_ms = appended_ms
        self._queued_until = max(self._queued_until, last_seq)
        if terminal:
            self.finished = True
        if self._pending_gap is not None:
            chunk, self._pending_gap = self._pending_gap + chunk, None
        return chunk

    async def _read_page(self, budget: float) -> bytes | None:
        """One page from the log; None when there is nothing (more) to read now."""
        if budget <= 0:
            return None
        try:
            async with asyncio.timeout(budget):
                rows = await self._hub.log.read_rows(
                    self.generation_id, self.delivered, self._hub.page_size
                )
        except TimeoutError:
            return None
        except RedisError as exc:
            # Hold the connection (heartbeats keep flowing) and retry: a passing
            # Redis fault must never turn into an error the browser gives up on.
            logger.warning("log read for %s failed, retrying: %s", self.generation_id, exc)
            await asyncio.sleep(min(budget, self._hub.retry_delay()))
            return None
        if not rows:
            self._first_read = False
            self._continue_live(self.delivered, caught_up=True)
            if self._read_log:
                # Announced live but not in the log: only a trimmed or expired log does
                # that. Live batches take over; the recheck loop covers the rest.
                self._pending = []
                self._read_log = False
                self._queued_until = self.delivered
            return None
        # Framed straight from the reply's bytes ("<seq>-0", [b"type", type, b"data", data,
        # b"t", ms]): no object per event on the catch-up path.
        chunk = sse.event_frames((entry_id[:-2], fields[1], fields[3]) for entry_id, fields in rows)
        last_id, last_fields = rows[-1]
        last_seq = int(last_id[:-2])
        if self._first_read:
            self._first_read = False
            first_seq = int(rows[0][0][:-2])
            if first_seq > self.delivered + 1:
                self.gap = Gap(requested=self.delivered + 1, first_available=first_seq)
                self._pending_gap = sse.unnumbered_frame("gap", encode(self.gap))
        # A full page: more to read. A short one: caught up, live takes over if it can.
        self._continue_live(last_seq, caught_up=len(rows) < self._hub.page_size)
        terminal = last_fields[1].decode() in TERMINAL_TYPES
        return self._deliver(chunk, last_seq, int(last_fields[5]), terminal)


class Feed:
    """All subscriptions of one generation in this process, and its live channel."""

    __slots__ = (
        "channel",
        "confirmed",
        "generation_id",
        "linger",
        "silent_since",
        "subscribe_number",
        "subscriptions",
    )

    def __init__(self, generation_id: str, channel: bytes) -> None:
        self.generation_id = generation_id
        self.channel = channel
        self.subscriptions: set[Subscription] = set()
        self.confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.subscribe_number = 0  # which SUBSCRIBE of this channel confirms us
        self.silent_since = 0.0
        self.linger: asyncio.TimerHandle | None = None

    def dispatch(self, frames: list[Frame], now: float) -> None:
        self.silent_since = now
        for subscription in list(self.subscriptions):
            subscription._offer(frames)


class Hub:
    """Owns the process's pub/sub connection and its feeds."""

    def __init__(
        self,
        log: GenerationLog,
        pubsub_redis: Redis,
        *,
        page_size: int = 500,
        buffer_limit: int = 1024,
        recheck_seconds: float = 5.0,
        linger_seconds: float = 5.0,
    ) -> None:
        self.log = log
        self.page_size = page_size
        self.buffer_limit = buffer_limit
        self.recheck_seconds = recheck_seconds
        self.linger_seconds = linger_seconds
        self._pool = pubsub_redis.connection_pool
        self._connection: AbstractConnection | None = None
        self._subscribed = False  # the (re)connect subscribed: commands may go out
        self._feeds: dict[str, Feed] = {}
        self._channels: dict[bytes, Feed] = {}
        # Per connection: a reconnect starts both at the SUBSCRIBE that lists every channel.
        self._subscribes_sent: collections.Counter[bytes] = collections.Counter()
        self._subscribes_acked: collections.Counter[bytes] = collections.Counter()
        self._loops: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._failures = 0
        self._closing = False
        self._changed = asyncio.Condition()
        # Trap: a redis-py Connection connects by itself when a command is sent on it
        # while it is down, and two connects racing on one Connection break it. Pub/sub
        # commands go one at a time, only on a connection the listen loop has
        # (re)connected and subscribed, and never while it does.
        self._commands = asyncio.Lock()
        # A channel that is always subscribed, listed last when (re)connecting: its
        # confirmation says every channel listed before it is subscribed.
        self._anchor = log.keys.hub_channel.encode()
        self._confirmed_done: asyncio.Future[None] | None = None  # done: every confirmed feed's

    @property
    def subscription_count(self) -> int:
        return sum(len(f.subscriptions) for f in self._feeds.values())

    async def until_subscriptions(self, count: int) -> None:
        """Wait until exactly `count` subscriptions are open (drain, tests)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.subscription_count == count)

    def _notify(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        self._spawn(notify())

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def retry_delay(self) -> float:
        delay: float = min(2.0, 0.05 * 2 ** min(self._failures, 6))
        return delay * (0.5 + random.random())

    async def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._listen(), name="hub-listen"),
            asyncio.create_task(self._recheck_loop(), name="hub-recheck"),
        ]

    async def stop(self) -> None:
        """Close every subscription (`server_drain`) and the pub/sub connection."""
        self._closing = True
        for feed in list(self._feeds.values()):
            for subscription in list(feed.subscriptions):
                subscription._close()
        for task in self._loops:
            task.cancel()
        connection, self._connection = self._connection, None
        self._subscribed = False
        if connection is not None:
            # Closed before the loops are awaited: a listen loop whose cancellation
            # was swallowed inside redis-py (a known class of bugs there) sees its
            # stream end and, with `_closing` set, returns instead of waiting forever.
            with contextlib.suppress(RedisError, OSError):
                await connection.disconnect(nowait=True)
        _, stuck = await asyncio.wait(self._loops, timeout=STOP_TIMEOUT_SECONDS)
        for task in stuck:
            logger.warning("hub task %s did not stop in time", task.get_name())
        if connection is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pool.release(connection)

    # -- subscriptions -------------------------------------------------------

    async def subscribe(
        self, generation_id: str, after_seq: int, *, confirm_timeout: float = 5.0
    ) -> Subscription:
        """A subscription positioned after `after_seq`, live channel confirmed first.

        Subscribing before reading the log is what makes the hand-over from
        catch-up to live lossless: anything appended after the confirmation
        arrives live; anything before it is in the log.
        """
        feed = self._feeds.get(generation_id)
        if feed is None:
            channel = self.log.keys.live_channel(generation_id).encode()
            feed = Feed(generation_id, channel)
            feed.silent_since = asyncio.get_running_loop().time()
            self._feeds[generation_id] = feed
            self._channels[channel] = feed
            await self._send_subscribe(feed)
        elif feed.linger is not None:
            feed.linger.cancel()
            feed.linger = None
        subscription = Subscription(self, feed, after_seq)
        feed.subscriptions.add(subscription)
        self._notify()
        # asyncio.wait, not a timeout around the future: that would cancel it for the
        # other subscriptions waiting on the same feed.
        await asyncio.wait([feed.confirmed], timeout=confirm_timeout)
        if not feed.confirmed.done():
            # The pub/sub connection is unwell; the recheck loop covers this feed.
            logger.warning("live channel of %s not confirmed in time", generation_id)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        feed = subscription._feed
        feed.subscriptions.discard(subscription)
        subscription._close()
        self._notify()
        if not feed.subscriptions and feed.linger is None and not self._closing:
            # Keep the channel a moment: reconnect storms come back to the same generation.
            loop = asyncio.get_running_loop()
            feed.linger = loop.call_later(self.linger_seconds, self._drop_feed, feed)

    def _drop_feed(self, feed: Feed) -> None:
        feed.linger = None
        if feed.subscriptions or self._feeds.get(feed.generation_id) is not feed:
            return
        del self._feeds[feed.generation_id]
        del self._channels[feed.channel]
        self._forget(feed.channel)
        self._spawn(self._send_unsubscribe(feed.channel))

    def _forget(self, channel: bytes) -> None:
        """Drop a channel's counts once no feed uses it and no SUBSCRIBE is in flight."""
        if channel not in self._channels and (
            self._subscribes_acked[channel] >= self._subscribes_sent[channel]
        ):
            self._subscribes_sent.pop(channel, None)
            self._subscribes_acked.pop(channel, None)

    def _command_connection(self) -> AbstractConnection | None:
        """The connection to send a pub/sub command on now (holding `_commands`), if any."""
        connection = self._connection
        if self._subscribed and connection is not None and connection.is_connected:
            return connection
        return None  # (re)connecting: the listen loop subscribes every channel of `_channels`

    async def _send_subscribe(self, feed: Feed) -> None:
        try:
            async with self._commands:
                connection = self._command_connection()
                if connection is None or self._channels.get(feed.channel) is not feed:
                    return
                self._subscribes_sent[feed.channel] += 1
                feed.subscribe_number = self._subscribes_sent[feed.channel]
                await connection.send_command("SUBSCRIBE", feed.channel, check_health=False)
        except (RedisError, OSError) as exc:
            logger.warning("subscribe to %s failed: %s", feed.channel.decode(), exc)

    async def _send_unsubscribe(self, channel: bytes) -> None:
        with contextlib.suppress(RedisError, OSError):
            async with self._commands:
                connection = self._command_connection()
                # Subscribed again meanwhile: the channel stays.
                if connection is not None and channel not in self._channels:
                    await connection.send_command("UNSUBSCRIBE", channel, check_health=False)

    # -- the pub/sub connection ----------------------------------------------

    async def _listen(self) -> None:
        """Read the pub/sub connection in bulk and dispatch every reply of a read at once.

        Not redis-py's PubSub: its get_message costs a coroutine chain, a dict and
        observability hooks per message, ~19% of a busy reader's CPU. redis-py still
        makes the connection (AUTH, db, TLS, client name from the URL); the replies
        are parsed here with hiredis.
        """
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                stream = await self._connect()
                replies = hiredis.Reader()
                while not self._closing:
                    data = await stream.read(_READ_SIZE)
                    if not data:
                        raise ConnectionError("pub/sub connection closed by the server")
                    self._received(replies, data, loop.time())
                    if self._failures:
                        self._failures = 0
            except (RedisError, OSError) as exc:
                self._subscribed = False
                self._failures += 1
                logger.warning("pub/sub connection lost, recovering: %s", exc)
                if self._connection is not None:
                    with contextlib.suppress(RedisError, OSError):
                        await self._connection.disconnect(nowait=True)
                await asyncio.sleep(self.retry_delay())

    async def _connect(self) -> asyncio.StreamReader:
        """(Re)connect and subscribe every channel, the anchor last; counts start over."""
        async with self._commands:
            if self._connection is None:
                self._connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
            connection = self._connection
            await connection.connect()  # a no-op right after get_connection
            stream = connection._reader
            if stream is None:
                raise ConnectionError("pub/sub connection not connected")
            self._subscribes_sent.clear()
            self._subscribes_acked.clear()
            channels = [*self._channels, self._anchor]
            for channel in channels:
                self._subscribes_sent[channel] = 1
            for feed in self._channels.values():
                feed.subscribe_number = 1
            await connection.send_command("SUBSCRIBE", *channels, check_health=False)
            self._subscribed = True
        return stream

    def _received(self, replies: hiredis.Reader, data: bytes, now: float) -> None:
        """Dispatch every reply `data` completes (a read may end inside one)."""
        replies.feed(data)
        while (reply := replies.gets()) is not False:
            if not isinstance(reply, list):
                if isinstance(reply, Exception):
                    logger.warning("pub/sub command failed: %s", reply)
                continue
            kind = reply[0]
            if kind == b"message":
                feed = self._channels.get(reply[1])
                if feed is not None:
                    feed.dispatch(live_frames(reply[2]), now)
            elif kind == b"subscribe":
                self._confirmed(reply[1])

    def _confirmed(self, channel: bytes) -> None:
        self._subscribes_acked[channel] += 1
        if channel == self._anchor:
            # (Re)connected: every channel is subscribed again. What was published
            # while none was is in the log: every feed re-checks it.
            for each in self._feeds.values():
                _recheck_all(each.subscriptions)
        feed = self._channels.get(channel)
        if feed is None:
            self._forget(channel)
        elif self._subscribes_acked[channel] >= feed.subscribe_number and not feed.confirmed.done():
            feed.confirmed.set_result(None)
            # Its waiters hold it; the feed, open as long as its streams, can share a done one.
            if self._confirmed_done is None:
                self._confirmed_done = feed.confirmed
            else:
                feed.confirmed = self._confirmed_done

    async def _recheck_loop(self) -> None:
        """Silent feeds look at the log's last seq now and then: the safety net under pub/sub.

        The same beat marks every generation with readers here as watched.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.recheck_seconds)
            watched = [f.generation_id for f in self._feeds.values() if f.subscriptions]
            if watched:
                try:
                    await self.log.mark_watched(watched)
                except (RedisError, OSError) as exc:
                    logger.warning("marking watched generations failed: %s", exc)
            now = loop.time()
            silent = [
                f
                for f in self._feeds.values()
                if f.subscriptions and now - f.silent_since >= self.recheck_seconds
            ]
            if not silent:
                continue
            try:
                last_seqs = await self.log.last_seqs([f.generation_id for f in silent])
            except (RedisError, OSError) as exc:
                logger.warning("recheck failed: %s", exc)
                continue
            for feed, last_seq in zip(silent, last_seqs, strict=True):
                feed.silent_since = now
                _recheck_all(feed.subscriptions, last_seq)


def _recheck_all(subscriptions: Iterable[Subscription], last_seq: int | None = None) -> None:
    for subscription in list(subscriptions):
        if last_seq is None or last_seq > subscription._queued_until:
            subscription._recheck()
