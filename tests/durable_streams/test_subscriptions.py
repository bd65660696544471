"""Subscriptions' rules, without Redis: patterns, what a PUT may configure and how it is
compared, callback tokens, and what acks may say."""

from __future__ import annotations

import base64
import string

import pytest

from app.durable_streams import subscriptions
from app.durable_streams.errors import (
    CallbackTokenExpired,
    CallbackTokenInvalid,
    InvalidAckOffset,
    InvalidSubscriptionRequest,
)
from app.durable_streams.subscriptions import Interest, Pattern, parse_config


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("events/*", "events/a", True),
        ("events/*", "events/a/b", False),
        ("events/*", "events", False),
        ("events/**", "events", True),
        ("events/**", "events/a/b", True),
        ("**/done", "a/b/done", True),
        ("**/done", "done", True),
        ("a/**/z", "a/z", True),
        ("a/**/z", "a/b/c/z", True),
        ("a/**/z", "a/b/c", False),
        ("ev*", "events", False),  # a wildcard is a whole segment
        ("ev*", "ev*", True),
        ("/events/*/", "events/a", True),
        ("*", "a", True),
    ],
    ids=repr,
)
def test_patterns_match_whole_segments(pattern: str, path: str, matches: bool) -> None:
    assert Pattern(pattern).matches(path) is matches


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [("events/*", "events/"), ("a/b/**", "a/b/"), ("**", ""), ("a/b", "a/b")],
)
def test_a_pattern_names_the_prefix_its_streams_share(pattern: str, prefix: str) -> None:
    assert Pattern(pattern).literal_prefix == prefix


def test_an_interest_hears_its_pattern_and_its_explicit_streams() -> None:
    interest = Interest(Pattern("events/*"), frozenset({"manual/a"}))
    assert [interest.how(p) for p in ("events/x", "manual/a", "other")] == ["g", "", None]
    assert Interest.decode(interest.encode()) == Interest(interest.pattern, interest.explicit)


WEBHOOK = b'{"type":"webhook","pattern":"events/*","webhook":{"url":"https://h.example/w"}}'


def test_a_configuration_is_compared_by_what_it_means() -> None:
    first = parse_config(
        b'{"type":"webhook","streams":["b","/a/"],"webhook":{"url":"https://h.example/w"}}'
    )
    again = parse_config(
        b'{"type":"webhook","streams":["a","b","a"],"webhook":{"url":"https://h.example/w"},'
        b'"lease_ttl_ms":30000}'
    )
    assert first.streams == ("b", "a")
    assert first.config_hash == again.config_hash
    other = parse_config(
        b'{"type":"webhook","streams":["a","b"],"webhook":{"url":"https://h.example/w"},'
        b'"lease_ttl_ms":1000}'
    )
    assert other.config_hash != first.config_hash
    assert subscriptions.decode_config(subscriptions.encode_config(first)).config_hash == (
        first.config_hash
    )


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b'{"type":"webhook","webhook":{"url":"https://h.example/w"}}',  # no pattern, no streams
        b'{"type":"webhook","pattern":"events/*"}',  # no webhook.url
        b'{"type":"pull-wake","pattern":"events/*"}',  # no wake_stream
        b'{"type":"queue","pattern":"events/*"}',
        b'{"type":"pull-wake","pattern":"events/*","wake_stream":"w","lease_ttl_ms":999}',
        b'{"type":"pull-wake","pattern":"events/*","wake_stream":"w","lease_ttl_ms":600001}',
        b'{"type":"pull-wake","pattern":"events/*","wake_stream":"w","lease_ttl_ms":true}',
        b'{"type":"pull-wake","pattern":"a/../b","wake_stream":"w"}',
        b'{"type":"pull-wake","streams":["a{b"],"wake_stream":"w"}',
        b'{"type":"pull-wake","streams":["__ds/x"],"wake_stream":"w"}',
        b'{"type":"pull-wake","streams":[7],"wake_stream":"w"}',
    ],
    ids=repr,
)
def test_a_configuration_the_protocol_does_not_allow_is_refused(body: bytes) -> None:
    with pytest.raises(InvalidSubscriptionRequest) as refused:
        parse_config(body)
    assert (refused.value.status, refused.value.code) == (400, "INVALID_REQUEST")


def test_subscription_ids_are_one_url_safe_segment() -> None:
    assert subscriptions.check_id("sub-1700000000000") == "sub-1700000000000"
    for bad in ("", "a/b", "a{b}", "x" * 257):
        with pytest.raises(InvalidSubscriptionRequest):
            subscriptions.check_id(bad)


def test_a_token_is_refused_in_any_encoding_but_its_own() -> None:
    key = b"k" * 32
    token = subscriptions.issue_token(key, "sub-1", 7, now=1000.0)
    # The signature's last character holds 4 bits of it and 2 unused ones, which a
    # base64 decoder ignores: setting them encodes the same bytes differently.
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    same_bytes = token[:-1] + alphabet[alphabet.index(token[-1]) | 1]
    assert base64.urlsafe_b64decode(same_bytes.split(".")[1] + "=") == base64.urlsafe_b64decode(
        token.split(".")[1] + "="
    )
    with pytest.raises(CallbackTokenInvalid):
        subscriptions.verify_token(key, "sub-1", same_bytes, now=1000.0)


def test_a_token_names_its_subscription_and_generation_and_expires() -> None:
    key = b"k" * 32
    token = subscriptions.issue_token(key, "sub-1", 7, now=1000.0)
    assert subscriptions.verify_token(key, "sub-1", token, now=1000.0) == 7
    with pytest.raises(CallbackTokenInvalid):
        subscriptions.verify_token(key, "sub-2", token, now=1000.0)
    with pytest.raises(CallbackTokenInvalid):
        subscriptions.verify_token(b"x" * 32, "sub-1", token, now=1000.0)  # another incarnation
    claims, signature = token.split(".")
    another = ("B" if signature[0] == "A" else "A") + signature[1:]
    with pytest.raises(CallbackTokenInvalid):
        subscriptions.verify_token(key, "sub-1", f"{claims}.{another}", now=1000.0)
    with pytest.raises(CallbackTokenInvalid):
        subscriptions.verify_token(key, "sub-1", "not-a-token", now=1000.0)
    with pytest.raises(CallbackTokenExpired):
        subscriptions.verify_token(key, "sub-1", token, now=1000.0 + 3601)


def test_an_ack_names_its_stream_and_an_offset_a_read_returned() -> None:
    request = subscriptions.parse_wake_request(
        b'{"wake_id":"w_1","generation":3,"done":true,'
        b'"acks":[{"stream":"events/a","offset":"0000000000000002_0000000000000000"},'
        b'{"path":"events/b","offset":"0000000000000000_0000000000000000"}]}'
    )
    assert request.acks == (
        subscriptions.Ack("events/a", 2),
        subscriptions.Ack("events/b", 0),
    )
    assert (request.wake_id, request.generation, request.done) == ("w_1", 3, True)
    with pytest.raises(InvalidAckOffset):
        subscriptions.parse_wake_request(b'{"acks":[{"stream":"a","offset":"-1"}]}')
    with pytest.raises(InvalidSubscriptionRequest):
        subscriptions.parse_wake_request(b'{"acks":[{"offset":"-1"}]}')
