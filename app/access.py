"""Who may do what: API keys, the owner of a generation, and read tokens.

Pure logic: no HTTP (`app.http.auth` applies it to requests) and no Redis (a read
token is verified with the secret alone). docs/security.md describes the model.

- An API key creates, reads the status of, cancels and mints read tokens for the
  generations it owns. A generation stores its owner: a keyed hash of the key that
  created it (`Caller.owner`), never the key.
- A read token lets its holder read one generation's events until it expires:
  `<generation id>.<expires, unix seconds>.<HMAC-SHA256 of both>`.
- `TOKENTAPE_PREVIOUS_SECRET` is accepted beside `TOKENTAPE_SECRET`, for tokens and
  for owners, so the secret rotates without downtime or orphaned generations.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import re
import time
from collections.abc import Callable
from pathlib import Path

from app.errors import ConfigError, Unauthorized
from app.keys import check_generation_id
from app.settings import Settings

# Visible ASCII without the comma that separates keys in TOKENTAPE_API_KEYS.
_KEY_RE = re.compile(r"^[\x21-\x2b\x2d-\x7e]{16,256}$")
MIN_SECRET_LENGTH = 32
MAKE_A_SECRET = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"

_OWNER_CONTEXT = b"tokentape owner\x00"
_TOKEN_CONTEXT = b"tokentape read token\x00"
_OWNER_BYTES = 16
_MAC_LENGTH = 43  # 32 bytes, base64url without padding
_TOKEN_RE = re.compile(r"^([A-Za-z0-9_-]{16,64})\.([0-9]{1,12})\.([A-Za-z0-9_-]{43})$")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """The holder of one API key."""

    # The key's owner hash under the current secret: what a generation it creates stores.
    owner: str
    # Its owner hashes under the current and the previous secret.
    owners: frozenset[str]

    def owns(self, owner: str | None) -> bool:
        # A generation created while the service was open has no owner: any key may see it.
        return owner is None or owner in self.owners


@dataclasses.dataclass(frozen=True, slots=True)
class ReadToken:
    token: str
    expires_at: int  # unix seconds


class Signer:
    """HMACs under the current secret, checked under the current and the previous one."""

    def __init__(self, secret: str, previous: str = "") -> None:
        self._current = secret.encode()
        self._all = [self._current] + ([previous.encode()] if previous else [])

    def caller(self, key: str) -> Caller:
        owners = [self._owner(secret, key) for secret in self._all]
        return Caller(owner=owners[0], owners=frozenset(owners))

    @staticmethod
    def _owner(secret: bytes, key: str) -> str:
        digest = hmac.digest(secret, _OWNER_CONTEXT + key.encode(), "sha256")
        return _b64(digest[:_OWNER_BYTES])

    @staticmethod
    def _mac(secret: bytes, generation_id: str, expires_at: str) -> bytes:
        message = _TOKEN_CONTEXT + f"{generation_id}.{expires_at}".encode()
        # hmac.digest: the one-shot C path, several times faster than hmac.new().digest().
        return base64.urlsafe_b64encode(hmac.digest(secret, message, "sha256"))[:_MAC_LENGTH]

    def mint(self, generation_id: str, expires_at: int) -> str:
        mac = self._mac(self._current, generation_id, str(expires_at)).decode()
        return f"{generation_id}.{expires_at}.{mac}"

    def verify(self, token: str, generation_id: str, now: float) -> None:
        """Returns if `token` lets its holder read `generation_id` at `now`, else raises
        Unauthorized with code token_invalid, token_wrong_generation or token_expired."""
        parsed = _TOKEN_RE.match(token)
        if parsed is None:
            raise _token_invalid()
        for_generation, expires_at, mac = parsed.groups()
        presented = mac.encode()
        # Every secret is tried, so the time taken does not say which one matched.
        valid = False
        for secret in self._all:
            valid |= hmac.compare_digest(self._mac(secret, for_generation, expires_at), presented)
        if not valid:
            raise _token_invalid()
        if for_generation != generation_id:
            raise Unauthorized(
                "token_wrong_generation",
                "this read token is for another generation: use the token that came with this one",
                invalid_token=True,
            )
        if int(expires_at) <= now:
            raise Unauthorized(
                "token_expired",
                "this read token has expired: ask for a new one "
                "(POST /v1/generations/{id}/read-tokens with the API key) and resume",
                invalid_token=True,
            )


def _token_invalid() -> Unauthorized:
    return Unauthorized(
        "token_invalid",
        "the credential is neither an API key nor a valid read token for this service",
        invalid_token=True,
    )


class ApiKeys:
    """The accepted API keys: TOKENTAPE_API_KEYS as a comma-separated list, or `@FILE`
    with one key a line (blank lines and `#` comments skipped), re-read by `reload`."""

    def __init__(self, setting: str, signer: Signer) -> None:
        self._setting = setting.strip()
        self._signer = signer
        self.path = Path(self._setting[1:]) if self._setting.startswith("@") else None
        self._by_digest: dict[bytes, tuple[bytes, Caller]] = {}
        self.reload()

    def __len__(self) -> int:
        return len(self._by_digest)

    def reload(self) -> int:
        """Read the keys again (from the file, if any); returns how many there are.

        Raises ConfigError, keeping the keys it had, when the new set is unusable.
        """
        keys = self._read()
        if not keys:
            raise ConfigError(message=f"TOKENTAPE_API_KEYS: {self._where()} holds no key")
        by_digest: dict[bytes, tuple[bytes, Caller]] = {}
        for key in keys:
            raw = key.encode()
            by_digest[hashlib.sha256(raw).digest()] = (raw, self._signer.caller(key))
        self._by_digest = by_digest
        return len(by_digest)

    def _where(self) -> str:
        return f"the file {self.path}" if self.path is not None else "the list"

    def _read(self) -> list[str]:
        if self.path is None:
            entries = [(i, key.strip()) for i, key in enumerate(self._setting.split(","), 1)]
            entries = [(i, key) for i, key in entries if key]
            what = "entry"
        else:
            try:
                text = self.path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    message=f"TOKENTAPE_API_KEYS: cannot read {self.path}: {exc}"
                ) from None
            entries = [
                (i, line.strip())
                for i, line in enumerate(text.splitlines(), 1)
                if line.strip() and not line.lstrip().startswith("#")
            ]
            what = "line"
        for number, key in entries:
            if not _KEY_RE.match(key):
                # Never the key itself: this message reaches logs.
                raise ConfigError(
                    message=f"TOKENTAPE_API_KEYS: {what} {number} of {self._where()} is not a "
                    "key: 16-256 visible ASCII characters, no comma"
                )
        return [key for _, key in entries]

    def caller(self, presented: str) -> Caller | None:
        """The caller whose key this is, or None. The lookup goes by the key's SHA-256 and
        ends with a constant-time comparison, so its time says nothing about a key."""
        raw = presented.encode()
        entry = self._by_digest.get(hashlib.sha256(raw).digest())
        if entry is None or not hmac.compare_digest(entry[0], raw):
            return None
        return entry[1]


class Access:
    """What the service enforces: nothing (`open`), or API keys and read tokens."""

    def __init__(
        self,
        keys: ApiKeys | None,
        signer: Signer | None,
        read_token_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self._signer = signer
        self.read_token_seconds = read_token_seconds
        self.clock = clock

    @property
    def open(self) -> bool:
        return self.keys is None

    @classmethod
    def from_settings(cls, settings: Settings, clock: Callable[[], float] = time.time) -> Access:
        """Raises ConfigError (naming the variable, never a value) when keys and secrets
        do not make a usable whole."""
        if not settings.api_keys.strip():
            return cls(None, None, settings.read_token_seconds, clock)
        if not settings.secret:
            raise ConfigError(
                message="TOKENTAPE_API_KEYS is set but TOKENTAPE_SECRET is not: read tokens and "
                f"owners are signed with it. Make one with {MAKE_A_SECRET} and keep it secret"
            )
        for name, value in (
            ("SECRET", settings.secret),
            ("PREVIOUS_SECRET", settings.previous_secret),
        ):
            if value and len(value) < MIN_SECRET_LENGTH:
                raise ConfigError(
                    message=f"TOKENTAPE_{name} must be at least {MIN_SECRET_LENGTH} characters; "
                    f"make one with {MAKE_A_SECRET}"
                )
        signer = Signer(settings.secret, settings.previous_secret)
        return cls(ApiKeys(settings.api_keys, signer), signer, settings.read_token_seconds, clock)

    def caller(self, key: str) -> Caller | None:
        """The caller holding API key `key`; None if it is not one (or the service is open)."""
        return None if self.keys is None else self.keys.caller(key)

    def mint(self, generation_id: str) -> ReadToken:
        assert self._signer is not None, "read tokens exist only with API keys"
        expires_at = int(self.clock() + self.read_token_seconds)
        return ReadToken(
            self._signer.mint(check_generation_id(generation_id), expires_at), expires_at
        )

    def verify(self, token: str, generation_id: str) -> None:
        """Raises Unauthorized unless `token` lets its holder read `generation_id` now."""
        assert self._signer is not None, "read tokens exist only with API keys"
        self._signer.verify(token, generation_id, self.clock())
