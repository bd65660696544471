"""The store on a Redis Cluster: which primary serves each call, and how a batch reaches it.

A batch of calls (`app.store.transport.Pipeline`) goes as one round trip per primary,
routed by redis-py's slot map (`RedisCluster.get_node_from_key`) over the connections
redis-py keeps for each node (`ClusterNode.acquire_connection`): at most the client's
`max_connections` less one per node at once, the one left to redis-py's own cluster
pub/sub on the same client (a worker's cancel subscription). The bound is the client's:
every `ClusterRoutes` on one client (the generation log's, the Durable Streams') shares
it. What a reshard or a failover answers is handled here and never reaches a caller:

- MOVED: the slot has a new owner. redis-py's slot map is patched as its own client
  does (`NodesManager.move_slot`) and the call is sent there.
- ASK: the slot is being migrated and the call's keys are already on the target: the
  call goes there, once, after ASKING.
- TRYAGAIN (a script's keys are split between the two ends of a migration),
  CLUSTERDOWN (a failover under way) and UNBLOCKED (a blocking read on a primary that
  became a replica): the call is sent again after a pause, the last two once the slot
  map was read again.

Redirections are followed for up to `REDIRECT_BUDGET_SECONDS`, then the call fails with
`ClusterUnsettled`, a connection error: callers retry it as they retry a lost
connection. A node that cannot be reached fails its own calls only, and the slot map
is read again so that the retry finds the new primary.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.store import transport
from app.store.transport import Arg, Queued

logger = logging.getLogger("tokentape.store")

REDIRECT_BUDGET_SECONDS = 5.0
# Pauses before sending again what TRYAGAIN or CLUSTERDOWN refused, doubling up to the last.
FIRST_PAUSE_SECONDS = 0.01
LONGEST_PAUSE_SECONDS = 0.2
_ASKING = transport.pack(b"ASKING")
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
# The connections each node of a client may lend at once, by node name: shared by every
# `ClusterRoutes` on that client, or two of them would ask a node for more than its pool
# holds (redis-py raises MaxConnectionsError then).
_NODE_BOUNDS: weakref.WeakKeyDictionary[RedisCluster, dict[str, asyncio.Semaphore]] = (
    weakref.WeakKeyDictionary()
)


class ClusterUnsettled(RedisConnectionError):
    """The cluster kept redirecting a call (a reshard or a failover that does not end):
    as passing as a lost connection, and retried by callers as one."""


async def refresh_slot_map(cluster: RedisCluster) -> None:
    """Read the slot map again from the cluster (after a node was lost, or a slot moved)."""
    try:
        # Trap: a client whose own initialize() never ran would not close in aclose()
        # the connections a refresh opens.
        await cluster.initialize()
        await cluster.nodes_manager.initialize()
    except (RedisError, OSError) as exc:
        logger.warning("reading the cluster's slot map failed: %s", exc)


def node_of(cluster: RedisCluster, key: Arg) -> ClusterNode:
    """The primary that serves `key` in redis-py's slot map; SlotNotCoveredError if none."""
    name = key.decode() if isinstance(key, bytes) else str(key)
    node = cluster.get_node_from_key(name)
    assert node is not None  # a primary is asked for, never a replica
    return node


def routes_for(redis: Redis | RedisCluster, timeout: float) -> Redis | ClusterRoutes:
    """What the store's pipelines send through: a cluster's routes, or the one Redis itself."""
    return ClusterRoutes(redis, timeout=timeout) if isinstance(redis, RedisCluster) else redis


