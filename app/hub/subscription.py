"""One client's position in one generation's log: catch-up, live, back-fill, slow clients,
and a log that went back below it."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, NamedTuple, Protocol

import msgspec
from redis.exceptions import RedisError

from app import sse
from app.events import TERMINAL_TYPES, Gap, Reset, encode
from app.hub.alarms import Alarms
from app.sse import Frame
from app.store import GenerationLog, RawEntry

if TYPE_CHECKING:
    from app.hub.fanout import Feed, Hub

logger = logging.getLogger(__name__)

_reset_decoder = msgspec.json.Decoder(Reset)
# What a client is sent when the log cannot vouch for the events it holds: drop them all
# and read again from the start (`id: 0` is its position after this event).
RESTART = sse.event_frame(0, "reset", encode(Reset(from_seq=1)))


class Page(NamedTuple):
    """A catch-up page: the log's rows after a seq, their SSE frames, and when it was read."""

    rows: list[RawEntry]
    frames: bytes
    # Read while this feed's channel was confirmed (None: early, before any channel),
    # when the feed had heard `heard` times (`Feed.heard`): see `Subscription._trusts`.
    feed: Feed | None
    heard: int


class Sink(Protocol):
    """Where a live subscription writes its batches itself while its client's task waits."""

    def ready(self) -> bool:
        """Whether a write now goes out at once (the client is not behind)."""
        ...

    def send(self, chunk: bytes, first_seq: int, last_seq: int, appended_ms: int) -> None:
        """Write the events `first_seq`..`last_seq` (`chunk`, their SSE bytes)."""
        ...


async def read_page(
    log: GenerationLog, generation_id: str, after_seq: int, count: int, feed: Feed | None
) -> Page:
    """Up to `count` rows after `after_seq`, and their frames, read for `feed`'s subscriptions."""
    heard = feed.heard if feed is not None else 0
    rows = await log.read_rows(generation_id, after_seq, count)
    # Framed straight from the reply's bytes ("<seq>-0", [b"type", type, b"data", data,
    # b"t", ms]): no object per event on the catch-up path.
    frames = sse.event_frames((entry_id[:-2], fields[1], fields[3]) for entry_id, fields in rows)
    return Page(rows, frames, feed, heard)


