"""Per API key quotas, shared by every reader: generations running, creations per minute.

`admit.lua` decides atomically on the owner's own keys (one hash tag). A generation
that ended stays in its owner's running set until an admission finds the set full:
then the statuses of its members are read (a round trip) and the ended ones dropped
before asking once more. So the limit is never exceeded, and the common path costs
one round trip.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Literal

from app.generations import TERMINAL_STATUSES
from app.keys import Keys
from app.settings import Settings
from app.store.scripts import ADMIT, AdmitArgs, AdmitKeys, Reply
from app.store.transport import Pipeline

# A member whose generation has no metadata yet may be one admitted a moment ago whose
# create has not run; only one older than this is taken for gone (expired, or a create
# that failed after its admission).
CREATE_GRACE_MS = 10_000


@dataclasses.dataclass(frozen=True, slots=True)
class Admission:
    """Whether a creation may go ahead, and if not which limit refused it and for how long."""

    refused_by: Literal["rate", "running"] | None = None
    retry_after_seconds: float = 0.0

    @property
    def admitted(self) -> bool:
        return self.refused_by is None


ADMITTED = Admission()


class Quotas:
    """Admissions of creations per API key owner (`app.access.Caller.owner`)."""

    def __init__(self, keys: Keys, settings: Settings, commands: Pipeline) -> None:
        self._keys = keys
        self._commands = commands
        self._max_running = settings.max_running_per_key
        self._max_per_minute = settings.max_creations_per_minute
        # An owner's running set outlives its longest possible generation's metadata.
        self._running_ttl_ms = int(
            (settings.abandon_after_seconds + settings.metadata_retention_seconds) * 1000
        )

    async def admit(self, owner: str, generation_id: str) -> Admission:
        """Count `generation_id` against `owner`'s quotas, or say which one refuses it."""
        if not self._max_running and not self._max_per_minute:
            return ADMITTED
        reply = await self._admit(owner, generation_id)
        if ADMIT.reply(reply[0]) is Reply.RUNNING:
            ended = await self._ended(int(reply[1]), reply[2:])
            if ended:
                await self._commands.run(b"ZREM", self._keys.owner_running(owner), *ended)
                reply = await self._admit(owner, generation_id)
        code = ADMIT.reply(reply[0])
        if code is Reply.OK:
            return ADMITTED
        if code is Reply.RATE:
            return Admission("rate", int(reply[1]) / 1000)
        # When a running generation ends is not known: a retry after a few seconds is fair.
        return Admission("running", 5.0)

    async def _admit(self, owner: str, generation_id: str) -> Any:
        return await self._commands.run_script(
            ADMIT,
            AdmitKeys(
                running=self._keys.owner_running(owner), created=self._keys.owner_created(owner)
            ),
            AdmitArgs(
                generation_id=generation_id,
                max_running=self._max_running,
                max_per_minute=self._max_per_minute,
                running_ttl_ms=self._running_ttl_ms,
            ),
        )

    async def _ended(self, now_ms: int, members: list[bytes]) -> list[bytes]:
        """Of the (id, admitted ms) pairs, the ids whose generation ended or is gone."""
        ids, admitted = members[0::2], members[1::2]
        statuses = await asyncio.gather(
            *(
                self._commands.submit(b"HGET", self._keys.meta(raw.decode()), b"status")
                for raw in ids
            )
        )
        ended: list[bytes] = []
        for raw, at, status in zip(ids, admitted, statuses, strict=True):
            if status is None:
                if now_ms - int(float(at)) > CREATE_GRACE_MS:
                    ended.append(raw)
            elif status.decode() in TERMINAL_STATUSES:
                ended.append(raw)
        return ended
