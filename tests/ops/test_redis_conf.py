"""ops/redis/redis.conf is accepted by the installed redis-server and gives what it promises."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.conftest import free_port

CONF = Path(__file__).resolve().parents[2] / "ops" / "redis" / "redis.conf"
SERVER = shutil.which("redis-server") or shutil.which("valkey-server")


@pytest.mark.skipif(SERVER is None, reason="no redis-server or valkey-server on PATH")
def test_redis_conf_loads_with_durability_and_noeviction(tmp_path: Path) -> None:
    assert SERVER is not None
    port = free_port()
    # The shipped file, then only what a test machine must change: port, directory.
    process = subprocess.Popen(
        [SERVER, str(CONF), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    client = Redis(port=port, socket_timeout=2)
    try:
        for _ in range(500):
            try:
                client.ping()
                break
            except RedisConnectionError:
                if process.poll() is not None:
                    assert process.stderr is not None
                    pytest.fail(f"redis-server rejected the config: {process.stderr.read()!r}")
                # Polling a port until a process listens: there is no event to await.
                time.sleep(0.01)
        config = client.config_get("*")
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "everysec"
        assert config["maxmemory-policy"] == "noeviction"
        assert int(config["maxmemory"] or 0) > 0
        assert config["timeout"] == "0"
    finally:
        client.close()
        process.terminate()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()