class Subscription:
    """One client's position in one generation's log."""

    # Thousands of these live at once in one process: no per-instance __dict__.
    __slots__ = (
        "_ahead",
        "_alarm",
        "_deadline",
        "_first_page",
        "_first_read",
        "_heard",
        "_hub",
        "_live_hint",
        "_pending",
        "_pending_gap",
        "_queued_until",
        "_read_log",
        "_verify",
        "_waiter",
        "closed",
        "delivered",
        "feed",
        "fell_behind",
        "finished",
        "gap",
        "handed_after",
        "last_appended_ms",
        "requested_after",
        "sink",
    )

    def __init__(
        self,
        hub: Hub,
        feed: Feed,
        after_seq: int,
        first_page: asyncio.Future[Page] | None = None,
    ) -> None:
        self._hub = hub
        self.feed = feed
        self.requested_after = after_seq
        self.delivered = after_seq  # last seq handed to the client
        self.handed_after = after_seq  # the seq the last chunk handed out follows
        self._queued_until = after_seq  # live: last seq handed out or in `_pending`
        # A list and a future made only while waiting, not a deque and an asyncio.Event:
        # an idle connection costs ~1.5 KiB less (each deque is 760 bytes).
        self._pending: list[Frame] = []
        self._pending_gap: bytes | None = None
        self._read_log = True  # catch-up, back-fill or slow-client mode
        # Read before this subscription was made (`Hub.first_page`): handed out first.
        self._first_page = first_page
        # Every live batch the feed heard after it had heard this many was offered here.
        self._heard = feed.heard
        self._first_read = True
        self._live_hint = 0  # highest seq announced live
        self._waiter: asyncio.Future[None] | None = None
        self._alarm = 0.0  # when the hub's alarms wake this subscription; 0: not set
        self._deadline = 0.0  # of the current wait in `next_chunk`
        self.finished = False  # the terminal event was handed out
        self.closed = False  # unsubscribed, or the server is draining
        self.fell_behind = 0  # times the client's buffer overflowed
        self.gap: Gap | None = None
        self.last_appended_ms: int | None = None  # of the last event handed out
        # Look at the log's end the next time a read finds nothing after `delivered`: a
        # resumed client, or Redis may have come back with an older copy of the log.
        self._verify = after_seq > 0
        # `delivered` is past the log's end (the log went back): what follows it must be
        # the log's own reset, read from the log, or the client is sent `RESTART`.
        self._ahead = False
        # Set by a client whose chunks need no more than a write: while its task waits
        # with nothing pending, live batches go straight to it (see `offer`).
        self.sink: Sink | None = None

    @property
    def generation_id(self) -> str:
        return self.feed.generation_id

    @property
    def buffered(self) -> int:
        """Live events queued for the client (never more than the hub's `buffer_limit`)."""
        return len(self._pending)

    # -- called by the feed and the hub --------------------------------------

    def offer(self, frames: list[Frame]) -> None:
        """A live batch of this generation, in the order published."""
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
        if self.sink is not None and self._parked() and not fresh[-1].terminal:
            # The hub writes it to the sink once this turn of the loop has taken every
            # live batch at hand (`flush`): cheaper than waking the client's task, and
            # batches that arrived together still go out in one write.
            if not self._pending:
                self._hub.flush_soon(self)
            self._pending.extend(fresh)
            self._queued_until = fresh[-1].seq
            return
        self._pending.extend(fresh)
        self._queued_until = fresh[-1].seq
        self._wake()

    def _parked(self) -> bool:
        """Whether the client's task waits in `next_chunk` and nothing has woken it yet."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def flush(self) -> None:
        """Write what is pending to the sink (the hub calls it after `offer` asked it to)."""
        if not self._pending or not self._parked() or self._read_log or self.closed:
            return  # the client's task has it, or it was dropped for the log
        sink = self.sink
        if sink is None or not sink.ready():
            self._wake()  # the client is behind: its task writes, and waits for it
            return
        first_seq = self._pending[0].seq
        last = self._pending[-1]
        sink.send(self._take_pending(), first_seq, last.seq, last.appended_ms)

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

    def recheck(self, last_seq: int | None = None) -> None:
        """Live batches may have been missed: read the log, where they are.

        With `last_seq` (the log's, read a moment ago), only if it is past what was queued,
        or below what was handed out. Without it (the pub/sub connection came back, Redis
        perhaps with an older copy of the log) the log's end is looked at too.
        """
        if self.finished:
            return
        if last_seq is None:
            # Live batches were lost: a page read before now is not enough.
            self.offered_since(self.feed.heard)
        if last_seq is None or last_seq < self.delivered:
            self._verify = True
        if self._read_log:
            return
        if last_seq is None or last_seq > self._queued_until or self._verify:
            self._switch_to_log()

    def offered_since(self, heard: int) -> None:
        """Every live batch the feed heard after it had heard `heard` was offered here: a
        page read before that cannot be taken as caught up."""
        self._heard = heard

    def close(self) -> None:
        """Unsubscribed, or the server is draining: `next_chunk` returns None from now on."""
        self.closed = True
        if self._alarm:
            self._hub.alarms.cancel(self, self._alarm)
            self._alarm = 0.0
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
            self._wait_until(deadline, wait_seconds)
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _wait_until(self, deadline: float, wait_seconds: float) -> None:
        """Wake the coming wait at `deadline`, keeping the alarm set by an earlier wait.

        Not an alarm per wait: under load every wait ends with an event well before its
        deadline, and setting and cancelling one each time would cost a busy reader a
        noticeable share of its CPU. One alarm per subscription rings at most once per
        `wait_seconds` of events and moves itself on to the latest deadline.
        """
        self._deadline = deadline
        if self._alarm and self._alarm <= deadline + Alarms.lateness(wait_seconds):
            return  # an alarm set for an earlier wait rings in time for this one too
        alarms = self._hub.alarms
        if self._alarm:
            alarms.cancel(self, self._alarm)
        self._alarm = alarms.rounded(deadline, wait_seconds)
        alarms.set(self, self._alarm)

    def alarm_rang(self) -> None:
        self._alarm = 0.0
        if self._waiter is None:
            return  # not waiting: the next wait sets an alarm
        remaining = self._deadline - self._waiter.get_loop().time()
        if remaining > 0:
            self._wait_until(self._deadline, remaining)
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
        self.handed_after = self.delivered
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
        first, self._first_page = self._first_page, None
        try:
            async with asyncio.timeout(budget):
                page = await asyncio.shield(first) if first is not None else None
                if page is None or not (page.rows or self._trusts(page)):
                    page = await asyncio.shield(
                        self._hub.read_page(self.generation_id, self.delivered, self.feed)
                    )
        except TimeoutError:
            return None
        except RedisError as exc:
            # Hold the connection (heartbeats keep flowing) and retry: a passing
            # Redis fault must never turn into an error the browser gives up on.
            logger.warning("log read for %s failed, retrying: %s", self.generation_id, exc)
            await asyncio.sleep(min(budget, self._hub.retry_delay()))
            return None
        rows = page.rows
        # A short page: caught up, live takes over if it can; unless a live batch this
        # subscription was not offered may have followed it.
        caught_up = len(rows) < self._hub.page_size and self._trusts(page)
        if not rows:
            if not caught_up:
                return None  # read again
            self._first_read = False
            if self._verify:
                self._verify = False
                restart = await self._look_at_the_end(budget)
                if restart is not None:
                    return restart
            if self._ahead:
                # Nothing yet: wait. Below every seq, so that any live batch (`offer`)
                # or recheck sends it back to the log, where what follows is looked at.
                self._pending = []
                self._read_log = False
                self._queued_until = -1
                return None
            self._continue_live(self.delivered, caught_up=True)
            if self._read_log:
                # Announced live but not in the log: only a trimmed or expired log does
                # that. Live batches take over; the recheck loop covers the rest.
                self._pending = []
                self._read_log = False
                self._queued_until = self.delivered
            return None
        self._verify = False
        if self._ahead:
            self._ahead = False
            if not _announces_reset(rows[0], self.delivered):
                return self._restart("the log grew back past it with no reset")
        last_id, last_fields = rows[-1]
        last_seq = int(last_id[:-2])
        if self._first_read:
            self._first_read = False
            first_seq = int(rows[0][0][:-2])
            if first_seq > self.delivered + 1 and not _announces_reset(rows[0], self.delivered):
                self.gap = Gap(requested=self.delivered + 1, first_available=first_seq)
                self._pending_gap = sse.unnumbered_frame("gap", encode(self.gap))
        self._continue_live(last_seq, caught_up=caught_up)
        terminal = last_fields[1].decode() in TERMINAL_TYPES
        return self._deliver(page.frames, last_seq, int(last_fields[5]), terminal)

    def _trusts(self, page: Page) -> bool:
        """Whether what followed `page` in the log has reached this subscription live.

        Yes when its feed's channel was confirmed before the page was read and every live
        batch the feed heard since was offered here. A page read early, under another
        feed, or shared from a read sent before a batch this subscription was not offered
        (it was made later, or batches were lost) says where to go on, not what is next.
        """
        return page.feed is self.feed and page.heard >= self._heard

    async def _look_at_the_end(self, budget: float) -> bytes | None:
        """Nothing follows `delivered` in the log: is the log's end below it? Then the log
        went back (Redis lost writes) and this client holds seqs it does not. While the
        generation runs, its writer records that in the log (a reset past every seq it
        sent), so the client waits for it; a log that ended there never will: `RESTART`."""
        try:
            async with asyncio.timeout(budget):
                state = await self._hub.log.state(self.generation_id)
        except (TimeoutError, RedisError):
            self._verify = True  # the next empty read looks again
            return None
        if state is None or state.last_seq >= self.delivered:
            return None
        if state.terminal:
            return self._restart(f"the log ended at seq {state.last_seq}")
        logger.warning(
            "%s: a client holds seq %d, past the log's end at %d: the log went back; "
            "waiting for its reset",
            self.generation_id,
            self.delivered,
            state.last_seq,
        )
        self._ahead = True
        return None

    def _restart(self, why: str) -> bytes:
        """Tell the client to drop every event it holds (`RESTART`), and read the log again
        from its start: nothing in the log says which of its events are still true."""
        logger.warning(
            "%s: a client holds seq %d, which %s: sending it a reset from seq 1",
            self.generation_id,
            self.delivered,
            why,
        )
        self.delivered = self.handed_after = self._queued_until = 0
        self._pending = []
        self._read_log = True
        self._first_read = True
        self._ahead = False
        return RESTART


def _announces_reset(row: RawEntry, delivered: int) -> bool:
    """Whether `row` is a reset that voids every seq between `delivered` and it."""
    _, fields = row
    return fields[1] == b"reset" and _reset_decoder.decode(fields[3]).from_seq <= delivered + 1
