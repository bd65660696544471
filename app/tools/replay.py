"""`tokentape replay`: re-append a recording as a new generation, at its recorded pace.

The replay is its own writer: it creates the generation, takes its lease and
renews it while it waits, and enqueues no job, so no worker ever touches it. A
client pointed at the new generation sees the recorded events, in order, with
the recorded timing scaled by `speed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
from collections.abc import Sequence

import msgspec

from app import events
from app.clock import MONOTONIC, Clock
from app.errors import Conflict, InvalidRequest
from app.generations import GenerationRequest, Message
from app.keys import new_generation_id
from app.store import GenerationLog, Lease
from app.tools.recording import RecordedEvent, Recording

# Events per append call: bounds the Lua script's argument list.
MAX_BATCH = 256


@dataclasses.dataclass(frozen=True)
class ReplayResult:
    generation_id: str
    events: int  # events appended, the closing `replay_truncated` error included
    truncated: bool
    cancelled: bool
    # Per append: the new seq of its first event, and clock seconds since the replay began.
    schedule: list[tuple[int, float]]


class _CancelRequested(Exception):
    pass


def batches(recorded: Sequence[RecordedEvent], *, paced: bool) -> list[list[RecordedEvent]]:
    """Events appended in the same millisecond go in one batch (paced), else fill batches."""
    plan: list[list[RecordedEvent]] = []
    for entry in recorded:
        current = plan[-1] if plan else None
        if (
            current is not None
            and len(current) < MAX_BATCH
            and (not paced or current[0].appended_ms == entry.appended_ms)
        ):
            current.append(entry)
        else:
            plan.append([entry])
    return plan


def replay_request(recording: Recording, speed: float | None) -> GenerationRequest:
    """The recorded request (prompt, tools, parameters) marked as a replay; the replay
    writes the events itself, so its model is `sim` and no worker is asked for it."""
    source = recording.generation.id
    replay = {"replay_of": source, "replay_speed": "max" if speed is None else f"{speed:g}"}
    original = recording.generation.request
    if original is None:  # expired before the export, or an older recording
        return GenerationRequest(
            model="sim",
            messages=[Message(role="user", content=f"replay of generation {source}")],
            metadata=replay,
        )
    return msgspec.structs.replace(
        original, model="sim", metadata={**(original.metadata or {}), **replay}
    )


class Replayer:
    """Writes one recording into a new generation; `speed=None` means as fast as possible."""

    def __init__(
        self,
        log: GenerationLog,
        recording: Recording,
        *,
        speed: float | None = 1.0,
        clock: Clock = MONOTONIC,
        writer_id: str | None = None,
    ) -> None:
        if speed is not None and not speed > 0:
            raise InvalidRequest("invalid_speed", f"--speed must be above 0, got {speed:g}")
        self.log = log
        self.recording = recording
        self.speed = speed
        self.clock = clock
        self.writer_id = writer_id or f"replay:{socket.gethostname()}:{os.getpid()}"
        self._renew_every = log.settings.lease_seconds / 3
        self._renewed_at = 0.0

    async def create(self) -> str:
        """Create the replay's generation; its id can be handed to a client before `run`."""
        generation_id = new_generation_id()
        await self.log.create(generation_id, replay_request(self.recording, self.speed))
        return generation_id

    async def run(self, generation_id: str) -> ReplayResult:
        lease = await self.log.acquire(generation_id, self.writer_id)
        if lease is None:
            raise Conflict("replay_not_writable", f"cannot take the lease of {generation_id}")
        recorded = self.recording.events
        plan = batches(recorded, paced=self.speed is not None)
        schedule: list[tuple[int, float]] = []
        start = self._renewed_at = self.clock.now()
        origin_ms = recorded[0].appended_ms if recorded else 0
        next_seq = 1
        try:
            for batch in plan:
                if self.speed is not None:
                    due = start + (batch[0].appended_ms - origin_ms) / 1000 / self.speed
                    await self._wait_until(due, lease)
                else:
                    await self._renew_if_due(lease)
                next_seq = await self.log.append(lease, next_seq, [e.event() for e in batch]) + 1
                schedule.append((next_seq - len(batch), self.clock.now() - start))
        except _CancelRequested:
            await self.log.append(lease, next_seq, [events.Done(reason="cancelled")])
            return ReplayResult(generation_id, next_seq, False, True, schedule)
        except BaseException:
            # Interrupted (Ctrl-C, Redis error): end the generation so no client waits on it.
            await self._close_interrupted(lease, next_seq)
            raise
        truncated = self.recording.terminal is None
        if truncated:
            last = recorded[-1].seq if recorded else 0
            await self.log.append(
                lease,
                next_seq,
                [
                    events.Error(
                        code="replay_truncated",
                        message=f"the recording of {self.recording.generation.id} ends at seq "
                        f"{last} without a terminal event: it was exported mid-flight",
                    )
                ],
            )
            next_seq += 1
        return ReplayResult(generation_id, next_seq - 1, truncated, False, schedule)

    async def _wait_until(self, due: float, lease: Lease) -> None:
        # Sleep in slices no longer than the renew interval: a recorded stall of
        # minutes must not let the lease lapse (the abandon sweeper would close us).
        while (remaining := due - self.clock.now()) > 0:
            await self.clock.sleep(min(remaining, self._renew_every))
            await self._renew_if_due(lease)

    async def _renew_if_due(self, lease: Lease) -> None:
        if self.clock.now() - self._renewed_at < self._renew_every:
            return
        cancel_requested = await self.log.renew(lease)
        self._renewed_at = self.clock.now()
        if cancel_requested:
            raise _CancelRequested

    async def _close_interrupted(self, lease: Lease, next_seq: int) -> None:
        error = events.Error(code="replay_interrupted", message="the replay was stopped")
        # Best effort: the abandon sweeper closes the generation if this fails.
        with contextlib.suppress(Exception):
            await asyncio.shield(self.log.append(lease, next_seq, [error]))
