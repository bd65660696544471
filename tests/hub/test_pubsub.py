"""The hub's pub/sub connection: replies split anywhere, logging in as the client would, and
every way its stream can go wrong (dropped, malformed message, bytes that are not RESP)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from app import events, sse
from app.embedded import RedisProcess
from app.hub import Feed, Hub
from app.hub.pubsub import Endpoint, PubSubConnection
from app.settings import Settings
from app.store import GenerationLog
from scripts.bench_hub import resp
from tests.conftest import REDIS_URL, Awaited, free_port, leased_generation
from tests.hub.conftest import read_seqs


class Recorder:
    """A listener that keeps what the connection tells it."""

    def __init__(self) -> None:
        self.messages: list[list[sse.Frame]] = []
        self.confirmations = 0
        self.misses = 0

    def dispatch(self, message: list[sse.Frame], now: float) -> None:
        self.messages.append(message)

    def subscribed(self) -> None:
        self.confirmations += 1

    def missed(self) -> None:
        self.misses += 1


@given(
    batches=st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 4)), max_size=30
    ),  # (channel: 3 = nobody's, events)
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_replies_split_anywhere_reach_their_listeners_whole_and_in_order(
    batches: list[tuple[int, int]], cuts: list[int]
) -> None:
    connection = PubSubConnection(Endpoint(), b"anchor", sse.live_frames)
    listeners = [Recorder() for _ in range(3)]
    for i, listener in enumerate(listeners):
        connection.subscribe(b"live:%d" % i, listener)
    stream = [resp(b"subscribe", b"live:%d" % i, 1) for i in range(3)]
    next_seq = [1, 1, 1, 1]
    expected: list[list[bytes]] = [[], [], []]
    for channel, n in batches:
        seq = next_seq[channel]
        fields = [b"%d" % seq, b"1700000000000"]
        for i in range(n):
            data = b'{"type":"token","text":"%d"}' % (seq + i)
            fields += [b"token", data]
            if channel < 3:
                expected[channel].append(sse.event_frame(seq + i, "token", data))
        next_seq[channel] += n
        stream.append(resp(b"message", b"live:%d" % channel, b"\n".join(fields)))
    data = b"".join(stream)
    start = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts} | {len(data)}):
        connection.received(data[start:cut], 0.0)
        start = cut
    assert all(listener.confirmations == 1 for listener in listeners)
    for listener, frames in zip(listeners, expected, strict=True):
        assert [f.data for message in listener.messages for f in message] == frames
        assert listener.misses == 0


class Watching:
    """A watcher that keeps what the connection tells it."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.confirmations = 0
        self.misses = 0

    def dispatch(self, message: bytes, now: float) -> None:
        self.messages.append(message)

    def subscribed(self) -> None:
        self.confirmations += 1

    def missed(self) -> None:
        self.misses += 1


def test_a_watcher_takes_its_channels_messages_as_published_beside_the_listener() -> None:
    connection = PubSubConnection(Endpoint(), b"anchor", sse.live_frames)
    listener, beside, alone = Recorder(), Watching(), Watching()
    connection.subscribe(b"live:1", listener)
    connection.watch(b"live:1", beside)
    connection.watch(b"stream:1", alone)
    batch = b'1\n1700000000000\ntoken\n{"type":"token","text":"1"}'
    connection.received(
        resp(b"subscribe", b"live:1", 1)
        + resp(b"subscribe", b"stream:1", 2)
        + resp(b"message", b"live:1", batch)
        + resp(b"message", b"stream:1", b"7")
        + resp(b"message", b"live:1", b"not a live message"),
        0.0,
    )
    assert [len(message) for message in listener.messages] == [1]
    assert listener.misses == 1  # the malformed one: its watcher hears it all the same
    assert beside.messages == [batch, b"not a live message"]
    assert alone.messages == [b"7"]
    assert (listener.confirmations, beside.confirmations, alone.confirmations) == (1, 1, 1)
    connection.received(resp(b"subscribe", b"anchor", 3), 0.0)  # (re)connected
    assert (listener.misses, beside.misses, alone.misses) == (2, 1, 1)
    connection.unsubscribe(b"live:1")
    connection.received(resp(b"message", b"live:1", batch), 0.0)
    assert beside.messages[-1] == batch  # the channel stays for its watcher


