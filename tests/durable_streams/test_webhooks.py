"""Where webhooks may go (the SSRF policy) and how they are signed, checked as a receiver
checks them: with the public key the JWKS publishes."""

from __future__ import annotations

import base64

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from app.durable_streams.errors import WebhookUrlRejected
from app.durable_streams.webhooks import WebhookPolicy, WebhookSigner

STRICT = WebhookPolicy()
LOOPBACK_ALLOWED = WebhookPolicy(["127.0.0.1", "LocalHost"])


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/wake",
        "https://93.184.215.14:8443/wake",
        "https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/wake",
    ],
    ids=["name", "public IPv4", "public IPv6"],
)
def test_https_to_a_public_host_is_accepted(url: str) -> None:
    assert str(STRICT.check_url(url)) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example.com/wake",
        "http://10.0.0.1/hook",
        "https://10.0.0.1/hook",
        "https://172.16.5.4/hook",
        "https://192.168.1.1/hook",
        "https://127.0.0.1/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://100.64.0.1/hook",
        "https://0.0.0.0/hook",
        "https://224.0.0.1/hook",
        "https://255.255.255.255/hook",
        "https://[::1]/hook",
        "https://[fe80::1]/hook",
        "https://[fd00::1]/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "https://localhost/hook",
        "https://api.localhost/hook",
        "https://user:secret@hooks.example.com/wake",
        "ftp://hooks.example.com/wake",
        "/relative/wake",
        "not a url at all",
    ],
    ids=repr,
)
def test_unsafe_webhook_urls_are_rejected(url: str) -> None:
    with pytest.raises(WebhookUrlRejected) as rejected:
        STRICT.check_url(url)
    assert rejected.value.code == "WEBHOOK_URL_REJECTED"
    assert rejected.value.status == 400


def test_hosts_the_operator_allows_take_http_at_any_address() -> None:
    assert LOOPBACK_ALLOWED.check_url("http://127.0.0.1:9000/hook").port == 9000
    assert LOOPBACK_ALLOWED.check_url("http://localhost/hook").host == "localhost"
    with pytest.raises(WebhookUrlRejected):
        LOOPBACK_ALLOWED.check_url("http://127.0.0.2/hook")  # only what is listed
    LOOPBACK_ALLOWED.check_addresses("localhost", ["127.0.0.1", "::1"])


def test_a_name_is_refused_when_any_address_it_resolves_to_is_not_public() -> None:
    STRICT.check_addresses("hooks.example.com", ["93.184.215.14"])
    for addresses in (["93.184.215.14", "10.1.2.3"], ["fe80::1%eth0"], ["127.0.0.1"]):
        with pytest.raises(WebhookUrlRejected):
            STRICT.check_addresses("hooks.example.com", addresses)


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify(signer_jwks: dict[str, list[dict[str, str]]], header: str, body: bytes) -> bool:
    """What a receiver does: the key `kid` names in the JWKS, over `<t>.<body>`."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    (key,) = [key for key in signer_jwks["keys"] if key["kid"] == fields["kid"]]
    public = Ed25519PublicKey.from_public_bytes(_b64decode(key["x"]))
    try:
        public.verify(_b64decode(fields["ed25519"]), fields["t"].encode() + b"." + body)
    except InvalidSignature:
        return False
    return True


def test_a_signature_verifies_with_the_published_key_and_only_for_its_body() -> None:
    signer = WebhookSigner([b"the secret"])
    header = signer.signature(b'{"wake_id":"w_1"}', now=1_800_000_000.7)
    assert header.startswith(f"t=1800000000,kid={signer.kid},ed25519=")
    assert signer.kid.startswith("ds_")
    (key,) = signer.jwks()["keys"]
    assert {k: key[k] for k in ("kty", "crv", "alg", "use")} == {
        "kty": "OKP",
        "crv": "Ed25519",
        "alg": "EdDSA",
        "use": "sig",
    }
    assert verify(signer.jwks(), header, b'{"wake_id":"w_1"}')
    assert not verify(signer.jwks(), header, b'{"wake_id":"w_2"}')


def test_every_reader_derives_the_same_key_and_a_rotation_keeps_the_old_one_published() -> None:
    assert WebhookSigner([b"s1"]).kid == WebhookSigner([b"s1"]).kid
    rotated = WebhookSigner([b"s2", b"s1"])
    assert rotated.kid == WebhookSigner([b"s2"]).kid
    assert [key["kid"] for key in rotated.jwks()["keys"]] == [
        rotated.kid,
        WebhookSigner([b"s1"]).kid,
    ]
    old_header = WebhookSigner([b"s1"]).signature(b"{}", now=1_800_000_000)
    assert verify(rotated.jwks(), old_header, b"{}")  # signed before the rotation
