"""How the store talks to Redis: commands packed by hiredis, sent in per-tick pipelines.

Every command the store sends goes through `round_trip`: packed with
`hiredis.pack_command` (measured faster than a hand packer and redis-py's own:
scripts/bench_pack.py, docs/benchmarks.md), written on one connection of the
client's pool, replies read with `read_response` as Redis sent them (no redis-py
reply callbacks). `Pipeline` batches the calls made in one event-loop tick into
one round trip; a blocking read goes alone on a client of its own (`dedicated`).

Every round trip is bounded as a whole (`timeout`): a Redis that stops answering
with its connections open (SIGSTOP, a stalled host) fails the call with redis-py's
TimeoutError instead of hanging it. One timer per round trip, not per command:
redis-py's own `socket_timeout` would arm one per reply and one task per send, so
the clients tokentape builds leave it unset.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.store.scripts import A, K, Script

Arg = bytes | str | int | float
# A call waiting for its round trip: the packed command, the script it runs (to load
# on NOSCRIPT), and its caller's future.
_Queued = tuple[bytes, Script[Any, Any] | None, asyncio.Future[Any]]


def pack(*command: Arg) -> bytes:
    """One command in RESP, byte for byte what redis-py sends."""
    # hiredis's stub declares a 1-tuple where it takes any length.
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed


async def round_trip(
    redis: Redis, commands: Sequence[bytes], within: float | None = None
) -> list[Any]:
    """Each command's reply, or its error reply as the exception, in order.

    Raises redis-py's TimeoutError when the whole round trip (a free connection,
    connecting, sending, every reply) takes longer than `within` seconds.
    """
    pool = redis.connection_pool
    deadline = asyncio.timeout(within)
    try:
        async with deadline:
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                await connection.send_packed_command(commands)
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await connection.read_response())
                    except ResponseError as error:
                        replies.append(error)
                return replies
            except BaseException:
                # Replies may be left unread (a lost connection, a cancellation, the
                # timeout): the socket must not serve another call.
                await connection.disconnect(nowait=True)
                raise
            finally:
                await pool.release(connection)
    except TimeoutError:
        if not deadline.expired():
            raise  # a deadline of the caller's
        raise RedisTimeoutError(f"Redis did not answer within {within:g} s") from None


async def call(redis: Redis, *command: Arg, within: float | None = None) -> Any:
    """One command in its own round trip, on the caller's task: a cancelled caller
    disconnects it (a blocking read must not outlive its reader)."""
    (reply,) = await round_trip(redis, [pack(*command)], within)
    if isinstance(reply, Exception):
        raise reply
    return reply


def dedicated(redis: Redis, connections: int = 1) -> Redis:
    """A client like `redis` with a pool of its own, for blocking reads and subscriptions."""
    pool = redis.connection_pool
    # redis-py 8 gives connections a 5 s socket timeout by default, which cuts
    # XREADGROUP BLOCK and pub/sub reads short.
    kwargs = {**pool.connection_kwargs, "socket_timeout": None}
    own = BlockingConnectionPool(
        connection_class=pool.connection_class, max_connections=connections, timeout=None, **kwargs
    )
    return Redis.from_pool(own)


class Pipeline:
    """Calls requested in the same event-loop tick go to Redis as one pipeline.

    A worker running a thousand generations at 20 tokens/s appends one event per
    generation at a time, and a reader catching up a thousand streams reads a page
    each: one round trip per call would queue them all on a few connections, and
    redis-py spends more CPU per command than Redis does. The pipeline is not a
    transaction: each call stays atomic on its own, and one call's error reaches only
    its caller. A lost connection fails every call of the pipeline, applied or not,
    and nothing is re-sent here: callers retry only what is idempotent (appends,
    renewals, reads; an acquire whose reply was lost is not retried, its lease
    expires).

    Scripts go as EVALSHA, not through redis-py's Script: its pipelines check
    registered scripts with SCRIPT EXISTS on every execute, a round trip more per
    batch. A script Redis lacks (a restart, SCRIPT FLUSH) is loaded on NOSCRIPT, and
    only its calls are sent again.
    """

    def __init__(
        self, redis: Redis, *, in_flight: int | None = None, timeout: float | None = None
    ) -> None:
        self._redis = redis
        self._timeout = timeout  # of each round trip
        self._queued: list[_Queued] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._sender_waiting = False  # a sender exists that has not taken the queue yet
        # With a bound, calls made while that many batches are out wait and leave
        # together in the next one: a burst makes a few large round trips instead of
        # many small ones queueing one by one for the pool's few connections.
        self._slots = asyncio.Semaphore(in_flight) if in_flight else None

    async def run(self, *command: Arg) -> Any:
        return await self.submit(*command)

    def submit(self, *command: Arg) -> asyncio.Future[Any]:
        """`run` as a future: many calls gathered make no task each."""
        return self._submit(pack(*command), None)

    async def run_script(
        self, script: Script[K, A], keys: K, args: A, rest: Sequence[Arg] = ()
    ) -> Any:
        return await self.submit_script(script, keys, args, rest)

    def submit_script(
        self, script: Script[K, A], keys: K, args: A, rest: Sequence[Arg] = ()
    ) -> asyncio.Future[Any]:
        """`run_script` as a future: a caller that continues in a done-callback needs no task."""
        return self._submit(pack(*script.evalsha, *keys, *args, *rest), script)

    def _submit(self, command: bytes, script: Script[Any, Any] | None) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((command, script, future))
        if not self._sender_waiting:
            # Starts at the next tick (or once a batch comes back) and takes
            # everything queued by then.
            self._sender_waiting = True
            task = asyncio.create_task(self._send_queued())
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        return future

    async def _send_queued(self) -> None:
        if self._slots is None:
            await self._send_batch()
            return
        try:
            await self._slots.acquire()
        except asyncio.CancelledError:
            for _, _, future in self._take_queued():
                future.cancel()
            raise
        try:
            await self._send_batch()
        finally:
            self._slots.release()

    def _take_queued(self) -> list[_Queued]:
        queued, self._queued = self._queued, []
        self._sender_waiting = False
        return queued

    async def _send_batch(self) -> None:
        queued = self._take_queued()
        try:
            results = await self._execute(queued)
        except asyncio.CancelledError:
            for _, _, future in queued:
                future.cancel()
            raise
        except Exception as exc:
            for _, _, future in queued:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), result in zip(queued, results, strict=True):
            if future.done():
                continue  # its caller was cancelled
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _execute(self, queued: Sequence[_Queued]) -> list[Any]:
        results = await round_trip(
            self._redis, [command for command, _, _ in queued], self._timeout
        )
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            # NOSCRIPT ran nothing: load each missing script, then send its calls again.
            scripts = {queued[i][1] for i in missing}
            for script in scripts:
                assert script is not None  # only EVALSHA answers NOSCRIPT
                await call(self._redis, b"SCRIPT", b"LOAD", script.source, within=self._timeout)
            again = await round_trip(self._redis, [queued[i][0] for i in missing], self._timeout)
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results