def test_a_sharded_channel_its_node_lets_go_of_is_handed_back_for_its_watcher_too() -> None:
    lost: list[bytes] = []
    connection = PubSubConnection(Endpoint(), None, sse.live_frames, lost=lost.append)
    connection.watch(b"{ds:s}:live", Watching())
    connection.received(resp(b"sunsubscribe", b"{ds:s}:live", 0), 0.0)  # its slot moved
    assert lost == [b"{ds:s}:live"]


def test_sharded_messages_reach_their_listeners_and_a_channel_let_go_is_reported() -> None:
    lost: list[bytes] = []
    connection = PubSubConnection(Endpoint(), None, sse.live_frames, lost=lost.append)
    listener = Recorder()
    connection.subscribe(b"live:0", listener)
    data = b'{"type":"token","text":"a"}'
    connection.received(
        resp(b"ssubscribe", b"live:0", 1)
        + resp(b"smessage", b"live:0", b"1\n1700000000000\ntoken\n" + data),
        0.0,
    )
    # No anchor when sharded: each channel's confirmation says "look at the log".
    assert (listener.confirmations, listener.misses) == (1, 1)
    assert [f.data for message in listener.messages for f in message] == [
        sse.event_frame(1, "token", data)
    ]
    # The node let the channel go (its slot moved): not our SUNSUBSCRIBE.
    connection.received(resp(b"sunsubscribe", b"live:0", 0), 0.0)
    assert lost == [b"live:0"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://10.0.0.7:6390/2", Endpoint(host="10.0.0.7", port=6390)),
        ("redis://cache", Endpoint(host="cache")),
        ("unix:///run/redis.sock", Endpoint(path="/run/redis.sock")),
    ],
    ids=["host-port", "defaults", "unix"],
)
def test_the_endpoint_is_where_the_client_connects(url: str, expected: Endpoint) -> None:
    assert Endpoint.of(Redis.from_url(url, socket_connect_timeout=5)) == expected


@pytest.mark.parametrize(
    ("url", "credentials"),
    [("redis://:pw@h", ("pw",)), ("redis://user:p%40w@h", ("user", "p@w")), ("redis://h", None)],
    ids=["password", "user-and-password", "none"],
)
def test_the_endpoint_logs_in_as_the_client_would(
    url: str, credentials: tuple[str, ...] | None
) -> None:
    endpoint = Endpoint.of(Redis.from_url(url, client_name="tokentape-reader-7"))
    assert endpoint.client_name == "tokentape-reader-7"
    if credentials is None:
        assert endpoint.credentials is None
    else:
        assert endpoint.credentials is not None
        assert endpoint.credentials.get_credentials() == credentials


def test_the_endpoint_speaks_tls_for_rediss() -> None:
    endpoint = Endpoint.of(Redis.from_url("rediss://h:6380?ssl_cert_reqs=none"))
    assert endpoint.tls is not None
    assert endpoint.tls.verify_mode == ssl.CERT_NONE
    assert Endpoint.of(Redis.from_url("redis://h:6380")).tls is None


# -- on a real Redis ---------------------------------------------------------


class Proxy:
    """A TCP proxy to the test Redis: it can hold new connections, and slip bytes to clients."""

    def __init__(self) -> None:
        target = urlsplit(REDIS_URL)
        self.target = (target.hostname or "127.0.0.1", target.port or 6379)
        self.port = 0
        self.held = asyncio.Event()  # a connection arrived while holding
        self._open = asyncio.Event()
        self._open.set()
        self._clients: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    def url(self, credentials: str = "") -> str:
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def hold(self) -> None:
        """Keep new connections waiting, unconnected to Redis, until `release`."""
        self.held.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def slip(self, data: bytes) -> None:
        """Write `data` to every client as if Redis had sent it."""
        for client in self._clients:
            client.write(data)

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if not self._open.is_set():
            self.held.set()
            await self._open.wait()
        server_r, server_w = await asyncio.open_connection(*self.target)
        self._clients.add(client_w)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
            self._clients.discard(client_w)
            sink.close()

        for work in (pump(client_r, server_w), pump(server_r, client_w)):
            task = asyncio.create_task(work)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    async with Proxy() as running:
        yield running


