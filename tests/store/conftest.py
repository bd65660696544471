"""Helpers for the store's tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis


def count_round_trips(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, *, hold_first: asyncio.Event | None = None
) -> list[int]:
    """One entry per connection taken from the pool (a round trip takes one). With
    `hold_first`, the first round trip waits for its connection until that is set."""
    taken: list[int] = []
    pool = redis.connection_pool
    original: Callable[..., Awaitable[Any]] = pool.get_connection

    async def get_connection(*args: Any, **kwargs: Any) -> Any:
        taken.append(1)
        if hold_first is not None and len(taken) == 1:
            await hold_first.wait()
        return await original(*args, **kwargs)

    monkeypatch.setattr(pool, "get_connection", get_connection)
    return taken
