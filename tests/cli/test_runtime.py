"""The process runtime: the event loop `serve` and `worker` run on, and its collector."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from app.runtime import GC_YOUNG_THRESHOLD, run_loop
from app.settings import Settings


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    """run_loop tunes the process's collector: the test process gets its own back."""
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def test_serve_and_worker_run_on_uvloop_unless_told_otherwise() -> None:
    import uvloop

    assert isinstance(run_loop(Settings(), _running_loop()), uvloop.Loop)
    standard = run_loop(Settings(event_loop="asyncio"), _running_loop())
    assert not isinstance(standard, uvloop.Loop)
    assert isinstance(standard, asyncio.BaseEventLoop)


async def _collector() -> tuple[tuple[int, int, int], int]:
    return gc.get_threshold(), gc.get_freeze_count()


def test_what_is_loaded_is_frozen_and_young_collections_are_rare() -> None:
    gc.unfreeze()
    thresholds, frozen = run_loop(Settings(), _collector())
    assert thresholds == (GC_YOUNG_THRESHOLD, 10, 10)
    assert frozen > 0
