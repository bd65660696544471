"""Webhooks of subscriptions: which URLs the server calls, and how it signs what it sends.

**Where a webhook may go (SSRF).** A webhook URL is called by the server, from inside the
deployment's network: unchecked, anyone who may create a subscription could make it call
Redis, a cloud metadata endpoint or an internal admin page. So a webhook goes over https
to public addresses only. A URL whose host is a private, loopback, link-local, shared,
multicast, reserved or unspecified address (IPv4, IPv6, or IPv4 inside IPv6), or a
`localhost` name, is refused when the subscription is created (WEBHOOK_URL_REJECTED). A
host name is resolved at every delivery and connected to only when every address it
resolves to is public, at the address that was checked: a name that starts pointing
inside later (DNS rebinding) gains nothing. Redirects are not followed, and no proxy from
the environment is used. Hosts the operator lists in `TOKENTAPE_WEBHOOK_ALLOWED_HOSTS` are
exempt, reached over http or https at any address: for development (`127.0.0.1,localhost`,
where the protocol's own test receiver listens) or a trusted internal receiver.

**Signatures.** Every webhook carries `Webhook-Signature: t=<unix seconds>,kid=<key id>,
ed25519=<base64url signature of "<t>.<body>">`, which a receiver checks with the key `kid`
names in the JWKS (`/v1/stream/__ds/jwks.json`). The Ed25519 key is derived (HKDF-SHA256)
from `TOKENTAPE_SECRET`, so every reader signs with the same key and no private key is
stored anywhere; the key of `TOKENTAPE_PREVIOUS_SECRET` stays in the JWKS while the secret
rotates. A service with no secret derives its key from a random seed kept in Redis
(`app.store.subscriptions`), made by the first reader that needs one.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from yarl import URL

from app.durable_streams.errors import WebhookUrlRejected

MAX_URL_LENGTH = 2048
_KEY_INFO = b"tokentape durable-streams webhook signing key"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(address: Address) -> bool:
    """Whether `address` is on the public internet: not private, loopback, link-local,
    shared (100.64/10), multicast, reserved or unspecified."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not (
        address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or address.is_loopback
        or address.is_link_local
    )


class WebhookPolicy:
    """The URLs webhooks may be sent to: see the module docstring."""

    def __init__(self, allowed_hosts: Iterable[str] = ()) -> None:
        self._allowed = frozenset(host.lower().strip("[]") for host in allowed_hosts)

    def allowed(self, host: str) -> bool:
        """Whether `host` is the operator's exception: any scheme, any address."""
        return host.lower() in self._allowed

    def check_url(self, raw: str) -> URL:
        """`raw` as a URL a webhook may be sent to, or WEBHOOK_URL_REJECTED saying why not."""
        try:
            url = URL(raw)
        except ValueError:
            url = None
        if (
            url is None
            or len(raw) > MAX_URL_LENGTH
            or not url.absolute
            or url.scheme not in ("http", "https")
            or not url.host
        ):
            raise WebhookUrlRejected(
                message=f"webhook.url is an absolute https URL of up to {MAX_URL_LENGTH} characters"
            )
        if url.user is not None or url.password is not None:
            raise WebhookUrlRejected(
                message="webhook.url carries no credentials: it is shown to whoever reads the "
                "subscription (verify the Webhook-Signature instead)"
            )
        host = url.host.lower()
        if self.allowed(host):
            return url
        if url.scheme != "https":
            raise WebhookUrlRejected(
                message="webhooks go over https; http only to a host the operator allows "
                "(TOKENTAPE_WEBHOOK_ALLOWED_HOSTS)"
            )
        try:
            address: Address | None = ipaddress.ip_address(host)
        except ValueError:
            address = None
        local_name = host == "localhost" or host.endswith(".localhost")
        if local_name or (address is not None and not is_public(address)):
            raise WebhookUrlRejected(
                message=f"webhooks go to public addresses only, not {host} (a private, "
                "loopback or link-local one); TOKENTAPE_WEBHOOK_ALLOWED_HOSTS lists exceptions"
            )
        return url

    def check_addresses(self, host: str, addresses: Iterable[str]) -> None:
        """WEBHOOK_URL_REJECTED unless every address `host` resolved to is public (or the
        host is allowed)."""
        if self.allowed(host):
            return
        for raw in addresses:
            if not is_public(ipaddress.ip_address(raw.split("%", 1)[0])):
                raise WebhookUrlRejected(
                    message=f"{host} resolves to {raw}, which is not a public address"
                )


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class _SigningKey:
    __slots__ = ("jwk", "kid", "private")

    def __init__(self, secret: bytes) -> None:
        seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEY_INFO).derive(secret)
        self.private = Ed25519PrivateKey.from_private_bytes(seed)
        x = _b64(self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
        # RFC 7638 thumbprint: the required members, in lexicographic order, no whitespace.
        thumbprint = msgspec.json.encode({"crv": "Ed25519", "kty": "OKP", "x": x}, order="sorted")
        self.kid = "ds_" + _b64(hashlib.sha256(thumbprint).digest())
        self.jwk = {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "use": "sig",
                    "alg": "EdDSA"}  # fmt: skip


class WebhookSigner:
    """Signs webhooks with the key of the first secret; publishes the keys of all."""

    def __init__(self, secrets: Sequence[bytes]) -> None:
        if not secrets:
            raise ValueError("a signer needs a secret")
        self._keys = [_SigningKey(secret) for secret in dict.fromkeys(secrets)]

    @property
    def kid(self) -> str:
        return self._keys[0].kid

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(key.jwk) for key in self._keys]}

    def signature(self, body: bytes, now: float) -> str:
        """The `Webhook-Signature` header of `body`, sent at `now`."""
        timestamp = str(int(now))
        signed = self._keys[0].private.sign(timestamp.encode() + b"." + body)
        return f"t={timestamp},kid={self.kid},ed25519={_b64(signed)}"
