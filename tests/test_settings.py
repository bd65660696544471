"""Settings from `TOKENTAPE_*` variables; a bad value is a ConfigError naming its variable."""

from __future__ import annotations

import pytest

from app.errors import ConfigError, InvalidRequest
from app.settings import Settings


def test_variables_are_parsed_by_field_type_and_overrides_win() -> None:
    settings = Settings.from_env(
        {"TOKENTAPE_PORT": "9000", "TOKENTAPE_LEASE_SECONDS": "2.5", "TOKENTAPE_HOST": ""},
        host="0.0.0.0",
        port=None,  # an absent flag does not override
    )
    assert (settings.port, settings.lease_seconds, settings.host) == (9000, 2.5, "0.0.0.0")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TOKENTAPE_PORT": "abc"}, "TOKENTAPE_PORT must be an integer, got 'abc'"),
        ({"TOKENTAPE_PORT": "80.5"}, "TOKENTAPE_PORT must be an integer, got '80.5'"),
        (
            {"TOKENTAPE_HEARTBEAT_SECONDS": "soon"},
            "TOKENTAPE_HEARTBEAT_SECONDS must be a number, got 'soon'",
        ),
        ({"TOKENTAPE_EVENT_LOOP": "trio"}, "TOKENTAPE_EVENT_LOOP must be uvloop or asyncio"),
        ({"TOKENTAPE_LOG_LEVEL": "loud"}, "TOKENTAPE_LOG_LEVEL must be one of DEBUG, INFO"),
        ({"TOKENTAPE_REDIS_CLUSTER": "sure"}, "TOKENTAPE_REDIS_CLUSTER must be true or false"),
        ({"TOKENTAPE_REDIS_CLUSTER": "true"}, "TOKENTAPE_REDIS_CLUSTER (--cluster) needs"),
        ({"TOKENTAPE_SHARDS": "-1"}, "TOKENTAPE_SHARDS must not be negative"),
    ],
    ids=[
        "integer",
        "integer-not-float",
        "number",
        "event-loop",
        "log-level",
        "boolean",
        "cluster-url",
        "shards",
    ],
)
def test_a_bad_value_is_a_config_error_naming_the_variable(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(environ)
    assert not isinstance(refused.value, InvalidRequest)  # not an HTTP 400
    assert refused.value.code == "invalid_setting"
    assert refused.value.message.startswith(message)


def test_log_level_is_case_insensitive() -> None:
    assert Settings.from_env({"TOKENTAPE_LOG_LEVEL": "debug"}).log_level == "debug"


@pytest.mark.parametrize(
    ("raw", "value"), [("true", True), ("1", True), ("Yes", True), ("false", False), ("off", False)]
)
def test_switches_read_true_and_false(raw: str, value: bool) -> None:
    assert Settings.from_env({"TOKENTAPE_INSECURE": raw}).insecure is value


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TOKENTAPE_INSECURE": "maybe"}, "TOKENTAPE_INSECURE must be true or false, got 'maybe'"),
        ({"TOKENTAPE_MAX_STREAMS": "-1"}, "TOKENTAPE_MAX_STREAMS must not be negative, got -1"),
        (
            {"TOKENTAPE_CORS_ORIGINS": "app.example.com"},
            "TOKENTAPE_CORS_ORIGINS: 'app.example.com' is not an origin",
        ),
        (
            {"TOKENTAPE_CORS_ORIGINS": "*,https://a.example"},
            "TOKENTAPE_CORS_ORIGINS is * or a list",
        ),
    ],
    ids=["switch", "negative", "origin", "star-and-list"],
)
def test_access_and_limit_settings_are_checked(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(environ)
    assert refused.value.message.startswith(message)


def test_cors_origins_are_a_list() -> None:
    settings = Settings(cors_origins=" https://a.example , http://[::1]:8080,")
    assert settings.cors_origin_list == ["https://a.example", "http://[::1]:8080"]


@pytest.mark.parametrize(
    ("environ", "cluster", "shards"),
    [
        ({}, False, 0),
        ({"TOKENTAPE_REDIS_CLUSTER": "true"}, True, 8),
        ({"TOKENTAPE_REDIS_CLUSTER": "1", "TOKENTAPE_SHARDS": "3"}, True, 3),
        ({"TOKENTAPE_REDIS_CLUSTER": "False", "TOKENTAPE_SHARDS": "2"}, False, 2),
    ],
    ids=["one-redis", "cluster", "cluster-shards", "one-redis-shards"],
)
def test_a_cluster_shards_what_is_global_by_default(
    environ: dict[str, str], cluster: bool, shards: int
) -> None:
    settings = Settings.from_env({"TOKENTAPE_REDIS_URL": "redis://h:7000", **environ})
    assert (settings.redis_cluster, settings.key_shards) == (cluster, shards)
