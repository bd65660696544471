"""Who is asking: a request's API key or read token, checked against what it asks for.

A missing or invalid credential is 401 with `WWW-Authenticate: Bearer`; a generation
another key owns is 404, as an unknown id is: its existence is not disclosed. With no
API keys configured (`Access.open`) every check passes. docs/security.md.
"""

from __future__ import annotations

import re

from aiohttp import web

from app.access import Caller
from app.errors import InvalidRequest, NotFound, Unauthorized
from app.http.state import ACCESS
from app.store import GenerationState

# What a credential may look like at all; anything else is not a key or a token.
_CREDENTIAL_RE = re.compile(r"^[\x21-\x7e]{1,512}$")


def _bearer(request: web.Request) -> str | None:
    """The credential of `Authorization: Bearer <credential>`; "" for another scheme."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, credential = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return credential.strip()


def require_key(request: web.Request) -> Caller | None:
    """The caller holding the request's API key; None when the service is open."""
    access = request.config_dict[ACCESS]
    if access.open:
        return None
    credential = _bearer(request)
    if credential is None:
        raise Unauthorized(
            "key_missing", "this endpoint needs an API key: send Authorization: Bearer <key>"
        )
    caller = access.caller(credential) if _CREDENTIAL_RE.match(credential) else None
    if caller is None:
        raise Unauthorized(
            "key_invalid",
            "the Authorization header does not carry an API key of this service",
            invalid_token=True,
        )
    return caller


def authorize_read(request: web.Request, generation_id: str) -> Caller | None:
    """Who may read `generation_id`'s events: a read token for it (header or `token`
    query parameter, the header first), or an API key whose ownership the caller still
    checks (`owned`). None when no ownership check is left: a valid token, or open."""
    access = request.config_dict[ACCESS]
    if access.open:
        return None
    query_token = request.query.get("token")
    if query_token and not _CREDENTIAL_RE.match(query_token):
        raise InvalidRequest(
            "invalid_query", "the token parameter is not a read token", field="token"
        )
    credential = _bearer(request)
    if credential is None:
        credential = query_token
    if not credential:
        raise Unauthorized(
            "token_missing",
            "reading events needs the read token that came with the generation: the "
            "events_url carries it (?token=), or send Authorization: Bearer <token>",
        )
    if not _CREDENTIAL_RE.match(credential):
        raise Unauthorized("token_invalid", "the credential is malformed", invalid_token=True)
    caller = access.caller(credential)
    if caller is not None:
        return caller
    access.verify(credential, generation_id)
    return None


def owned(
    caller: Caller | None, state: GenerationState | None, generation_id: str
) -> GenerationState:
    """`state` if the generation exists and `caller` (None: anyone) may see it; else 404."""
    if state is None or (caller is not None and not caller.owns(state.owner)):
        raise NotFound("generation_not_found", f"no generation {generation_id}")
    return state
