"""The shipped nginx site run by a real nginx, and real tokentape processes behind it."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from redis import Redis

from tests.browser.conftest import TokentapeProcess
from tests.conftest import REDIS_URL, free_port

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "ops" / "nginx" / "tokentape.conf"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)
NO_NGINX = "nginx is not installed (apt-get install nginx; .ci/run installs it as root)"

# The upstream's reader lines, with whatever parameters the site gives them.
_READER_LINE = re.compile(
    r"^(?P<indent>[ \t]*)server 127\.0\.0\.1:\d+(?P<parameters>[^;]*);\n", re.M
)


def site_for(listen: int, readers: Sequence[int]) -> str:
    """The shipped site with only its addresses changed: one upstream line per reader port."""
    site = SITE.read_text()
    shipped = list(_READER_LINE.finditer(site))
    assert shipped, "the site's upstream lists no 127.0.0.1 reader"
    indent, parameters = shipped[0]["indent"], shipped[0]["parameters"]
    lines = "".join(f"{indent}server 127.0.0.1:{port}{parameters};\n" for port in readers)
    site = site[: shipped[0].start()] + lines + _READER_LINE.sub("", site[shipped[0].end() :])
    assert "listen 80;" in site
    return site.replace("listen 80;", f"listen 127.0.0.1:{listen};")


def main_config(directory: Path, listen: int, readers: Sequence[int]) -> Path:
    """A minimal nginx.conf around the shipped site.

    gzip is on for text/event-stream at the http level, as a careless main config
    might have it, so the site's own `gzip off` is what is tested.
    """
    (directory / "tokentape.conf").write_text(site_for(listen, readers))
    user = "user root;\n" if os.geteuid() == 0 else ""
    config = directory / "nginx.conf"
    config.write_text(
        f"""{user}worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    gzip on;
    gzip_min_length 1;
    gzip_proxied any;
    gzip_types text/event-stream application/json;
    include {directory}/tokentape.conf;
}}
"""
    )
    return config


class Nginx:
    """nginx serving the shipped site on a free port, in front of `readers`."""

    def __init__(self, directory: Path, readers: Sequence[int]) -> None:
        assert NGINX is not None
        directory.mkdir()
        self.port = free_port()
        self.directory = directory
        config = main_config(directory, self.port, readers)
        self.process = subprocess.Popen(
            [NGINX, "-c", str(config), "-p", str(directory)], stderr=subprocess.DEVNULL
        )
        for _ in range(500):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.1):
                    return
            except OSError:
                if self.process.poll() is not None:
                    pytest.fail(f"nginx exited: {(directory / 'error.log').read_text()}")
                # Polling a port until a process listens: there is no event to await.
                time.sleep(0.01)
        pytest.fail("nginx did not start listening")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait()


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[Callable[[Sequence[int]], Nginx]]:
    """Start nginx with the shipped site in front of the given reader ports; stopped after."""
    if NGINX is None:
        pytest.skip(NO_NGINX)
    started: list[Nginx] = []

    def start(readers: Sequence[int]) -> Nginx:
        nginx = Nginx(tmp_path / f"nginx-{len(started)}", readers)
        started.append(nginx)
        return nginx

    yield start
    for nginx in started:
        nginx.stop()


@pytest.fixture
def start_process(key_prefix: str) -> Iterator[Callable[..., TokentapeProcess]]:
    """Start `python -m app ...` processes under this test's key prefix; stopped and cleaned up after."""
    started: list[TokentapeProcess] = []

    def start(*command: str) -> TokentapeProcess:
        process = TokentapeProcess(list(command), key_prefix, b"tokentape ")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
    client = Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{key_prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
