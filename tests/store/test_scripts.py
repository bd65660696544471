"""The Lua scripts' declarations: names instead of positions, one prelude, reply codes."""

from __future__ import annotations

import re
from importlib import resources
from typing import Any, get_args

import pytest
from redis.asyncio import Redis

from app.errors import SeqConflict
from app.generations import TERMINAL_STATUSES, Status
from app.store import GenerationLog, UnexpectedReply
from app.store.scripts import (
    ACQUIRE,
    ADMIT,
    ANNOTATE,
    APPEND,
    APPEND_SHARDED,
    CANCEL,
    CREATE,
    INDEX,
    RENEW,
    RESET,
    Script,
    prelude,
)
from app.store.stream_scripts import (
    STREAM_ADD_FORK,
    STREAM_APPEND,
    STREAM_APPEND_SHARDED,
    STREAM_CREATE,
    STREAM_DELETE,
    STREAM_DELETE_SHARDED,
    STREAM_READ,
)
from app.store.subscription_scripts import (
    SUB_ACK,
    SUB_ATTEMPT,
    SUB_CLAIM,
    SUB_CREATE,
    SUB_DELIVER,
    SUB_DELIVERED,
    SUB_FAILED,
    SUB_READ,
    SUB_RELEASE,
    SUB_STREAMS,
    SUB_TOUCH,
)
from tests.conftest import leased_generation

SCRIPTS: list[Script[Any, Any]] = [
    ACQUIRE,
    ADMIT,
    ANNOTATE,
    APPEND,
    CANCEL,
    CREATE,
    INDEX,
    RENEW,
    RESET,
]
STREAM_SCRIPTS: list[Script[Any, Any]] = [
    STREAM_ADD_FORK,
    STREAM_APPEND,
    STREAM_CREATE,
    STREAM_DELETE,
    STREAM_READ,
]
SUBSCRIPTION_SCRIPTS: list[Script[Any, Any]] = [
    SUB_ACK,
    SUB_ATTEMPT,
    SUB_CLAIM,
    SUB_CREATE,
    SUB_DELIVER,
    SUB_DELIVERED,
    SUB_FAILED,
    SUB_READ,
    SUB_RELEASE,
    SUB_STREAMS,
    SUB_TOUCH,
]


def _body(script: Script[Any, Any]) -> str:
    """The script's own file, and the library it shares with others."""
    lua = resources.files("app.store").joinpath("lua")
    body = lua.joinpath(f"{script.name}.lua").read_text()
    if script.name.startswith("sub_"):
        body += lua.joinpath("subscription.lua").read_text()
    return body


@pytest.mark.parametrize(
    "script", SCRIPTS + STREAM_SCRIPTS + SUBSCRIPTION_SCRIPTS, ids=lambda script: script.name
)
def test_a_script_reads_its_keys_and_arguments_by_name(script: Script[Any, Any]) -> None:
    body = _body(script)
    assert "KEYS[" not in body
    # Only a variable tail is indexed, from where its declaration says it starts.
    assert re.findall(r"ARGV\[([^\]]*)\]", body) == re.findall(r"ARGV\[(\w+_from[^\]]*)\]", body)


@pytest.mark.parametrize("script", SCRIPTS + SUBSCRIPTION_SCRIPTS, ids=lambda script: script.name)
def test_every_key_a_script_touches_is_one_it_declares(script: Script[Any, Any]) -> None:
    # Redis Cluster runs a script only on the node of its declared keys (app.keys puts
    # each script's keys in one slot), and refuses a key it was not given.
    declared = re.search(r"^local ([\w, ]+) = KEYS\[1\]", script.source, re.MULTILINE)
    assert declared is not None
    names = set(declared.group(1).split(", "))
    body = _body(script)
    for command, key in re.findall(r"redis\.call\('(\w+)',\s*(\w+)", body):
        assert command == "TIME" or key in names, f"{script.name}.lua: {command} {key}"


@pytest.mark.parametrize(
    ("one_redis", "cluster"),
    [
        (APPEND, APPEND_SHARDED),
        (STREAM_APPEND, STREAM_APPEND_SHARDED),
        (STREAM_DELETE, STREAM_DELETE_SHARDED),
    ],
    ids=["append", "stream_append", "stream_delete"],
)
def test_on_a_cluster_live_messages_go_by_sharded_pub_sub(
    one_redis: Script[Any, Any], cluster: Script[Any, Any]
) -> None:
    assert "local PUBLISH = 'PUBLISH'" in one_redis.source
    assert "local PUBLISH = 'SPUBLISH'" in cluster.source
    assert one_redis.evalsha[1] != cluster.evalsha[1]


@pytest.mark.parametrize("status", get_args(Status))
async def test_the_prelude_knows_the_terminal_statuses(redis: Redis, status: str) -> None:
    terminal = await redis.eval(prelude() + "\nreturn is_terminal(ARGV[1]) and 1 or 0", 0, status)
    assert terminal == (status in TERMINAL_STATUSES)


def test_a_reply_code_nothing_expects_raises() -> None:
    with pytest.raises(UnexpectedReply, match=r"append.lua answered b'no_such_code'"):
        APPEND.reply(b"no_such_code")
    with pytest.raises(UnexpectedReply, match=r"acquire.lua answered b'duplicate'"):
        ACQUIRE.reply(b"duplicate")  # a code, but not one acquire answers


async def test_an_unknown_append_reply_is_not_taken_for_a_seq_conflict(log: GenerationLog) -> None:
    _, lease = await leased_generation(log)
    with pytest.raises(UnexpectedReply) as raised:
        log.appended(lease, [b"no_such_code", b"7"])
    assert not isinstance(raised.value, SeqConflict)
