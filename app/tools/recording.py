"""The recording: a generation exported as versioned JSON lines.

Line 1 is a header (format name, version, the generation's metadata); every
following line is one event as the log held it: `{"seq", "type", "data",
"appended_ms"}` with `data` the event's JSON object. The format is documented in
docs/recording-format.md; bump `VERSION` on any change a version-1 reader
would misread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

import msgspec

from app import events
from app.errors import Expired, InvalidRequest, NotFound
from app.events import Event, LogEntry
from app.generations import GenerationRequest
from app.keys import check_generation_id
from app.store import GenerationLog, GenerationState, now_ms

FORMAT = "tokentape.recording"
VERSION = 1
PAGE_SIZE = 500


class BadRecording(InvalidRequest):
    """The file is not a tokentape recording, or a line of it is malformed."""

    code = "bad_recording"


class UnsupportedRecordingVersion(InvalidRequest):
    """The recording was written by a newer (or unknown) version of the format."""

    code = "unsupported_recording_version"


class GenerationInfo(msgspec.Struct, frozen=True):
    """The recorded generation's metadata, as its status hash held it at export."""

    id: str
    model: str
    status: str
    created_ms: int
    last_seq: int
    started_ms: int | None = None
    finished_ms: int | None = None
    finish_reason: str | None = None
    attempts: int = 0
    # The request's `metadata` (a replay carries `replay_of` here).
    metadata: dict[str, str] | None = None
    # The request itself (messages, tools, parameters): what `replay` creates its
    # generation with. None once it expired, and in recordings made before it was kept.
    request: GenerationRequest | None = None


class RecordingHeader(msgspec.Struct, frozen=True):
    format: str
    version: int
    generation: GenerationInfo
    exported_ms: int


class RecordedEvent(msgspec.Struct, frozen=True):
    seq: int
    type: str
    data: msgspec.Raw  # the event's JSON object, byte for byte as the log held it
    appended_ms: int

    def event(self) -> Event:
        return events.decode(bytes(self.data))


@dataclasses.dataclass(frozen=True)
class Recording:
    header: RecordingHeader
    events: list[RecordedEvent]

    @property
    def generation(self) -> GenerationInfo:
        return self.header.generation

    @property
    def terminal(self) -> RecordedEvent | None:
        """The terminal event, or None when the recording was taken mid-flight."""
        if self.events and self.events[-1].type in events.TERMINAL_TYPES:
            return self.events[-1]
        return None

    @property
    def first_seq(self) -> int | None:
        return self.events[0].seq if self.events else None


class _Preamble(msgspec.Struct):
    """Just enough of line 1 to tell the format and version before trusting the rest."""

    format: str | None = None
    version: int | None = None


_encoder = msgspec.json.Encoder()
_preamble_decoder = msgspec.json.Decoder(_Preamble)
_header_decoder = msgspec.json.Decoder(RecordingHeader)
_event_decoder = msgspec.json.Decoder(RecordedEvent)


# -- writing ----------------------------------------------------------------


def header_line(header: RecordingHeader) -> bytes:
    return _encoder.encode(header) + b"\n"


def event_line(entry: LogEntry) -> bytes:
    recorded = RecordedEvent(
        seq=entry.seq, type=entry.type, data=msgspec.Raw(entry.data), appended_ms=entry.appended_ms
    )
    return _encoder.encode(recorded) + b"\n"


def recording_lines(recording: Recording) -> Iterable[bytes]:
    yield header_line(recording.header)
    for recorded in recording.events:
        yield _encoder.encode(recorded) + b"\n"


# -- reading a file ---------------------------------------------------------


