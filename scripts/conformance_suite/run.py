"""Run the Durable Streams server conformance suite against a fresh tokentape.

`scripts/conformance` runs this. It installs the pinned suite (`package.json` and
`package-lock.json` beside this file) into a temporary folder with `npm ci`, starts
`tokentape serve` on a real Redis under a key prefix of its own (the Redis given,
else one answering on 127.0.0.1:6379, else a redis-server of its own), runs the suite
with a short long-poll timeout, prints the passed, failed and skipped counts, and
deletes its keys. With `--cluster` it runs on a Redis Cluster: the one a node of which
`--redis` names, else one of its own (3 primaries, a replica each). It exits 1 when
fewer tests pass than `recorded.json` says, 2 when node or npm is missing; `--record`
writes the counts of this run there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import redis
import redis.cluster

from app.embedded import (
    RedisClusterProcesses,
    RedisProcess,
    answers_ping,
    find_server,
    free_port,
)

SUITE_DIR = Path(__file__).resolve().parent
REPO = SUITE_DIR.parent.parent
RECORDED = SUITE_DIR / "recorded.json"
SUITE_PACKAGE = "@durable-streams/server-conformance-tests"
SUITE_FILES = ("package.json", "package-lock.json", "vitest.config.mjs", "conformance.test.mjs")
START_TIMEOUT_SECONDS = 30.0


def suite_version() -> str:
    manifest = json.loads((SUITE_DIR / "package.json").read_text())
    version: str = manifest["dependencies"][SUITE_PACKAGE]
    return version


@contextlib.contextmanager
def redis_url(given: str | None, scratch: Path, *, cluster: bool) -> Iterator[str]:
    """The Redis to run on: the one given, one on 127.0.0.1:6379, or our own (a
    cluster's node with `cluster`)."""
    if given:
        yield given
        return
    if not cluster and answers_ping(6379):
        yield "redis://127.0.0.1:6379/0"
        return
    binary = find_server()
    if binary is None:
        raise SystemExit("no Redis answers on 127.0.0.1:6379 and no redis-server is on PATH")
    if cluster:
        nodes = RedisClusterProcesses(binary, scratch / "cluster")
        nodes.start()
        try:
            yield nodes.url
        finally:
            nodes.kill()
        return
    server = RedisProcess(binary, scratch / "redis")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def tokentape(
    url: str, prefix: str, long_poll_seconds: float, log: Path, *, cluster: bool
) -> Iterator[str]:
    """`tokentape serve` on a free port; its base URL once it answers."""
    port = free_port()
    env = {
        **os.environ,
        "TOKENTAPE_KEY_PREFIX": prefix,
        "TOKENTAPE_STREAM_LONG_POLL_SECONDS": str(long_poll_seconds),
        # The suite's webhook receivers listen on loopback, over http.
        "TOKENTAPE_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "TOKENTAPE_LOG_LEVEL": "WARNING",
    }
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                *("-m", "app", "serve", "--redis", url, "--port", str(port)),
                *(["--cluster"] if cluster else []),
            ],
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=1) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"tokentape did not start:\n{log.read_text()}")
            # Polling a port until a process answers: there is no event to await.
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def delete_keys(url: str, prefix: str, *, cluster: bool) -> None:
    if not cluster:
        client = redis.Redis.from_url(url)
        try:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
        finally:
            client.close()
        return
    nodes = redis.cluster.RedisCluster.from_url(url)
    try:
        for node in nodes.get_primaries():  # type: ignore[no-untyped-call]
            for key in nodes.scan_iter(match=f"{prefix}:*", count=1000, target_nodes=node):
                nodes.delete(key)
    finally:
        nodes.close()


def counts(results: Path) -> dict[str, int]:
    """passed, failed and skipped from vitest's JSON report."""
    report = json.loads(results.read_text())
    return {
        "passed": report["numPassedTests"],
        "failed": report["numFailedTests"],
        "skipped": report["numPendingTests"] + report["numTodoTests"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/conformance", description=__doc__)
    parser.add_argument("--redis", metavar="URL", help="Redis to run on (default: see above)")
    parser.add_argument(
        "--cluster", action="store_true", help="run on a Redis Cluster (--redis names a node)"
    )
    parser.add_argument(
        "--long-poll-seconds",
        type=float,
        default=1.0,
        help="how long tokentape's long-polls wait (default: 1)",
    )
    parser.add_argument("--record", action="store_true", help=f"write the counts to {RECORDED}")
    args = parser.parse_args(argv)

    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        print("the conformance suite needs node and npm (Node.js 20 or newer)", file=sys.stderr)
        return 2
    version = suite_version()
    with tempfile.TemporaryDirectory(prefix="tokentape-conformance-") as scratch:
        work = Path(scratch)
        for name in SUITE_FILES:
            shutil.copy(SUITE_DIR / name, work / name)
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=work, check=True
        )
        prefix = f"ttconformance:{uuid.uuid4().hex[:12]}"
        given = args.redis or (None if args.cluster else os.environ.get("TOKENTAPE_TEST_REDIS_URL"))
        with redis_url(given, work, cluster=args.cluster) as url:
            try:
                with tokentape(
                    url,
                    prefix,
                    args.long_poll_seconds,
                    work / "tokentape.log",
                    cluster=args.cluster,
                ) as base:
                    env = {
                        **os.environ,
                        "CONFORMANCE_BASE_URL": base,
                        "CONFORMANCE_LONG_POLL_MS": str(int(args.long_poll_seconds * 1000)),
                    }
                    subprocess.run(
                        [
                            node,
                            "node_modules/vitest/vitest.mjs",
                            "run",
                            "--reporter=default",
                            "--reporter=json",
                            "--outputFile.json=results.json",
                        ],
                        cwd=work,
                        env=env,
                        check=False,
                    )
            finally:
                delete_keys(url, prefix, cluster=args.cluster)
        result = counts(work / "results.json")
    print(
        f"{SUITE_PACKAGE} {version}: {result['passed']} passed, "
        f"{result['failed']} failed, {result['skipped']} skipped"
    )
    if args.record:
        RECORDED.write_text(json.dumps({"suite": version, **result}, indent=2) + "\n")
        return 0
    recorded = json.loads(RECORDED.read_text())
    if recorded["suite"] != version or result["passed"] < recorded["passed"]:
        print(
            f"regression: {recorded['passed']} passed with {SUITE_PACKAGE} {recorded['suite']} "
            f"({RECORDED.relative_to(REPO)})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
