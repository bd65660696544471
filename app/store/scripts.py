"""The Lua scripts, each declared once with its KEYS and ARGV by name.

A script's KEYS and ARGV are two NamedTuples: callers fill them by name, and
loading binds each entry to a Lua local of the same name, after the shared
prelude (`lua/prelude.lua`), so a script in `lua/` reads `meta` and `first_seq`,
never `KEYS[1]` or `ARGV[2]`, and still runs as one EVALSHA. A script that takes
a variable tail (`rest`) finds its first entry at `<rest>_from`. Scripts over the same
KEYS may share functions of their own (`library`: a file of `lua/` loaded after the
names are bound, so its functions see them).

Every script touches the keys of one generation (one hash tag, one Cluster slot),
except `index`, which touches those of one shard (`app.keys.Shard`, one slot too), and
`admit`, which touches the keys of one API key owner (one hash tag of its own).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Generic, NamedTuple, Protocol, TypeVar, cast

from app.generations import TERMINAL_STATUSES

if TYPE_CHECKING:
    from app.store.transport import Arg


class Reply(enum.Enum):
    """The codes scripts answer with, first in their reply."""

    OK = b"ok"
    DUPLICATE = b"duplicate"  # a retry of an applied batch: done already
    FENCED = b"fenced"  # the writer's lease epoch is not current
    ALREADY_FINISHED = b"already_finished"  # the terminal event is appended
    SEQ_CONFLICT = b"seq_conflict"  # the writer's seq disagrees with the log
    UNKNOWN = b"unknown"  # no such generation (never created, or expired)
    RATE = b"rate"  # an API key's creations per minute are spent
    RUNNING = b"running"  # an API key runs as many generations as it may
    ACTIVE = b"active"  # a conditional close found the generation active
    HELD = b"held"  # another worker holds the lease
    # Durable Streams' scripts (`app.store.stream_scripts`)
    CREATED = b"created"
    EXISTS = b"exists"  # with the configuration asked for
    CONFLICT = b"conflict"  # exists with another configuration
    MISSING = b"missing"  # no such stream (never created, or expired)
    DELETED = b"deleted"  # deleted, its name held by forks that live (a tombstone)
    TOMBSTONE = b"tombstone"  # a delete left a tombstone
    REMOVED = b"removed"  # a delete removed every key
    KEPT = b"kept"  # not a tombstone free to collect
    CLOSED = b"closed"  # nothing can be appended
    CLOSED_AGAIN = b"closed_again"  # a repeated close
    CLOSED_DUPLICATE = b"closed_duplicate"  # a retry of the producer request that closed it
    CONTENT_TYPE_MISMATCH = b"content_type_mismatch"
    STALE_EPOCH = b"stale_epoch"  # a newer epoch of the producer has written
    EPOCH_SEQ = b"epoch_seq"  # a producer's new epoch does not start at seq 0
    SEQ_GAP = b"seq_gap"  # a producer skipped a seq
    STREAM_SEQ_REGRESSION = b"stream_seq_regression"  # Stream-Seq does not sort after the last
    BEYOND = b"beyond"  # an offset past the tail
    TRIMMED = b"trimmed"  # the length cap trimmed entries after the offset
    RESET = b"reset"  # the log went back: a reset entry now says so
    INTACT = b"intact"  # the log holds what the writer appended
    # Subscriptions' scripts (`app.store.subscription_scripts`)
    WOKEN = b"woken"  # a new wake was issued
    QUIET = b"quiet"  # no new wake
    DELIVER = b"deliver"  # a wake's delivery is this caller's to make now
    WAIT = b"wait"  # nothing to deliver now
    STALE = b"stale"  # the wake is no longer the subscription's current one
    RETRY = b"retry"  # a failed delivery is scheduled again
    CLAIMED = b"claimed"  # another worker holds the lease
    IDLE = b"idle"  # no pending work
    WRONG_TYPE = b"wrong_type"  # not a call for this type of subscription
    INVALID_OFFSET = b"invalid_offset"  # an ack the cursors refuse


class UnexpectedReply(RuntimeError):
    """A script answered a code its declaration does not list: the code and the
    script disagree, and guessing what it meant could lose or duplicate events."""


class Fields(Protocol):
    """A NamedTuple of a script's KEYS or ARGV."""

    @property
    def _fields(self) -> tuple[str, ...]: ...

    def __iter__(self) -> Iterator[Arg]: ...


