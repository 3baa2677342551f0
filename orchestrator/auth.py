"""Who may use the Realtime API: the server's standard API key, or an ephemeral ``ek_`` key.

One function decides for every transport (the WebSocket handshake, ``POST /v1/realtime/
calls``, the client-secrets endpoint), so the rules cannot drift apart:

- Keys come from ``Authorization: Bearer <key>`` and, for browsers (which cannot set
  headers on a WebSocket), from the subprotocol ``openai-insecure-api-key.<key>``.
- The configured keys (the standard key and the named ones of ``CASCADE_API_KEYS``, see
  ``limits.py``) are compared with ``hmac.compare_digest`` against *every* presented key,
  with no early exit, so timing tells nothing about which one (or which prefix) matched.
  The grant names the matching key's tenant, whose limits the session then counts against.
- An ``ek_`` key is looked up in the client secrets (``orchestrator/keys.py``), shared by
  every replica through the store; it grants access until it expires and carries the
  session config it was minted with, and the tenant that minted it (a key of a tenant no
  longer configured is refused: removing a key revokes its ek_ keys).
  ``allow_ephemeral=False`` refuses them (the endpoint that mints keys: a key handed to a
  browser must not mint more).
- A server without an API key is open, but an ``ek_`` key presented to it still brings its
  session config (the demo page's minted config applies even without auth).

Key values are never logged, nor put in error messages.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from orchestrator.limits import DEFAULT_TENANT, KeyRing
from orchestrator.store import StoreError

if TYPE_CHECKING:
    from orchestrator.keys import ClientSecrets

log = logging.getLogger(__name__)

KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
EPHEMERAL_PREFIX = "ek_"
# At most this many ek_ keys of one request are looked up (each is a store read), so a
# handshake offering hundreds of subprotocols costs no more than a normal one.
MAX_EPHEMERAL_LOOKUPS = 4


class AuthUnavailable(Exception):
    """An ``ek_`` key could not be checked now (client secrets not loaded yet, or the store
    unreachable): answer "try again later" (HTTP 503, WebSocket close 1013), not 401."""


@dataclass(frozen=True)
class Grant:
    """A request let in, and on what terms."""

    kind: Literal["api_key", "ephemeral", "open"]  # open: the server has no api_key
    # With an ek_ key: the session config it was minted with (a session.update body as
    # JSON; ``orchestrator.keys.session_from_config`` applies it), else None.
    session: dict[str, Any] | None = None
    # With an ek_ key: when it expires (epoch seconds). A call or connection already
    # started with it continues past that time, as with OpenAI.
    expires_at: int | None = None
    # Whose limits the session counts against: the matching key's name (DEFAULT_TENANT for
    # the standard key and an open server), or the name of the key that minted the ek_ key.
    tenant: str = DEFAULT_TENANT


def presented_keys(headers: Mapping[str, str], subprotocols: Sequence[str] = ()) -> list[str]:
    """Every key the client presented: the Bearer token, then the key subprotocols.

    ``headers`` maps lowercase names to values (starlette's ``Headers`` of an HTTP request
    or a WebSocket scope); ``subprotocols`` are the WebSocket's offered subprotocols."""
    keys = []
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    for proto in subprotocols:
        if proto.startswith(KEY_SUBPROTOCOL_PREFIX) and len(proto) > len(KEY_SUBPROTOCOL_PREFIX):
            keys.append(proto[len(KEY_SUBPROTOCOL_PREFIX):])
    return keys


def _ring(api_key: str | KeyRing) -> KeyRing:
    if isinstance(api_key, KeyRing):
        return api_key
    return KeyRing([(DEFAULT_TENANT, api_key)] if api_key else [])


async def authorize(keys: Sequence[str], *, api_key: str | KeyRing,
                    secrets: ClientSecrets | None,
                    allow_ephemeral: bool = True) -> Grant | None:
    """The grant for a request presenting ``keys``; None if refused.

    ``api_key`` is the server's standard key, or every configured key
    (``ServeSettings.key_ring()``). Raises ``AuthUnavailable`` when the answer depends on
    an ``ek_`` key that cannot be checked now (``secrets`` is None while the server loads,
    or the store fails)."""
    ring = _ring(api_key)
    tenant = ring.match(keys) if ring else None
    if tenant is not None:
        return Grant("api_key", tenant=tenant)
    kind: Literal["ephemeral", "open"] = "ephemeral" if ring else "open"
    if allow_ephemeral:
        candidates = [k for k in keys if k.startswith(EPHEMERAL_PREFIX)]
        if candidates and secrets is None:
            raise AuthUnavailable("client secrets are not available yet")
        for key in candidates[:MAX_EPHEMERAL_LOOKUPS]:
            assert secrets is not None
            try:
                secret = await secrets.lookup(key)
            except StoreError as exc:
                raise AuthUnavailable(f"client secrets cannot be checked: {exc.code}") from exc
            if secret is not None and (secret.tenant == DEFAULT_TENANT or secret.tenant in ring):
                return Grant(kind, session=secret.session, expires_at=secret.expires_at,
                             tenant=secret.tenant)
    if ring:
        log.debug("refused: %d key(s) presented, none valid", len(keys))
        return None
    return Grant("open")