class ClusterRoutes:
    """The primaries of a cluster as the store's calls reach them: see the module docstring."""

    def __init__(self, cluster: RedisCluster, *, timeout: float | None = None) -> None:
        self.cluster = cluster
        self.timeout = timeout  # of each round trip to a node
        self._in_use = _NODE_BOUNDS.setdefault(cluster, {})

    async def call(self, *command: Arg, key: Arg, extra_seconds: float = 0.0) -> Any:
        """One command on the node that serves `key` (a blocking read holds its connection,
        and gives the time it blocks as `extra_seconds` beyond the timeout)."""
        call: Queued = (transport.pack(*command), None, _unused(), key)
        (reply,) = await self.execute([call], extra_seconds)
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def scan(self, match: str) -> list[bytes]:
        """Every key matching the glob `match` on every primary, by SCAN. A slot that moves
        meanwhile may have its keys found twice or missed."""
        await self.cluster.initialize()
        found: list[bytes] = []
        for node in self.cluster.get_primaries():
            cursor = b"0"
            while True:
                command = transport.pack(b"SCAN", cursor, b"MATCH", match, b"COUNT", 1000)
                (reply,) = await self._send(node, False, 0.0, [command])
                if isinstance(reply, Exception):
                    raise reply
                cursor, keys = reply
                found.extend(keys)
                if cursor == b"0":
                    break
        return found

    async def execute(self, calls: Sequence[Queued], extra_seconds: float = 0.0) -> list[Any]:
        """Each call's reply, or its error as the exception, in order."""
        await self.cluster.initialize()
        results: list[Any] = [None] * len(calls)
        todo: list[tuple[int, AskError | None]] = [(i, None) for i in range(len(calls))]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REDIRECT_BUDGET_SECONDS
        pause = FIRST_PAUSE_SECONDS
        rounds = 0
        while True:
            rounds += 1
            groups: dict[tuple[ClusterNode, bool], list[int]] = {}
            waiting: list[int] = []
            for i, ask in todo:
                try:
                    node = self._node(calls[i][3], ask)
                except SlotNotCoveredError:
                    waiting.append(i)
                    continue
                groups.setdefault((node, ask is not None), []).append(i)
            outcomes = await asyncio.gather(
                *(
                    transport.send_loading_scripts(
                        functools.partial(self._send, node, asking, extra_seconds),
                        [calls[i] for i in indices],
                    )
                    for (node, asking), indices in groups.items()
                ),
                return_exceptions=True,
            )
            todo = [(i, None) for i in waiting]
            must_wait = refresh = bool(waiting)
            for ((node, _), indices), outcome in zip(groups.items(), outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, Exception):
                        raise outcome  # cancelled
                    if isinstance(outcome, _UNREACHABLE):
                        logger.warning("cluster node %s failed: %s", node.name, outcome)
                        refresh = True
                    for i in indices:
                        results[i] = outcome
                    continue
                for i, reply in zip(indices, outcome, strict=True):
                    if isinstance(reply, MovedError):
                        await self.cluster.nodes_manager.move_slot(reply)
                        todo.append((i, None))
                    elif isinstance(reply, AskError):
                        todo.append((i, reply))
                    elif isinstance(reply, TryAgainError):
                        must_wait = True
                        todo.append((i, None))
                    elif isinstance(reply, ClusterDownError) or _unblocked(reply):
                        must_wait = refresh = True
                        todo.append((i, None))
                    else:
                        results[i] = reply
            if refresh:
                await refresh_slot_map(self.cluster)
            if not todo:
                return results
            if loop.time() >= deadline:
                for i, _ in todo:
                    results[i] = ClusterUnsettled(
                        f"the cluster kept redirecting a call for {REDIRECT_BUDGET_SECONDS:g} s"
                    )
                return results
            # A MOVED or ASK is followed at once; anything that must wait, or a call
            # redirected round after round (the slot map catching up), waits a little.
            if must_wait or rounds > 2:
                await asyncio.sleep(pause)
                pause = min(pause * 2, LONGEST_PAUSE_SECONDS)

    def _node(self, key: Arg | None, ask: AskError | None) -> ClusterNode:
        cluster = self.cluster
        if ask is not None:
            node = cluster.get_node(host=ask.host, port=ask.port)
            if node is None:
                raise SlotNotCoveredError(f"{ask.host}:{ask.port} is not in the slot map yet")
            return node
        if key is None:
            return cluster.get_default_node()
        return node_of(cluster, key)

    async def _send(
        self, node: ClusterNode, asking: bool, extra_seconds: float, commands: Sequence[bytes]
    ) -> list[Any]:
        """One round trip to `node` (bounded by `timeout` + `extra_seconds`); with
        `asking`, each command after ASKING."""
        seconds = None if self.timeout is None else self.timeout + extra_seconds
        return await transport.within(seconds, self._exchange(node, asking, commands))

    async def _exchange(
        self, node: ClusterNode, asking: bool, commands: Sequence[bytes]
    ) -> list[Any]:
        in_use = self._in_use.get(node.name)
        if in_use is None:
            in_use = self._in_use[node.name] = asyncio.Semaphore(max(1, node.max_connections - 1))
        if asking:
            commands = [part for command in commands for part in (_ASKING, command)]
        async with in_use:
            connection = node.acquire_connection()
            try:
                await node.disconnect_if_needed(connection)
                replies = await transport.exchange(connection, commands)
            finally:
                node.release(connection)
        return replies[1::2] if asking else replies


def _unblocked(reply: Any) -> bool:
    """A blocking command cut short because its node stopped being a primary."""
    return isinstance(reply, ResponseError) and str(reply).startswith("UNBLOCKED")


def _unused() -> asyncio.Future[Any]:
    """A call's future that nobody awaits: `ClusterRoutes.call` returns the reply itself."""
    return asyncio.get_running_loop().create_future()
