"""How the store talks to Redis: commands packed by hiredis, sent in per-tick pipelines.

Every command the store sends goes through `round_trip`: packed with
`hiredis.pack_command` (measured faster than a hand packer and redis-py's own:
scripts/bench_pack.py, docs/benchmarks.md), written on one connection of the
client's pool, replies read with `read_response` as Redis sent them (no redis-py
reply callbacks). `Pipeline` batches the calls made in one event-loop tick into
one round trip; a blocking read goes alone on a client of its own (`dedicated`).
On a Redis Cluster a batch goes as one round trip per primary (`app.store.cluster`).

Every round trip is bounded as a whole (`within`): a Redis that stops answering
with its connections open (SIGSTOP, a stalled host) fails the call with redis-py's
TimeoutError instead of hanging it. One timer per round trip, not per command:
redis-py's own `socket_timeout` would arm one per reply and one task per send, so
the clients tokentape builds leave it unset.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.store.scripts import A, K, Script

if TYPE_CHECKING:
    from app.store.cluster import ClusterRoutes

Arg = bytes | str | int | float
T = TypeVar("T")
# A call waiting for its round trip: the packed command, the script it runs (to load
# on NOSCRIPT), its caller's future, and the key that routes it on a cluster (None: any node).
Queued = tuple[bytes, Script[Any, Any] | None, asyncio.Future[Any], Arg | None]
# Sends commands to one place (a server, a cluster node) as one round trip: their replies.
Send = Callable[[Sequence[bytes]], Awaitable[list[Any]]]


def pack(*command: Arg) -> bytes:
    """One command in RESP, byte for byte what redis-py sends."""
    # hiredis's stub declares a 1-tuple where it takes any length.
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed


async def within(seconds: float | None, work: Awaitable[T]) -> T:
    """`work`, or redis-py's TimeoutError once it has taken `seconds` (None: unbounded)."""
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            return await work
    except TimeoutError:
        if not deadline.expired():
            raise  # a deadline of the caller's
        raise RedisTimeoutError(f"Redis did not answer within {seconds:g} s") from None


async def round_trip(
    redis: Redis, commands: Sequence[bytes], seconds: float | None = None
) -> list[Any]:
    """Each command's reply, or its error reply as the exception, in order.

    Raises redis-py's TimeoutError when the whole round trip (a free connection,
    connecting, sending, every reply) takes longer than `seconds`.
    """
    return await within(seconds, _round_trip(redis, commands))


async def _round_trip(redis: Redis, commands: Sequence[bytes]) -> list[Any]:
    pool = redis.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        return await exchange(connection, commands)
    finally:
        await pool.release(connection)


async def exchange(connection: AbstractConnection, commands: Sequence[bytes]) -> list[Any]:
    """`round_trip` on a connection the caller holds."""
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


async def call(redis: Redis, *command: Arg, seconds: float | None = None) -> Any:
    """One command in its own round trip, on the caller's task: a cancelled caller
    disconnects it (a blocking read must not outlive its reader)."""
    (reply,) = await round_trip(redis, [pack(*command)], seconds)
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
        self,
        redis: Redis | ClusterRoutes,
        *,
        in_flight: int | None = None,
        timeout: float | None = None,
    ) -> None:
        self._redis = redis
        self._routed = not isinstance(redis, Redis)  # a call's key is looked at only then
        self._timeout = timeout  # of each round trip (on a cluster: the routes' own)
        self._queued: list[Queued] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._sender_waiting = False  # a sender exists that has not taken the queue yet
        # With a bound, calls made while that many batches are out wait and leave
        # together in the next one: a burst makes a few large round trips instead of
        # many small ones queueing one by one for the pool's few connections.
        self._slots = asyncio.Semaphore(in_flight) if in_flight else None

    async def run(self, *command: Arg, key: Arg | None = None) -> Any:
        return await self.submit(*command, key=key)

    def submit(self, *command: Arg, key: Arg | None = None) -> asyncio.Future[Any]:
        """`run` as a future: many calls gathered make no task each.

        On a cluster the call goes to the node that serves `key`, by default the
        command's first argument (none: any node).
        """
        if self._routed and key is None and len(command) > 1:
            key = command[1]
        return self._submit(pack(*command), None, key)

    async def run_script(
        self, script: Script[K, A], keys: K, args: A, rest: Sequence[Arg] = ()
    ) -> Any:
        return await self.submit_script(script, keys, args, rest)

    def submit_script(
        self, script: Script[K, A], keys: K, args: A, rest: Sequence[Arg] = ()
    ) -> asyncio.Future[Any]:
        """`run_script` as a future: a caller that continues in a done-callback needs no task."""
        key = next(iter(keys), None) if self._routed else None
        return self._submit(pack(*script.evalsha, *keys, *args, *rest), script, key)

    def _submit(
        self, command: bytes, script: Script[Any, Any] | None, key: Arg | None
    ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((command, script, future, key))
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
            for _, _, future, _ in self._take_queued():
                future.cancel()
            raise
        try:
            await self._send_batch()
        finally:
            self._slots.release()

    def _take_queued(self) -> list[Queued]:
        queued, self._queued = self._queued, []
        self._sender_waiting = False
        return queued

    async def _send_batch(self) -> None:
        queued = self._take_queued()
        try:
            results = await self._execute(queued)
        except asyncio.CancelledError:
            for _, _, future, _ in queued:
                future.cancel()
            raise
        except Exception as exc:
            for _, _, future, _ in queued:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future, _), result in zip(queued, results, strict=True):
            if future.done():
                continue  # its caller was cancelled
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _execute(self, queued: Sequence[Queued]) -> list[Any]:
        redis = self._redis
        if isinstance(redis, Redis):
            send = functools.partial(round_trip, redis, seconds=self._timeout)
            return await send_loading_scripts(send, queued)
        return await redis.execute(queued)


async def send_loading_scripts(send: Send, queued: Sequence[Queued]) -> list[Any]:
    """Replies to `queued`, sent with `send`; a script Redis lacks is loaded and its calls
    sent again."""
    results = await send([command for command, _, _, _ in queued])
    missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
    if missing:
        # NOSCRIPT ran nothing: load each missing script, then send its calls again.
        scripts = {queued[i][1] for i in missing}
        loads = []
        for script in scripts:
            assert script is not None  # only EVALSHA answers NOSCRIPT
            loads.append(pack(b"SCRIPT", b"LOAD", script.source))
        loaded = await send(loads)
        for reply in loaded:
            if isinstance(reply, Exception):
                raise reply
        again = await send([queued[i][0] for i in missing])
        for i, result in zip(missing, again, strict=True):
            results[i] = result
    return results