@pytest.fixture
async def proxied_hub(
    proxy: Proxy, redis: Redis, settings: Settings, hub_name: str
) -> AsyncIterator[Hub]:
    """A hub whose pub/sub connection goes through `proxy`; recheck beat too slow to matter."""
    pubsub_redis = Redis.from_url(proxy.url(), client_name=hub_name)
    hub = Hub(GenerationLog(redis, settings), pubsub_redis, recheck_seconds=60)
    await hub.start()
    yield hub
    await hub.stop()
    await pubsub_redis.aclose()


def pubsub_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "app.hub.pubsub" and r.levelno == logging.WARNING
    ]


async def test_a_dropped_pub_sub_connection_loses_nothing(
    proxied_hub: Hub, proxy: Proxy, redis: Redis, hub_name: str
) -> None:
    hub = proxied_hub
    generation_id, lease = await leased_generation(hub.log, "w")
    subscription = await hub.subscribe(generation_id, 0)
    parser = sse.Parser()
    assert await subscription.next_chunk(0.2) == b""  # caught up: live
    await hub.log.append(lease, 1, [events.Token(text="1")])
    assert await read_seqs(subscription, parser, 1) == [1]

    # Hold the reconnect until events were published to nobody.
    proxy.hold()
    (pubsub,) = [c for c in await redis.client_list() if c["name"] == hub_name]
    await redis.client_kill_filter(_id=pubsub["id"])
    async with asyncio.timeout(5):
        await proxy.held.wait()
    await hub.log.append(lease, 2, [events.Token(text="2"), events.Token(text="3")])
    proxy.release()
    # Not live (published while unsubscribed), not the 60 s recheck: the reconnect's.
    assert await read_seqs(subscription, parser, 3) == [2, 3]
    await hub.log.append(lease, 4, [events.Done(reason="stop")])
    assert await read_seqs(subscription, parser, 4) == [4]
    assert len(await redis.pubsub_channels(hub.log.keys.live_channel(generation_id))) == 1


