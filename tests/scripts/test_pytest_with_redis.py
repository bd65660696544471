"""scripts/test's Redis: the shared one if it answers, else one of its own, else a hint."""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence

import pytest

from app.embedded import answers_ping
from scripts import pytest_with_redis


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def no_shared_redis(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(pytest_with_redis.VARIABLE, raising=False)
    monkeypatch.setattr(pytest_with_redis, "SHARED_PORT", closed_port())
    return monkeypatch


def test_without_a_shared_redis_the_tests_get_their_own_stopped_afterwards(
    no_shared_redis: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[tuple[list[str], str, bool]] = []

    def run_pytest(args: Sequence[str], env: Mapping[str, str]) -> int:
        url = env[pytest_with_redis.VARIABLE]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        seen.append((list(args), url, answers_ping(port)))
        return 3

    no_shared_redis.setattr(pytest_with_redis, "pytest", run_pytest)
    assert pytest_with_redis.main(["-x", "tests/cli"]) == 3  # pytest's exit status
    [(args, url, answering)] = seen
    assert args == ["-x", "tests/cli"]
    assert answering
    assert not answers_ping(int(url.rsplit(":", 1)[1].split("/")[0]))
    assert "for the tests" in capsys.readouterr().err


def test_with_no_redis_to_be_had_it_says_how_to_install_one(
    no_shared_redis: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    no_shared_redis.setattr(pytest_with_redis, "find_server", lambda: None)
    assert pytest_with_redis.main([]) == 1
    assert "apt-get install redis-server" in capsys.readouterr().err
