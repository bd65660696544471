"""API keys, owner hashes and read tokens, without HTTP or Redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.access import Access, ApiKeys, Signer
from app.errors import ConfigError, Unauthorized
from app.settings import Settings

SECRET = "s" * 32
OTHER_SECRET = "o" * 32
KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"
GENERATION = "g" * 22
OTHER_GENERATION = "h" * 22


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def access(clock: Clock | None = None, /, **settings: str) -> Access:
    values = {"api_keys": f"{KEY_A},{KEY_B}", "secret": SECRET, **settings}
    return Access.from_settings(Settings(**values), clock or Clock())  # type: ignore[arg-type]


def test_without_keys_the_service_is_open() -> None:
    opened = Access.from_settings(Settings())
    assert opened.open
    assert opened.caller(KEY_A) is None


def test_a_key_is_a_caller_and_anything_else_is_not() -> None:
    service = access()
    a, b = service.caller(KEY_A), service.caller(KEY_B)
    assert a is not None
    assert b is not None
    assert a.owner != b.owner
    for presented in ("", KEY_A[:-1], KEY_A + "x", KEY_A.upper(), "key-c-0123456789abcdef"):
        assert service.caller(presented) is None


def test_the_owner_is_a_keyed_hash_never_the_key() -> None:
    caller = access().caller(KEY_A)
    assert caller is not None
    assert KEY_A not in caller.owner
    assert caller.owner != access(secret=OTHER_SECRET).caller(KEY_A).owner  # type: ignore[union-attr]
    assert caller.owns(caller.owner)
    assert caller.owns(None)  # created while the service was open
    assert not caller.owns(access().caller(KEY_B).owner)  # type: ignore[union-attr]


def test_owners_made_with_the_previous_secret_stay_owned_after_rotation() -> None:
    before = access(secret=OTHER_SECRET).caller(KEY_A)
    after = access(secret=SECRET, previous_secret=OTHER_SECRET).caller(KEY_A)
    assert before is not None
    assert after is not None
    assert after.owner != before.owner  # new generations get the new hash
    assert after.owns(before.owner)
    dropped = access(secret=SECRET).caller(KEY_A)
    assert dropped is not None
    assert not dropped.owns(before.owner)


def test_a_read_token_reads_its_generation_until_it_expires() -> None:
    clock = Clock()
    service = access(clock)
    minted = service.mint(GENERATION)
    assert minted.expires_at == clock.now + 86400
    assert minted.token.startswith(f"{GENERATION}.{minted.expires_at}.")
    service.verify(minted.token, GENERATION)
    clock.now = minted.expires_at - 1
    service.verify(minted.token, GENERATION)
    clock.now = minted.expires_at
    with pytest.raises(Unauthorized) as refused:
        service.verify(minted.token, GENERATION)
    assert refused.value.code == "token_expired"


def test_a_token_for_another_generation_says_so() -> None:
    service = access()
    token = service.mint(OTHER_GENERATION).token
    with pytest.raises(Unauthorized) as refused:
        service.verify(token, GENERATION)
    assert refused.value.code == "token_wrong_generation"


@pytest.mark.parametrize(
    "forge",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # another MAC
        lambda t: t.replace(".", ".9", 1),  # a later expiry, same MAC
        lambda t: "h" * 22 + t[22:],  # another generation, same MAC
        lambda t: "",
        lambda t: "not-a-token",
        lambda t: t + ".x",
        lambda t: KEY_A,
    ],
    ids=["mac", "expiry", "generation", "empty", "garbage", "extra-part", "an-api-key"],
)
def test_a_forged_token_is_invalid(forge: object) -> None:
    service = access()
    token = service.mint(GENERATION).token
    with pytest.raises(Unauthorized) as refused:
        service.verify(forge(token), GENERATION)  # type: ignore[operator]
    assert refused.value.code == "token_invalid"
    assert refused.value.status == 401


def test_tokens_of_the_previous_secret_are_accepted_then_dropped() -> None:
    old = access(secret=OTHER_SECRET).mint(GENERATION).token
    access(secret=SECRET, previous_secret=OTHER_SECRET).verify(old, GENERATION)
    with pytest.raises(Unauthorized):
        access(secret=SECRET).verify(old, GENERATION)


def test_keys_from_a_file_are_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# the backend\n{KEY_A}\n\n")
    keys = ApiKeys(f"@{path}", Signer(SECRET))
    assert keys.caller(KEY_A) is not None
    assert keys.caller(KEY_B) is None
    path.write_text(f"{KEY_B}\n")
    assert keys.reload() == 1
    assert keys.caller(KEY_A) is None
    assert keys.caller(KEY_B) is not None


def test_a_bad_reload_keeps_the_keys_it_had(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{KEY_A}\n")
    keys = ApiKeys(f"@{path}", Signer(SECRET))
    for content in ("", "short\n", f"{KEY_B}\nwith space in it 0123\n"):
        path.write_text(content)
        with pytest.raises(ConfigError) as refused:
            keys.reload()
        assert "TOKENTAPE_API_KEYS" in refused.value.message
        assert "short" not in refused.value.message
        assert KEY_B not in refused.value.message
        assert keys.caller(KEY_A) is not None
    path.unlink()
    with pytest.raises(ConfigError):
        keys.reload()
    assert keys.caller(KEY_A) is not None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"secret": ""}, "TOKENTAPE_SECRET is not"),
        ({"secret": "short"}, "TOKENTAPE_SECRET must be at least 32"),
        ({"previous_secret": "short"}, "TOKENTAPE_PREVIOUS_SECRET must be at least 32"),
        ({"api_keys": "tiny"}, "TOKENTAPE_API_KEYS: entry 1 of the list is not a key"),
        ({"api_keys": "@/nonexistent/keys"}, "TOKENTAPE_API_KEYS: cannot read /nonexistent/keys"),
    ],
    ids=["no-secret", "short-secret", "short-previous", "short-key", "missing-file"],
)
def test_unusable_access_settings_are_refused_by_name(
    settings: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        access(**settings)
    assert message in refused.value.message
    assert "short" not in refused.value.message.replace("TOKENTAPE", "")


def test_no_secret_says_how_to_make_one() -> None:
    with pytest.raises(ConfigError) as refused:
        access(secret="")
    assert "secrets.token_urlsafe(32)" in refused.value.message