async def test_a_malformed_live_message_is_dropped_and_its_readers_look_at_the_log(
    hub: Hub, redis: Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    generation_id, lease = await leased_generation(hub.log, "w")
    subscription = await hub.subscribe(generation_id, 0)
    parser = sse.Parser()
    assert await subscription.next_chunk(0.2) == b""  # caught up: live
    # Live batch 1 is lost on the way, as pub/sub may lose one: nothing tells the reader.
    lost = asyncio.Event()
    dispatch = Feed.dispatch

    def lose_one(feed: Feed, frames: list[sse.Frame], now: float) -> None:
        monkeypatch.setattr(Feed, "dispatch", dispatch)
        lost.set()

    monkeypatch.setattr(Feed, "dispatch", lose_one)
    await hub.log.append(lease, 1, [events.Token(text="1")])
    async with asyncio.timeout(5):
        await lost.wait()
    caplog.set_level(logging.WARNING, "app.hub.pubsub")
    await redis.publish(hub.log.keys.live_channel(generation_id), b"not a live message")
    # The bad message stands for a lost one: the reader looks at the log, where 1 is.
    assert await read_seqs(subscription, parser, 1) == [1]
    # And the connection lives on.
    await hub.log.append(lease, 2, [events.Done(reason="stop")])
    assert await read_seqs(subscription, parser, 2) == [2]
    (warning,) = pubsub_warnings(caplog)
    assert "dropped 1 malformed live message" in warning.getMessage()
    assert warning.exc_info is None


async def test_bytes_that_are_not_resp_cost_a_reconnect_and_a_look_at_the_log(
    proxied_hub: Hub, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    hub = proxied_hub
    generation_id, lease = await leased_generation(hub.log, "w")
    subscription = await hub.subscribe(generation_id, 0)
    parser = sse.Parser()
    assert await subscription.next_chunk(0.2) == b""  # caught up: live
    caplog.set_level(logging.WARNING, "app.hub.pubsub")
    proxy.slip(b"?not RESP\r\n")  # nothing else is in flight: hiredis meets it first
    await hub.log.append(lease, 1, [events.Token(text="1")])
    # Live again, or read from the log on the reconnect: either way within seconds.
    assert await read_seqs(subscription, parser, 1) == [1]
    other_id, _ = await leased_generation(hub.log, "w")
    other = await hub.subscribe(other_id, 0, confirm_timeout=5)
    assert other.feed.confirmed  # new streams do not wait out a dead connection
    await hub.log.append(lease, 2, [events.Done(reason="stop")])
    assert await read_seqs(subscription, parser, 2) == [2]
    (warning,) = pubsub_warnings(caplog)
    assert "Protocol error" in warning.getMessage()
    assert warning.exc_info is None


async def test_a_crash_in_the_listen_loop_is_logged_and_the_loop_restarted(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    generation_id, lease = await leased_generation(hub.log, "w")
    subscription = await hub.subscribe(generation_id, 0)
    parser = sse.Parser()
    assert await subscription.next_chunk(0.2) == b""  # caught up: live
    dispatch = Feed.dispatch

    def broken_once(feed: Feed, frames: list[sse.Frame], now: float) -> None:
        monkeypatch.setattr(Feed, "dispatch", dispatch)
        raise RuntimeError("a bug in the fan-out")

    monkeypatch.setattr(Feed, "dispatch", broken_once)
    caplog.set_level(logging.ERROR, "tokentape.loops")
    await hub.log.append(lease, 1, [events.Token(text="1")])
    # Restarted, reconnected, and the reconnect has every reader look at the log.
    assert await read_seqs(subscription, parser, 1) == [1]
    await hub.log.append(lease, 2, [events.Done(reason="stop")])
    assert await read_seqs(subscription, parser, 2) == [2]
    (crash,) = [r for r in caplog.records if r.name == "tokentape.loops"]
    assert crash.getMessage().startswith("hub-listen failed")
    assert crash.exc_info is not None


# -- logging in ----------------------------------------------------------------


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1 it signed, in `tmp_path`."""
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *key, "-keyout", tmp_path / "ca.key", "-out", tmp_path / "ca.crt",
             "-days", "1", "-subj", "/CN=tokentape test CA")  # fmt: skip
    _openssl("req", *key, "-keyout", tmp_path / "server.key", "-out", tmp_path / "server.csr",
             "-subj", "/CN=127.0.0.1")  # fmt: skip
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", tmp_path / "server.csr", "-CA", tmp_path / "ca.crt",
             "-CAkey", tmp_path / "ca.key", "-CAcreateserial", "-out", tmp_path / "server.crt",
             "-days", "1", "-extfile", tmp_path / "san.ext")  # fmt: skip
    return tmp_path


@pytest.fixture
def tls_server(
    redis_server_factory: Callable[..., RedisProcess], certificates: Path
) -> tuple[RedisProcess, int]:
    """A redis-server with a TLS port beside its plain one, and an ACL user `tok`."""
    tls_port = free_port()
    server = redis_server_factory(
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(certificates / "server.crt"),
        "--tls-key-file", str(certificates / "server.key"),
        "--tls-ca-cert-file", str(certificates / "ca.crt"),
        "--tls-auth-clients", "no",
        "--user", "tok", "on", ">s3cret", "~*", "&*", "+@all",
    )  # fmt: skip
    return server, tls_port


async def test_the_connection_logs_in_over_tls_as_the_client_would(
    tls_server: tuple[RedisProcess, int], certificates: Path, settings: Settings
) -> None:
    server, tls_port = tls_server
    name = f"tttest-hub-{uuid.uuid4().hex[:12]}"
    ca = certificates / "ca.crt"
    async with (
        Redis.from_url(server.url) as redis,
        Redis.from_url(
            f"rediss://tok:s3cret@127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}", client_name=name
        ) as pubsub_redis,
    ):
        hub = Hub(GenerationLog(redis, settings), pubsub_redis, recheck_seconds=60)
        await hub.start()
        try:
            generation_id, lease = await leased_generation(hub.log, "w")
            subscription = await hub.subscribe(generation_id, 0)
            assert subscription.feed.confirmed
            assert await subscription.next_chunk(0.2) == b""  # caught up: live
            await hub.log.append(lease, 1, [events.Done(reason="stop")])
            assert await read_seqs(subscription, sse.Parser(), 1) == [1]
            (pubsub,) = [c for c in await redis.client_list() if c["name"] == name]
            assert pubsub["user"] == "tok"
            assert pubsub["cmd"] == "subscribe"
        finally:
            await hub.stop()


class Counting(logging.Handler):
    """Counts the warnings of a logger, and wakes a waiter at `until` of them."""

    def __init__(self, until: int) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.until = until
        self.reached = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if len(self.records) >= self.until:
            self.reached.set()


async def test_a_refused_login_is_warned_about_and_tried_again(
    tls_server: tuple[RedisProcess, int], settings: Settings
) -> None:
    server, _ = tls_server
    counting = Counting(until=2)
    logger = logging.getLogger("app.hub.pubsub")
    logger.addHandler(counting)
    async with (
        Redis.from_url(server.url) as redis,
        Redis.from_url(f"redis://tok:wrong@127.0.0.1:{server.port}/0") as pubsub_redis,
    ):
        hub = Hub(GenerationLog(redis, settings), pubsub_redis, recheck_seconds=60)
        await hub.start()
        try:
            async with asyncio.timeout(10):
                await counting.reached.wait()
            assert hub.running
            for record in counting.records:
                assert "AUTH refused" in record.getMessage()
                assert "WRONGPASS" in record.getMessage()
                assert record.exc_info is None
        finally:
            logger.removeHandler(counting)
            await hub.stop()
    assert not hub.running


class Signals:
    """A listener whose confirmations, misses and messages can be awaited."""

    def __init__(self) -> None:
        self.confirmed = asyncio.Event()
        self.missed_some = asyncio.Event()
        self.messages: asyncio.Queue[list[sse.Frame]] = asyncio.Queue()

    def dispatch(self, message: list[sse.Frame], now: float) -> None:
        self.messages.put_nowait(message)

    def subscribed(self) -> None:
        self.confirmed.set()

    def missed(self) -> None:
        self.missed_some.set()


async def test_a_frozen_redis_costs_a_reconnect_not_a_silent_hang(
    redis_server_factory: Callable[..., RedisProcess],
) -> None:
    server = redis_server_factory()
    connection = PubSubConnection(
        Endpoint(port=server.port), b"anchor", sse.live_frames, timeout=0.2
    )
    listener = Signals()
    connection.subscribe(b"live", listener)
    silent = Awaited("no reply to a ping")
    logging.getLogger("app.hub.pubsub").addHandler(silent)
    listening = asyncio.create_task(connection.listen())
    try:
        async with asyncio.timeout(10):
            await listener.confirmed.wait()
            listener.missed_some.clear()  # every (re)connect says so, the first one too
            server.freeze()  # the socket stays open; nothing answers, nothing closes it
            await silent.seen.wait()
            server.thaw()
            # Subscribed again on a new connection, and told to look for what it missed.
            await listener.missed_some.wait()
        async with Redis.from_url(server.url) as redis:
            await redis.publish("live", b'1\n1700000000000\ntoken\n{"type":"token","text":"a"}')
        async with asyncio.timeout(5):
            (frame,) = await listener.messages.get()
        assert frame.seq == 1
    finally:
        logging.getLogger("app.hub.pubsub").removeHandler(silent)
        server.thaw()
        connection.close()
        await listening
