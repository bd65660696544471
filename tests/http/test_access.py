"""API keys and read tokens on every endpoint, against a real Redis: only a generation's
owner manages it, only its token (or owner) reads it, and nothing says another key's
generation exists."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from app import events
from app.access import Signer
from app.errors import ConfigError
from app.http import create_app
from app.http.state import ACCESS
from app.settings import Settings
from app.store import GenerationLog
from tests.http.conftest import Client, ClientFactory, Stream, Writer, read_all

SECRET = "s" * 32
OLD_SECRET = "o" * 32
KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
VALID: dict[str, Any] = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}

SecuredFactory = Callable[..., Awaitable[Client]]


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def secured_settings(settings: Settings) -> Settings:
    return settings.replace(api_keys=f"{KEY_A},{KEY_B}", secret=SECRET)


@pytest.fixture
def secured_factory(
    aiohttp_client: ClientFactory, secured_settings: Settings, redis: Redis
) -> SecuredFactory:
    async def make(**changes: Any) -> Client:
        return await aiohttp_client(create_app(secured_settings.replace(**changes), redis))

    return make


@pytest.fixture
async def secured(secured_factory: SecuredFactory) -> Client:
    return await secured_factory()


async def create(client: Client, headers: dict[str, str] = A) -> dict[str, Any]:
    response = await client.post("/v1/generations", json=VALID, headers=headers)
    assert response.status == 201, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def error_of(response: Any, status: int) -> dict[str, Any]:
    # Not the body: an event stream's (a 200 where a refusal was due) never ends.
    assert response.status == status, (response.status, response.headers)
    error: dict[str, Any] = (await response.json())["error"]
    return error


def forged(token: str) -> str:
    """`token` with another MAC: its first character changed."""
    head, _, mac = token.rpartition(".")
    return f"{head}.{'B' if mac[0] == 'A' else 'A'}{mac[1:]}"


async def finished(log: GenerationLog, generation_id: str) -> None:
    writer = await Writer.start(log, generation_id)
    await writer.tokens(2)


# -- API keys ---------------------------------------------------------------------

KEY_ROUTES = [
    ("POST", "/v1/generations"),
    ("GET", "/v1/generations/AAAAAAAAAAAAAAAAAAAAAA"),
    ("POST", "/v1/generations/AAAAAAAAAAAAAAAAAAAAAA/cancel"),
    ("POST", "/v1/generations/AAAAAAAAAAAAAAAAAAAAAA/read-tokens"),
    ("PUT", "/v1/stream/chat"),
    ("GET", "/v1/stream/chat"),
]


@pytest.mark.parametrize(("method", "path"), KEY_ROUTES)
async def test_without_a_key_is_401_with_a_bearer_challenge(
    secured: Client, method: str, path: str
) -> None:
    response = await secured.request(method, path, json=VALID)
    error = await error_of(response, 401)
    assert error["code"] == "key_missing"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="tokentape"'


@pytest.mark.parametrize(("method", "path"), KEY_ROUTES)
@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {KEY_A}x", f"Basic {KEY_A}", "Bearer", f"Bearer {KEY_A} {KEY_A}"],
    ids=["unknown-key", "basic", "empty", "two"],
)
async def test_a_key_that_is_not_one_is_401(
    secured: Client, method: str, path: str, authorization: str
) -> None:
    response = await secured.request(
        method, path, json=VALID, headers={"Authorization": authorization}
    )
    error = await error_of(response, 401)
    assert error["code"] == "key_invalid"
    assert response.headers["WWW-Authenticate"].endswith('error="invalid_token"')


async def test_a_read_token_is_no_api_key(secured: Client) -> None:
    created = await create(secured)
    token = {"Authorization": f"Bearer {created['read_token']}"}
    response = await secured.get(created["status_url"], headers=token)
    assert (await error_of(response, 401))["code"] == "key_invalid"


async def test_another_keys_generation_is_404_everywhere_as_an_unknown_one(
    secured: Client, log: GenerationLog
) -> None:
    created = await create(secured, A)
    generation_id = created["id"]
    unknown = "A" * 22
    for method, path in [
        ("GET", "/v1/generations/{}"),
        ("POST", "/v1/generations/{}/cancel"),
        ("POST", "/v1/generations/{}/read-tokens"),
        ("GET", "/v1/generations/{}/events"),
        ("GET", "/v1/stream/generations/{}"),
    ]:
        theirs = await secured.request(method, path.format(generation_id), headers=B)
        nobodys = await secured.request(method, path.format(unknown), headers=B)
        assert (theirs.status, nobodys.status) == (404, 404), path
        mine, none = (await theirs.json())["error"], (await nobodys.json())["error"]
        assert mine["code"] == none["code"] == "generation_not_found"
        assert mine["message"].replace(generation_id, "ID") == none["message"].replace(
            unknown, "ID"
        )
    state = await log.state(generation_id)
    assert state is not None
    assert not state.cancel_requested  # B's cancel did nothing
    response = await secured.get(created["status_url"], headers=A)
    assert (await response.json())["status"] == "queued"


async def test_the_owner_manages_its_generation(secured: Client, log: GenerationLog) -> None:
    created = await create(secured, A)
    assert (await secured.get(created["status_url"], headers=A)).status == 200
    response = await secured.post(f"{created['status_url']}/cancel", headers=A)
    assert response.status == 202
    assert (await response.json())["status"] == "cancelled"


async def test_the_owner_is_stored_as_a_hash_never_the_key(
    secured: Client, redis: Redis, log: GenerationLog
) -> None:
    created = await create(secured, A)
    meta = await redis.hgetall(log.keys.meta(created["id"]))
    assert meta[b"owner"]
    assert KEY_A.encode() not in repr(meta).encode()


# -- read tokens ------------------------------------------------------------------


async def test_create_answers_a_read_token_and_an_events_url_that_carries_it(
    secured: Client, log: GenerationLog
) -> None:
    created = await create(secured)
    token = created["read_token"]
    assert created["events_url"] == f"/v1/generations/{created['id']}/events?token={token}"
    assert created["read_token_expires_at"].endswith("Z")
    await finished(log, created["id"])
    status, received = await read_all(secured, created["events_url"])
    assert status == 200
    assert [m.event for m in received] == ["token", "token", "done"]
    # The same token in the header, as a server-side client sends it.
    status, received = await read_all(
        secured, created["status_url"] + "/events", headers={"Authorization": f"Bearer {token}"}
    )
    assert (status, len(received)) == (200, 3)


async def test_the_owning_key_reads_events_too(secured: Client, log: GenerationLog) -> None:
    created = await create(secured)
    await finished(log, created["id"])
    status, received = await read_all(secured, created["status_url"] + "/events", headers=A)
    assert (status, len(received)) == (200, 3)


@pytest.mark.parametrize(
    ("credential", "code"),
    [
        (None, "token_missing"),
        ("forged", "token_invalid"),
        ("other-generation", "token_wrong_generation"),
        ("expired", "token_expired"),
        ("another-secret", "token_invalid"),
    ],
)
@pytest.mark.parametrize("place", ["query", "header"])
async def test_events_refuse_a_missing_forged_expired_or_misdirected_token(
    secured: Client, credential: str | None, code: str, place: str
) -> None:
    mine, other = await create(secured), await create(secured)
    url = mine["status_url"] + "/events"
    token = {
        None: None,
        "forged": forged(mine["read_token"]),
        "other-generation": other["read_token"],
        "expired": Signer(SECRET).mint(mine["id"], expires_at=1_000_000),
        "another-secret": Signer(OLD_SECRET).mint(mine["id"], expires_at=4_000_000_000),
    }[credential]
    kwargs: dict[str, Any] = {}
    if token is not None:
        kwargs = (
            {"params": {"token": token}}
            if place == "query"
            else {"headers": {"Authorization": f"Bearer {token}"}}
        )
    response = await secured.get(url, **kwargs)
    error = await error_of(response, 401)
    assert error["code"] == code
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    if token is not None:
        assert token not in await response.text()


async def test_expiry_is_checked_when_a_stream_opens_never_during_it(
    secured_factory: SecuredFactory, log: GenerationLog
) -> None:
    client = await secured_factory(read_token_seconds=60)
    clock = Clock()
    assert client.app is not None
    client.app[ACCESS].clock = clock
    created = await create(client)
    writer = await Writer.start(log, created["id"])
    async with client.get(created["events_url"]) as response:
        assert response.status == 200
        stream = Stream(response)
        await writer.append(events.Token(text="before"))
        assert [m.data for m in await stream.take(1)] == ['{"type":"token","text":"before"}']
        clock.now += 3600  # the token expires while the stream is open
        await writer.append(events.Token(text="after"), events.Done(reason="stop"))
        assert [m.event for m in await stream.rest()] == ["token", "done"]
    again = await client.get(created["events_url"], headers={"Last-Event-ID": "1"})
    assert (await error_of(again, 401))["code"] == "token_expired"


async def test_an_expired_token_is_replaced_by_a_fresh_one_and_the_stream_resumes(
    secured_factory: SecuredFactory, log: GenerationLog
) -> None:
    client = await secured_factory(read_token_seconds=60)
    clock = Clock()
    assert client.app is not None
    client.app[ACCESS].clock = clock
    created = await create(client)
    await finished(log, created["id"])
    clock.now += 120
    response = await client.get(created["events_url"], headers={"Last-Event-ID": "1"})
    assert (await error_of(response, 401))["code"] == "token_expired"
    fresh = await client.post(f"{created['status_url']}/read-tokens", headers=A)
    assert fresh.status == 200
    grant = await fresh.json()
    assert grant["read_token"] != created["read_token"]
    status, received = await read_all(client, grant["events_url"], headers={"Last-Event-ID": "1"})
    assert (status, [int(m.id or 0) for m in received]) == (200, [2, 3])


async def test_rotating_the_secret_keeps_owners_and_tokens_until_the_previous_one_goes(
    secured_factory: SecuredFactory, log: GenerationLog
) -> None:
    before = await secured_factory(secret=OLD_SECRET)
    created = await create(before)
    await finished(log, created["id"])
    rotated = await secured_factory(secret=SECRET, previous_secret=OLD_SECRET)
    assert (await rotated.get(created["status_url"], headers=A)).status == 200
    assert (await read_all(rotated, created["events_url"]))[0] == 200
    done = await secured_factory(secret=SECRET)
    assert (await done.get(created["status_url"], headers=A)).status == 404
    response = await done.get(created["events_url"])
    assert (await error_of(response, 401))["code"] == "token_invalid"


async def test_a_durable_streams_read_of_a_generation_takes_its_token(
    secured: Client, log: GenerationLog
) -> None:
    created = await create(secured)
    await finished(log, created["id"])
    path = f"/v1/stream/generations/{created['id']}"
    assert (await secured.get(path, params={"token": created["read_token"]})).status == 200
    assert (await secured.get(path, headers=A)).status == 200
    response = await secured.get(path)
    assert (await error_of(response, 401))["code"] == "token_missing"


# -- the open service ---------------------------------------------------------------


async def test_an_open_service_hands_out_no_tokens(client: Client) -> None:
    created = await create(client, {})
    assert "read_token" not in created
    assert "?" not in created["events_url"]
    response = await client.post(f"{created['status_url']}/read-tokens")
    assert (await error_of(response, 409))["code"] == "access_control_off"


async def test_a_generation_created_while_open_is_any_keys(client: Client, secured: Client) -> None:
    created = await create(client, {})
    for key in (A, B):
        assert (await secured.get(created["status_url"], headers=key)).status == 200


def test_keys_without_a_secret_refuse_to_make_an_app(settings: Settings, redis: Redis) -> None:
    with pytest.raises(ConfigError, match="TOKENTAPE_SECRET"):
        create_app(settings.replace(api_keys=KEY_A), redis)
