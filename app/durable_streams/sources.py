"""What a read serves: a stored stream, or a generation's log seen as a stream.

A generation reads as a JSON-mode stream: one message per event (its JSON, as the
SSE endpoint sends it), offset `n` after event `n`, closed after the terminal event.
"""

from __future__ import annotations

from typing import Protocol

from app.access import Caller
from app.durable_streams import protocol
from app.durable_streams.protocol import Position
from app.errors import Expired, InvalidRequest, NotFound
from app.store import GenerationLog
from app.store.streams import PAGE_ENTRIES, Page, StreamStore


class Source(Protocol):
    """A readable stream: its pages after a position, its metadata, its wake-up channel."""

    channel: str

    async def read(self, position: Position, *, refresh: bool) -> Page: ...

    async def metadata(self) -> Page: ...


class StoredStream:
    """A stream created through the protocol."""

    def __init__(self, store: StreamStore, name: str) -> None:
        self.store = store
        self.name = name
        self.channel = store.channel(name)

    async def read(self, position: Position, *, refresh: bool) -> Page:
        return await self.store.read(self.name, position, refresh=refresh)

    async def metadata(self) -> Page:
        return await self.store.metadata(self.name)


class GenerationStream:
    """A generation's log as a JSON-mode stream, closed by its terminal event."""

    def __init__(
        self, log: GenerationLog, generation_id: str, reader: Caller | None = None
    ) -> None:
        self.log = log
        self.generation_id = generation_id
        # An API key holder sees only its own generations (None: no check left to make).
        self.reader = reader
        self.channel = log.keys.live_channel(generation_id)

    async def read(self, position: Position, *, refresh: bool) -> Page:
        state, log_exists = await self.log.snapshot(self.generation_id)
        if state is None or (self.reader is not None and not self.reader.owns(state.owner)):
            raise NotFound("generation_not_found", f"no generation {self.generation_id}")
        if state.terminal and not log_exists:
            raise Expired(
                "generation_expired", f"the events of {self.generation_id} are past retention"
            )
        after = state.last_seq if position.now else position.seq
        if after > state.last_seq:
            raise InvalidRequest("invalid_offset", "the offset is past the generation's last event")
        rows = await self.log.read_rows(self.generation_id, after, PAGE_ENTRIES)
        if rows and int(rows[0][0][:-2]) != after + 1 and not position.start:
            raise Expired("offset_expired", "the events after that offset are past retention")
        entries = [fields[3] for _, fields in rows]
        next_seq = int(rows[-1][0][:-2]) if rows else after
        return Page(
            entries=entries,
            next_seq=next_seq,
            # Events appended since the snapshot are read too; closure is the snapshot's.
            tail_seq=max(state.last_seq, next_seq),
            closed=state.terminal,
            content_type=protocol.JSON,
            stream_id=self.generation_id,
        )

    async def metadata(self) -> Page:
        return await self.read(Position(now=True), refresh=False)