def _names(fields: type[Fields]) -> tuple[str, ...]:
    # A NamedTuple class holds its field names; the protocol can only say so of instances.
    return cast(tuple[str, ...], fields._fields)


K = TypeVar("K", bound=Fields)
A = TypeVar("A", bound=Fields)


class Script(Generic[K, A]):
    """One Lua script in `lua/<name>.lua`, with its KEYS, ARGV and reply codes."""

    def __init__(
        self,
        name: str,
        keys: type[K],
        args: type[A],
        *,
        rest: str | None = None,
        replies: Iterable[Reply] = (),
        constants: Mapping[str, str] = {},  # read, never changed
        library: str | None = None,
    ) -> None:
        self.name = name
        key_names = _names(keys)
        self.source = _source(name, key_names, _names(args), rest, constants, library)
        sha = hashlib.sha1(self.source.encode()).hexdigest().encode()
        self.evalsha: tuple[bytes, bytes, int] = (b"EVALSHA", sha, len(key_names))
        self._replies = {reply.value: reply for reply in replies}

    def reply(self, code: bytes) -> Reply:
        """The reply code `code` (raw, as Redis sent it); UnexpectedReply if not one of ours."""
        reply = self._replies.get(code)
        if reply is None:
            raise UnexpectedReply(f"{self.name}.lua answered {code!r}, which nothing here expects")
        return reply


_LUA = resources.files("app.store").joinpath("lua")


def prelude() -> str:
    """What every script starts with: the terminal statuses and `lua/prelude.lua`."""
    terminal = ", ".join(f"{status} = true" for status in sorted(TERMINAL_STATUSES))
    return f"local TERMINAL = {{{terminal}}}\n" + _LUA.joinpath("prelude.lua").read_text()


def _source(
    name: str,
    keys: Sequence[str],
    args: Sequence[str],
    rest: str | None,
    constants: Mapping[str, str],
    library: str | None = None,
) -> str:
    lines = [prelude()]
    lines.extend(f"local {constant} = '{value}'" for constant, value in constants.items())
    lines.append(f"-- KEYS and ARGV of {name}.lua, as declared in app/store/scripts.py")
    for names, table in ((keys, "KEYS"), (args, "ARGV")):
        if names:
            values = ", ".join(f"{table}[{i}]" for i in range(1, len(names) + 1))
            lines.append(f"local {', '.join(names)} = {values}")
    if rest is not None:
        lines.append(f"local {rest}_from = {len(args) + 1}")
    if library is not None:
        lines.append(_LUA.joinpath(f"{library}.lua").read_text())
    lines.append(_LUA.joinpath(f"{name}.lua").read_text())
    return "\n".join(lines)


# -- the scripts ----------------------------------------------------------------


class MetaKeys(NamedTuple):
    meta: str


class LeaseKeys(NamedTuple):
    meta: str
    lease: str


class NoArgs(NamedTuple):
    pass


class CreateKeys(NamedTuple):
    meta: str
    request: str


class CreateArgs(NamedTuple):
    model: str
    request_json: bytes
    created_ms: int
    open_ttl_ms: int
    owner: str  # the owner hash of the creating API key ('' when the service is open)


CREATE = Script("create", CreateKeys, CreateArgs)


class IndexKeys(NamedTuple):
    # One shard's (`app.keys.Shard`).
    open: str  # the index of open generations (the sweeper's)
    recent: str  # the index behind `tokentape ls`
    jobs: str


class IndexArgs(NamedTuple):
    generation_id: str
    created_ms: int
    meta_ttl_ms: int  # how far back the recent index is kept


# Then `job`: the job's stream entry as field, value, ... (`jobs.entry_fields`); none = no job.
INDEX = Script("index", IndexKeys, IndexArgs, rest="job")


