"""The pytest step of scripts/test: pytest with a Redis to test against.

    python -m scripts.pytest_with_redis [PYTEST ARGS]

The Redis is $TOKENTAPE_TEST_REDIS_URL if set, else the one on 127.0.0.1:6379 if it
answers PING, else a redis-server of our own (app.embedded.RedisProcess) on a free
port and in a temporary directory, stopped when pytest ends (and by the kernel if
this process is killed). With none to be had, it says how to install one. The
tests write under their own key prefix and never flush a Redis they did not start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from app.embedded import EmbeddedUnavailable, RedisProcess, answers_ping, find_server

VARIABLE = "TOKENTAPE_TEST_REDIS_URL"
SHARED_PORT = 6379
INSTALL_HINT = (
    "the tests need Redis: none answers on 127.0.0.1:6379 and no redis-server is\n"
    "on PATH. Install one (Debian/Ubuntu: sudo apt-get install redis-server;\n"
    f"macOS: brew install redis) or set {VARIABLE}."
)


def main(pytest_args: Sequence[str]) -> int:
    if os.environ.get(VARIABLE):
        return pytest(pytest_args, os.environ)
    if answers_ping(SHARED_PORT):
        return pytest(pytest_args, {**os.environ, VARIABLE: "redis://127.0.0.1:6379/0"})
    binary = find_server()
    if binary is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="tokentape-test-redis-") as directory:
        log = Path(directory) / "log"
        server = RedisProcess(binary, Path(directory), log_file=log)
        try:
            server.start()
        except EmbeddedUnavailable as exc:
            print(log.read_text(errors="replace") if log.exists() else "", file=sys.stderr)
            print(exc, file=sys.stderr)
            return 1
        print(f"started {binary} on port {server.port} for the tests", file=sys.stderr)
        try:
            return pytest(pytest_args, {**os.environ, VARIABLE: server.url})
        finally:
            server.stop()


def pytest(args: Sequence[str], env: Mapping[str, str]) -> int:
    print(f"== pytest (Redis: {env[VARIABLE]})", flush=True)
    command = [str(Path(sys.executable).with_name("pytest")), *args]  # the venv's pytest
    return subprocess.run(command, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
