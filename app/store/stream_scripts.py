"""The Durable Streams' Lua scripts (`lua/stream_*.lua`), declared as `app.store.scripts`
declares the generation scripts: KEYS and ARGV by name, the shared prelude, and the
reply codes each answers (from `Reply`; any other raises `UnexpectedReply`).

Every script touches the keys of one stream (the hash tag `{ds:<name>}`, one Cluster
slot); `add_fork` touches its source's. The scripts that wake live readers publish with
PUBLISH on one Redis and SPUBLISH on a cluster (the `_SHARDED` twins), as the generation
scripts do.
"""

from __future__ import annotations

from typing import NamedTuple

from app.store.scripts import Reply, Script


class StreamKeys(NamedTuple):
    """A stream's keys, in the order `app.keys.Keys.stream_keys` names them."""

    meta: str  # hash: content type, TTL or expiry, tail, closure, fork origin
    log: str  # Redis Stream: one entry per append, id `<seq>-0`
    producers: str  # hash: producer id -> "epoch seq"
    forks: str  # set: names of the stream's forks


class CreateStreamArgs(NamedTuple):
    content_type: str  # normalized
    ttl_seconds: str  # sliding TTL ('' for none)
    expires_ms: str  # absolute expiry, epoch ms ('' for none)
    closed: str  # '1' to create the stream closed
    fork_of: str  # the source stream ('' when not a fork)
    fork_seq: str  # the source position the fork continues from ('' when not a fork)
    fork_offset: str  # '1' when the request named that position (compared on a re-PUT)
    fork_sub: str  # the sub-offset inherited past fork_seq ('0' for none)
    retention_ms: str  # the lifetime of a stream with neither TTL nor expiry
    maxlen: str  # length cap of the log (approximate trimming)
    stream_id: str  # a new random token naming this incarnation of the stream (ETags)


# Then `entries`: pairs of (seq, data), the inherited ones and the body's.
STREAM_CREATE = Script(
    "stream_create",
    StreamKeys,
    CreateStreamArgs,
    rest="entries",
    replies=(Reply.CREATED, Reply.EXISTS, Reply.CONFLICT, Reply.DELETED),
)


class AppendStreamArgs(NamedTuple):
    body_type: str  # the media type of the body ('' with none)
    close: str  # '1': the stream is closed after this append (or without one)
    producer_id: str  # an idempotent producer ('' for none), its epoch and seq
    producer_epoch: str | int
    producer_seq: str | int
    stream_seq: str  # the writer's Stream-Seq ('' for none)
    retention_ms: str
    maxlen: str
    channel: str  # the pub/sub channel of the stream's live readers
    data: bytes  # the entry (empty with no body)
    has_data: str  # '1' when there is a body


def _stream_append(publish: str) -> Script[StreamKeys, AppendStreamArgs]:
    return Script(
        "stream_append",
        StreamKeys,
        AppendStreamArgs,
        replies=(
            Reply.OK,
            Reply.DUPLICATE,
            Reply.CLOSED,
            Reply.CLOSED_AGAIN,
            Reply.CLOSED_DUPLICATE,
            Reply.MISSING,
            Reply.DELETED,
            Reply.CONTENT_TYPE_MISMATCH,
            Reply.STALE_EPOCH,
            Reply.EPOCH_SEQ,
            Reply.SEQ_GAP,
            Reply.STREAM_SEQ_REGRESSION,
        ),
        constants={"PUBLISH": publish},
    )


STREAM_APPEND = _stream_append("PUBLISH")
# On a cluster: sharded pub/sub, so only the stream's own node carries its wake-ups.
STREAM_APPEND_SHARDED = _stream_append("SPUBLISH")


class ReadStreamArgs(NamedTuple):
    after: str  # the last seq the reader has, or 'now' for the tail
    from_start: str  # '1': from the first entry kept (a trimmed log is no error)
    max_entries: int
    max_bytes: int  # stop before the entry that would pass this many bytes (one at least)
    through: str | int  # the last seq to read ('' for the tail)
    refresh: str  # '1': the read slides the stream's TTL


STREAM_READ = Script(
    "stream_read",
    StreamKeys,
    ReadStreamArgs,
    replies=(Reply.OK, Reply.MISSING, Reply.DELETED, Reply.BEYOND, Reply.TRIMMED),
)


class DeleteStreamArgs(NamedTuple):
    channel: str  # the pub/sub channel of the stream's live readers
    purge: str  # '1': only collect a tombstone no fork holds any more


def _stream_delete(publish: str) -> Script[StreamKeys, DeleteStreamArgs]:
    return Script(
        "stream_delete",
        StreamKeys,
        DeleteStreamArgs,
        replies=(Reply.REMOVED, Reply.TOMBSTONE, Reply.MISSING, Reply.DELETED, Reply.KEPT),
        constants={"PUBLISH": publish},
    )


STREAM_DELETE = _stream_delete("PUBLISH")
STREAM_DELETE_SHARDED = _stream_delete("SPUBLISH")  # as STREAM_APPEND_SHARDED


class ForkKeys(NamedTuple):
    meta: str  # the source's
    forks: str  # the source's


class AddForkArgs(NamedTuple):
    fork: str  # the fork's stream name


STREAM_ADD_FORK = Script(
    "stream_add_fork",
    ForkKeys,
    AddForkArgs,
    replies=(Reply.OK, Reply.MISSING, Reply.DELETED),
)