class AppendKeys(NamedTuple):
    meta: str
    log: str
    request: str
    lease: str


class AppendArgs(NamedTuple):
    # The writer's lease epoch, or '*' for a system writer (cancel of a queued
    # generation, the abandon sweeper) that fences every worker.
    epoch: str
    first_seq: int  # the seq the writer expects its first event to get ('*' writers: ignored)
    maxlen: bytes  # length cap of the log (approximate trimming)
    open_ttl_ms: bytes  # an open generation's keys live at least this long after its last append
    log_ttl_ms: bytes  # the log and request live this long after the terminal event
    meta_ttl_ms: bytes  # the metadata lives this long after it (to answer 410, not 404)
    channel: str  # the pub/sub channel of live readers (sharded on a cluster)
    final: str  # the status after this batch ('' unless its last event is terminal)
    reason: str  # the finish reason or error code of the terminal event
    # '*' writers only: refuse if the generation was active more recently than this
    # many ms ago ('' = no condition).
    min_idle_ms: int | str
    n: int  # the number of events


def _append(publish: str) -> Script[AppendKeys, AppendArgs]:
    # Then `events`: n pairs of (type, data).
    return Script(
        "append",
        AppendKeys,
        AppendArgs,
        rest="events",
        replies=(
            Reply.OK,
            Reply.DUPLICATE,
            Reply.FENCED,
            Reply.ALREADY_FINISHED,
            Reply.SEQ_CONFLICT,
            Reply.UNKNOWN,
            Reply.ACTIVE,
        ),
        constants={"PUBLISH": publish},
    )


APPEND = _append("PUBLISH")
# On a cluster: sharded pub/sub, so only the generation's own node carries its batches.
APPEND_SHARDED = _append("SPUBLISH")


class AcquireArgs(NamedTuple):
    worker_id: str
    lease_ms: int


ACQUIRE = Script(
    "acquire",
    LeaseKeys,
    AcquireArgs,
    replies=(Reply.OK, Reply.HELD, Reply.ALREADY_FINISHED, Reply.UNKNOWN),
)


class RenewArgs(NamedTuple):
    worker_id: str
    epoch: int
    lease_ms: int
    release: str  # '1' to release the lease instead of extending it
    # Raise the cancel flag when no reader has watched the generation for this long
    # ('0' = the policy is off).
    unwatched_ms: int


RENEW = Script(
    "renew", LeaseKeys, RenewArgs, replies=(Reply.OK, Reply.FENCED, Reply.ALREADY_FINISHED)
)


class ResetKeys(NamedTuple):
    meta: str
    log: str
    lease: str


class ResetArgs(NamedTuple):
    epoch: int  # the writer's lease epoch
    confirmed_to: int  # the last seq the log confirmed to the writer
    sent_to: int  # the last seq the writer sent, confirmed or not
    maxlen: bytes
    channel: str


def _reset(publish: str) -> Script[ResetKeys, ResetArgs]:
    return Script(
        "reset",
        ResetKeys,
        ResetArgs,
        replies=(Reply.RESET, Reply.INTACT, Reply.ALREADY_FINISHED, Reply.UNKNOWN),
        constants={"PUBLISH": publish},
    )


RESET = _reset("PUBLISH")
RESET_SHARDED = _reset("SPUBLISH")  # as APPEND_SHARDED


class AnnotateArgs(NamedTuple):
    field: str
    value: str | int


ANNOTATE = Script("annotate", MetaKeys, AnnotateArgs)
CANCEL = Script("cancel", MetaKeys, NoArgs)


class AdmitKeys(NamedTuple):
    running: str
    created: str


class AdmitArgs(NamedTuple):
    generation_id: str
    max_running: int  # 0: no limit
    max_per_minute: int  # 0: no limit
    running_ttl_ms: int  # an owner that creates nothing this long forgets its running set


ADMIT = Script("admit", AdmitKeys, AdmitArgs, replies=(Reply.OK, Reply.RATE, Reply.RUNNING))