def parse_recording(lines: Iterable[bytes], source: str) -> Recording:
    """Validate and decode a recording; errors name the source and line."""
    iterator = iter(lines)
    first = next(iterator, b"")
    try:
        preamble = _preamble_decoder.decode(first)
    except msgspec.DecodeError:
        raise BadRecording(message=f"{source}: line 1 is not a recording header") from None
    if preamble.format != FORMAT:
        raise BadRecording(message=f"{source}: not a {FORMAT} file (format={preamble.format!r})")
    if preamble.version != VERSION:
        raise UnsupportedRecordingVersion(
            message=f"{source}: format version {preamble.version}, this tokentape reads "
            f"version {VERSION}; use the tokentape that exported it"
        )
    try:
        header = _header_decoder.decode(first)
    except msgspec.DecodeError as exc:
        raise BadRecording(message=f"{source}: line 1: {exc}") from None

    recorded: list[RecordedEvent] = []
    for number, line in enumerate(iterator, start=2):
        if not line.strip():
            continue
        try:
            entry = _event_decoder.decode(line)
            event = entry.event()
        except msgspec.DecodeError as exc:
            raise BadRecording(message=f"{source}: line {number}: {exc}") from None
        if events.event_type(event) != entry.type:
            raise BadRecording(
                message=f"{source}: line {number}: type {entry.type!r} but data is "
                f"{events.event_type(event)!r}"
            )
        if recorded and entry.seq <= recorded[-1].seq:
            raise BadRecording(message=f"{source}: line {number}: seq {entry.seq} out of order")
        if recorded and recorded[-1].type in events.TERMINAL_TYPES:
            raise BadRecording(message=f"{source}: line {number}: event after the terminal event")
        recorded.append(entry)
    return Recording(header=header, events=recorded)


def read_file(path: Path) -> Recording:
    try:
        with path.open("rb") as file:
            return parse_recording(file, str(path))
    except OSError as exc:
        raise BadRecording(message=f"cannot read {path}: {exc.strerror}") from None


# -- reading from the log ---------------------------------------------------


async def generation_info(log: GenerationLog, generation_id: str) -> GenerationInfo:
    """The generation's metadata; NotFound or Expired when there is nothing to export."""
    check_generation_id(generation_id)
    state, log_exists = await log.snapshot(generation_id)
    if state is None:
        raise NotFound(
            "generation_not_found",
            f"no generation {generation_id} under prefix {log.keys.prefix!r}: "
            "check --redis and --prefix, or it outlived metadata retention",
        )
    if state.last_seq > 0 and not log_exists:
        raise Expired(
            "generation_expired",
            f"the events of {generation_id} were removed by retention "
            f"(status {state.status}, {state.last_seq} events)",
        )
    return _info(state, await log.request(generation_id))


def _info(state: GenerationState, request: GenerationRequest | None) -> GenerationInfo:
    return GenerationInfo(
        id=state.id,
        model=state.model,
        status=state.status,
        created_ms=state.created_ms,
        last_seq=state.last_seq,
        started_ms=state.started_ms,
        finished_ms=state.finished_ms,
        finish_reason=state.finish_reason,
        attempts=state.attempts,
        metadata=request.metadata if request is not None else None,
        request=request,
    )


Progress = Callable[[int, int], None]


async def export(
    log: GenerationLog,
    generation_id: str,
    write: Callable[[bytes], object],
    progress: Progress | None = None,
) -> int:
    """Write the generation as a recording, streaming page by page; returns the event count."""
    info = await generation_info(log, generation_id)
    write(header_line(RecordingHeader(FORMAT, VERSION, info, now_ms())))
    first = await log.first_seq(generation_id) or 1
    total = max(info.last_seq - first + 1, 0)
    written = 0
    async for page in log.pages(generation_id, PAGE_SIZE):
        for entry in page:
            write(event_line(entry))
        written += len(page)
        if progress is not None:
            progress(written, max(total, written))
    return written


async def fetch(log: GenerationLog, generation_id: str) -> Recording:
    """The generation as an in-memory recording (for inspect and replay by id)."""
    info = await generation_info(log, generation_id)
    exported = now_ms()
    recorded = [
        RecordedEvent(e.seq, e.type, msgspec.Raw(e.data), e.appended_ms)
        async for page in log.pages(generation_id, PAGE_SIZE)
        for e in page
    ]
    return Recording(RecordingHeader(FORMAT, VERSION, info, exported), recorded)
