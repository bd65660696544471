"""/v1/stream/__ds/: the protocol's subscriptions over HTTP, with real webhook receivers on
loopback (allowed as the conformance suite's are) and real readers. The webhook and
pull-wake round trips and a subscription heard by another reader run on a Redis Cluster
too (`ON_EVERY_BACKEND`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from yarl import URL

from app.durable_streams import delivery, protocol
from app.http import create_app
from app.http.durable_streams import SUBSCRIPTIONS
from app.settings import Settings
from tests.conftest import ON_EVERY_BACKEND
from tests.durable_streams.conftest import Receiver, streams_app
from tests.durable_streams.test_webhooks import verify
from tests.http.conftest import Client, ClientFactory

ServerFactory = Callable[..., Awaitable[TestServer]]
SUBSCRIPTION = "/v1/stream/__ds/subscriptions/sub-1"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def hooks_settings(settings: Settings) -> Settings:
    """The service as the conformance suite runs it: webhooks may go to loopback."""
    return settings.replace(webhook_allowed_hosts="127.0.0.1")


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, hooks_settings: Settings, store_redis: Redis | RedisCluster
) -> Client:
    return await aiohttp_client(create_app(hooks_settings, store_redis))


async def listening(aiohttp_server: ServerFactory, receiver: Receiver) -> str:
    server = await aiohttp_server(receiver.app, host="127.0.0.1")
    return f"http://127.0.0.1:{server.port}/hook"


def webhook(url: str, **more: Any) -> dict[str, Any]:
    return {"type": "webhook", "pattern": "events/*", "webhook": {"url": url}, **more}


async def write(client: Client, path: str, event: str) -> str:
    """Create or append to `path`; the tail it leaves."""
    async with client.head(f"/v1/stream/{path}") as head:
        method = client.post if head.status == 200 else client.put
    async with method(f"/v1/stream/{path}", headers=JSON, data=f'{{"event":"{event}"}}') as r:
        assert r.status in (200, 201, 204)
        return r.headers[protocol.NEXT_OFFSET]


async def acknowledge(
    client: Client, url: str, token: str, wake: dict[str, Any], acks: list[Any], *, done: bool
) -> tuple[int, dict[str, Any]]:
    body = {"wake_id": wake["wake_id"], "generation": wake["generation"], "acks": acks}
    headers = {**JSON, "Authorization": f"Bearer {token}"}
    path = URL(url).raw_path  # a callback_url is absolute; the test client takes paths
    async with client.post(path, json={**body, "done": done}, headers=headers) as response:
        return response.status, await response.json()


@ON_EVERY_BACKEND
async def test_a_webhook_is_signed_called_back_and_fenced_once_done(
    client: Client, aiohttp_server: ServerFactory
) -> None:
    receiver = Receiver()
    url = await listening(aiohttp_server, receiver)
    async with client.put(SUBSCRIPTION, json=webhook(url, lease_ttl_ms=60_000)) as response:
        assert response.status == 201
        created = await response.json()
    base = str(client.make_url(""))
    signing = created["webhook"]["signing"]
    assert signing["jwks_url"] == f"{base}/v1/stream/__ds/jwks.json"
    assert "webhook_secret" not in created
    async with client.put(SUBSCRIPTION, json=webhook(url, lease_ttl_ms=60_000)) as response:
        assert response.status == 200
    async with client.get("/v1/stream/__ds/jwks.json") as response:
        assert response.headers["Content-Type"].startswith("application/jwk-set+json")
        jwks = await response.json()
    assert signing["kid"] in [key["kid"] for key in jwks["keys"]]

    tail = await write(client, "events/a", "created")
    wake = await receiver.next()
    assert verify(jwks, wake.signature, wake.body)
    note = wake.json
    assert note["subscription_id"] == "sub-1"
    assert note["callback_url"] == f"{base}{SUBSCRIPTION}/callback"
    assert note["streams"] == [
        {
            "path": "events/a",
            "link_type": "glob",
            "acked_offset": "-1",
            "tail_offset": tail,
            "has_pending": True,
        }
    ]
    acks = [{"stream": "events/a", "offset": tail}]
    token = note["callback_token"]
    assert await acknowledge(client, note["callback_url"], token, note, acks, done=True) == (
        200,
        {"ok": True, "next_wake": False},
    )
    status, refused = await acknowledge(client, note["callback_url"], token, note, acks, done=True)
    assert (status, refused["error"]["code"]) == (409, "FENCED")
    async with client.get(SUBSCRIPTION) as response:
        shown = await response.json()
    assert shown["streams"] == [{"path": "events/a", "link_type": "glob", "acked_offset": tail}]
    assert (shown["status"], shown["type"], shown["lease_ttl_ms"]) == ("active", "webhook", 60_000)


async def test_a_receiver_that_answers_done_acks_what_it_was_shown(
    client: Client, aiohttp_server: ServerFactory
) -> None:
    receiver = Receiver((200, {"done": True}))
    url = await listening(aiohttp_server, receiver)
    async with client.put(SUBSCRIPTION, json=webhook(url)) as response:
        assert response.status == 201
    first_tail = await write(client, "events/a", "one")
    first = (await receiver.next()).json
    second_tail = await write(client, "events/a", "two")
    second = (await receiver.next()).json
    assert second["generation"] == first["generation"] + 1
    (shown,) = second["streams"]
    assert (shown["acked_offset"], shown["tail_offset"]) == (first_tail, second_tail)


async def test_a_failed_delivery_is_retried_and_the_subscription_says_so_meanwhile(
    client: Client, aiohttp_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "FIRST_RETRY_SECONDS", 0.01)
    receiver = Receiver((503, {}), (200, {"done": True}))
    url = await listening(aiohttp_server, receiver)
    async with client.put(SUBSCRIPTION, json=webhook(url)) as response:
        assert response.status == 201
    await write(client, "events/a", "one")
    refused, retried = (await receiver.next()).json, (await receiver.next()).json
    assert (retried["wake_id"], retried["generation"]) == (refused["wake_id"], 1)
    # The retry's answer is recorded before the next wake is delivered.
    await write(client, "events/a", "two")
    assert (await receiver.next()).json["generation"] == 2
    async with client.get(SUBSCRIPTION) as response:
        assert (await response.json())["status"] == "active"


@pytest.mark.parametrize(
    ("allowed", "url"),
    [
        ("127.0.0.1", "http://10.0.0.1/hook"),
        ("127.0.0.1", "https://169.254.169.254/latest"),
        ("", "http://127.0.0.1:9/hook"),
    ],
    ids=["private over http", "link-local", "loopback not allowed"],
)
async def test_unsafe_webhook_urls_are_refused_with_the_protocols_code(
    aiohttp_client: ClientFactory, settings: Settings, redis: Redis, allowed: str, url: str
) -> None:
    client = await aiohttp_client(
        create_app(settings.replace(webhook_allowed_hosts=allowed), redis)
    )
    async with client.put(SUBSCRIPTION, json=webhook(url)) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "WEBHOOK_URL_REJECTED"
    async with client.get(SUBSCRIPTION) as response:
        assert response.status == 404


async def long_poll_wake(
    client: Client, wake_stream: str, after: str
) -> tuple[dict[str, Any], str]:
    """The next wake event appended to the wake stream after `after`, and its offset."""
    params = {"offset": after, "live": "long-poll"}
    async with client.get(f"/v1/stream/{wake_stream}", params=params) as response:
        assert response.status == 200
        (event,) = await response.json()
        return event, response.headers[protocol.NEXT_OFFSET]


@ON_EVERY_BACKEND
async def test_a_pull_wake_is_claimed_by_one_worker_acked_and_released(client: Client) -> None:
    async with client.put("/v1/stream/wake/pool", headers=JSON, data=b"[]") as response:
        assert response.status == 201
        offset = response.headers[protocol.NEXT_OFFSET]
    body = {"type": "pull-wake", "pattern": "events/*", "wake_stream": "wake/pool"}
    async with client.put(SUBSCRIPTION, json=body) as response:
        assert response.status == 201
    tail = await write(client, "events/a", "one")
    event, offset = await long_poll_wake(client, "wake/pool", offset)
    assert {k: event[k] for k in ("type", "subscription_id", "stream", "generation")} == {
        "type": "wake",
        "subscription_id": "sub-1",
        "stream": "events/a",
        "generation": 1,
    }
    async with client.post(f"{SUBSCRIPTION}/claim", json={"worker": "worker-1"}) as response:
        assert response.status == 200
        claimed = await response.json()
    assert [(s["path"], s["tail_offset"]) for s in claimed["streams"]] == [("events/a", tail)]
    async with client.post(f"{SUBSCRIPTION}/claim", json={"worker": "worker-2"}) as response:
        assert response.status == 409
        busy = (await response.json())["error"]
    assert (busy["code"], busy["current_holder"], busy["generation"]) == (
        "ALREADY_CLAIMED",
        "worker-1",
        1,
    )
    acks = [{"stream": "events/a", "offset": tail}]
    assert await acknowledge(
        client, f"{SUBSCRIPTION}/ack", claimed["token"], claimed, acks, done=True
    ) == (200, {"ok": True, "next_wake": False})

    await write(client, "events/a", "two")
    event, offset = await long_poll_wake(client, "wake/pool", offset)
    assert event["generation"] == 2
    async with client.post(f"{SUBSCRIPTION}/claim", json={"worker": "worker-1"}) as response:
        claimed = await response.json()
    headers = {"Authorization": f"Bearer {claimed['token']}"}
    wake = {"wake_id": claimed["wake_id"], "generation": claimed["generation"]}
    async with client.post(f"{SUBSCRIPTION}/release", json=wake, headers=headers) as response:
        assert response.status == 204
    # Released with work pending: woken again, for another claim.
    event, _ = await long_poll_wake(client, "wake/pool", offset)
    assert event["generation"] == 3


async def test_explicit_streams_are_added_and_removed(client: Client) -> None:
    body = {"type": "pull-wake", "streams": ["manual/a"], "wake_stream": "wake/pool"}
    async with client.put(SUBSCRIPTION, json=body) as response:
        assert response.status == 201
    async with client.post(f"{SUBSCRIPTION}/streams", json={"streams": ["manual/b"]}) as response:
        assert response.status == 204
    async with client.delete(f"{SUBSCRIPTION}/streams/manual%2Fb") as response:
        assert response.status == 204
    async with client.get(SUBSCRIPTION) as response:
        streams = (await response.json())["streams"]
    assert streams == [
        {"path": "manual/a", "link_type": "explicit", "acked_offset": protocol.format_offset(0)}
    ]
    async with client.delete(SUBSCRIPTION) as response:
        assert response.status == 204
    async with client.get(SUBSCRIPTION) as response:
        assert (await response.json())["error"]["code"] == "SUBSCRIPTION_NOT_FOUND"


@ON_EVERY_BACKEND
async def test_a_subscription_made_on_one_reader_hears_the_writes_of_another(
    aiohttp_client: ClientFactory,
    aiohttp_server: ServerFactory,
    hooks_settings: Settings,
    store_redis: Redis | RedisCluster,
    client: Client,
) -> None:
    other = await aiohttp_client(create_app(hooks_settings, store_redis))
    receiver = Receiver()
    url = await listening(aiohttp_server, receiver)
    async with client.put(SUBSCRIPTION, json=webhook(url)) as response:
        assert response.status == 201
    await streams_app(other.app)[SUBSCRIPTIONS].until_registered("sub-1")
    tail = await write(other, "events/a", "written elsewhere")
    assert (await receiver.next()).json["streams"][0]["tail_offset"] == tail
    async with client.delete(SUBSCRIPTION) as response:
        assert response.status == 204
    await streams_app(other.app)[SUBSCRIPTIONS].until_registered("sub-1", present=False)


async def test_with_api_keys_the_api_needs_one_and_a_callback_its_token(
    aiohttp_client: ClientFactory,
    aiohttp_server: ServerFactory,
    hooks_settings: Settings,
    redis: Redis,
) -> None:
    key = {"Authorization": "Bearer key-a-0123456789abcdef"}
    secured = hooks_settings.replace(api_keys="key-a-0123456789abcdef", secret="s" * 32)
    client = await aiohttp_client(create_app(secured, redis))
    receiver = Receiver()
    url = await listening(aiohttp_server, receiver)
    async with client.put(SUBSCRIPTION, json=webhook(url)) as response:
        assert response.status == 401
    async with client.put(SUBSCRIPTION, json=webhook(url), headers=key) as response:
        assert response.status == 201
    async with client.get("/v1/stream/__ds/jwks.json") as response:
        assert response.status == 200  # receivers fetch it with no key
    async with client.put("/v1/stream/events/a", headers={**JSON, **key}, data=b"{}") as r:
        tail = r.headers[protocol.NEXT_OFFSET]
    note = (await receiver.next()).json
    acks = [{"stream": "events/a", "offset": tail}]
    status, _ = await acknowledge(
        client, note["callback_url"], "not-the-token", note, acks, done=True
    )
    assert status == 401
    status, _ = await acknowledge(
        client, note["callback_url"], note["callback_token"], note, acks, done=True
    )
    assert status == 200


async def test_stream_names_under_the_control_prefix_are_not_streams(client: Client) -> None:
    async with client.put("/v1/stream/__ds/mine", headers=JSON, data=b"[]") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "SUBSCRIPTION_NOT_FOUND"
    async with client.get(f"{SUBSCRIPTION}/callback") as response:
        assert response.status == 404
