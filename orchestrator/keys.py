"""Ephemeral client keys (``ek_...``), OpenAI's Realtime "client secrets".

A backend holding the server's standard API key mints a short-lived key for a browser or a
phone with ``POST /v1/realtime/client_secrets``; the standard key never leaves the backend.
The key may carry a session config (instructions, voice, turn detection, ...) that every
call made with it starts from. One key may start several calls until it expires; a call
already running continues past the expiry (as with OpenAI).

Why it is built this way:

- Keys live in the session store, so every orchestrator replica sharing a Redis accepts a
  key minted by any other, and the expiry is the store's (Redis ``PX``): it holds across
  processes and restarts of one of them.
- Only the key's SHA-256 is stored (the key has 256 random bits, so a plain digest cannot
  be reversed or guessed): a dump of the store yields nothing a client could present.
- ``expires_at`` (epoch seconds, what the client is told) is checked against the clock on
  every lookup as well, so a key is refused from that second on even where the store's
  own expiry is lazy or a replica's clock runs ahead of Redis.
- The record names the tenant (the API key's name, ``limits.py``) that minted it: sessions
  opened with the ek_ key count against that tenant's limits and belong to it (a resume
  needs the same tenant), and a key minted by a tenant no longer configured is refused.
- Scope: the minted config is where every session made with the key *starts*; the client
  may still change it with ``session.update`` as with OpenAI (the key grants a session,
  not a fixed configuration). What an ek_ key can never do: mint more keys, open the
  sideband of a WebRTC call, exceed its tenant's limits, or outlive its expiry for a new
  connection.
- The stored session config is the client's *update* (only the fields it set, validated
  and normalized to the GA shape), so a later ``apply_update`` on a new session gives
  exactly the effective session the mint answered with.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets as _random
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.auth import EPHEMERAL_PREFIX, authorize, presented_keys
from orchestrator.limits import DEFAULT_TENANT, TenantLimiter, refusal_response
from orchestrator.metrics import REJECTED_CONNECTIONS
from orchestrator.protocol.base import WireModel, wire_context
from orchestrator.protocol.errors import from_validation_error
from orchestrator.protocol.session import Session, SessionConfig, apply_update
from orchestrator.settings import ServeSettings
from orchestrator.store import SessionStore, StoreError, StoreLimitError
from stages.common.jsontext import strict_loads

log = logging.getLogger(__name__)

CLIENT_SECRETS_PATH = "/v1/realtime/client_secrets"
MIN_SECONDS = 10
MAX_SECONDS = 7200  # 2 hours, OpenAI's bound
DEFAULT_SECONDS = 600
# What a minted value looks like (ek_ + 43 URL-safe characters); anything else is refused
# before it is hashed or the store is asked, so garbage costs nothing.
_VALUE = re.compile(r"ek_[A-Za-z0-9_-]{16,128}")
# A request body larger than this is refused (413) before it is parsed.
MAX_BODY_BYTES = 1024 * 1024


class ClientSecret(BaseModel):
    """A minted (or looked-up) ephemeral key."""

    model_config = ConfigDict(frozen=True)

    value: str = Field(repr=False)  # never in a repr, hence never in a log line
    expires_at: int  # epoch seconds
    # The session config it was minted with (a session.update body, JSON), or None.
    session: dict[str, Any] | None = None
    # The name of the API key that minted it (its sessions count against that key).
    tenant: str = DEFAULT_TENANT

    def session_config(self) -> SessionConfig | None:
        return None if self.session is None else SessionConfig.model_validate(self.session)


def secret_id(value: str) -> str:
    """The store id of a key: its SHA-256 hex digest (the key itself is never stored)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def check_seconds(seconds: object) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, int) \
            or not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise ValueError(f"seconds must be an integer between {MIN_SECONDS} and {MAX_SECONDS} "
                         f"(2 hours), got {seconds!r}")
    return seconds


def session_from_config(config: Mapping[str, Any] | SessionConfig | None,
                        base: Session | None = None) -> Session:
    """The session a call made with a key starts with: ``config`` (a key's stored session,
    ``Grant.session``) applied to ``base`` (a new default session when None)."""
    session = base if base is not None else Session()
    if config is None:
        return session
    update = config if isinstance(config, SessionConfig) else SessionConfig.model_validate(config)
    return apply_update(session, update)


def _stored_config(session: Mapping[str, Any] | SessionConfig | None) -> dict[str, Any] | None:
    """The validated update as JSON: only the fields the client set, GA shape."""
    if session is None:
        return None
    config = session if isinstance(session, SessionConfig) \
        else SessionConfig.model_validate(session)  # ValidationError is a ValueError
    return config.model_dump(mode="json", exclude_unset=True)


class ClientSecrets:
    """Mint and look up ``ek_`` keys in the session store (Redis when configured)."""

    def __init__(self, store: SessionStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock  # wall clock, epoch seconds: expires_at is shown to clients

    async def mint(self, *, seconds: int = DEFAULT_SECONDS,
                   session: Mapping[str, Any] | SessionConfig | None = None,
                   tenant: str = DEFAULT_TENANT) -> ClientSecret:
        """A new key valid for ``seconds`` (10..7200) from now, carrying ``session``, on
        behalf of ``tenant``.

        ``ValueError`` for a bad ``seconds`` or an invalid session config; a store failure
        raises its ``StoreError`` (``StoreLimitError`` when too many keys are live)."""
        seconds = check_seconds(seconds)
        config = _stored_config(session)
        value = EPHEMERAL_PREFIX + _random.token_urlsafe(32)
        now = self._clock()
        expires_at = math.floor(now) + seconds  # whole seconds, as clients are told
        record = {"expires_at": expires_at, "created_at": math.floor(now), "session": config,
                  "tenant": tenant}
        await self._store.put_client_secret(secret_id(value), record, expires_at - now)
        return ClientSecret(value=value, expires_at=expires_at, session=config, tenant=tenant)

    async def lookup(self, value: str) -> ClientSecret | None:
        """The key's secret if it is one we minted and has not expired; else None."""
        if not isinstance(value, str) or _VALUE.fullmatch(value) is None:
            return None
        record = await self._store.get_client_secret(secret_id(value))
        if record is None:
            return None
        expires_at = record.get("expires_at")
        session = record.get("session")
        tenant = record.get("tenant", DEFAULT_TENANT)  # records minted before tenants
        if not isinstance(expires_at, int) or not isinstance(tenant, str) \
                or not (session is None or isinstance(session, dict)):
            log.warning("ignoring a malformed client secret record")
            return None
        if self._clock() >= expires_at:
            return None
        return ClientSecret(value=value, expires_at=expires_at, session=session, tenant=tenant)


# --- POST /v1/realtime/client_secrets ------------------------------------------------------


class ExpiresAfter(WireModel):
    anchor: Literal["created_at"] = "created_at"
    seconds: int = Field(default=DEFAULT_SECONDS, strict=True)

    @field_validator("seconds")
    @classmethod
    def _in_range(cls, seconds: int) -> int:
        return check_seconds(seconds)


class ClientSecretRequest(WireModel):
    """The request body (OpenAI's ``client_secrets.create``); both fields optional."""

    expires_after: ExpiresAfter | None = None
    # A realtime session config, as in session.update (a transcription session is not
    # supported: its "type" is refused as an invalid value).
    session: SessionConfig | None = None


def error_response(status: int, code: str, message: str, *, param: str | None = None,
                   type: str = "invalid_request_error") -> JSONResponse:
    """An OpenAI-style error body."""
    return JSONResponse({"error": {"message": message, "type": type, "code": code,
                                   "param": param}},
                        status_code=status, headers={"Cache-Control": "no-store"})


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is over ``limit`` bytes (never read past the limit)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


_read_body = read_body  # the name signalling.py imported first


def _server_default(settings: ServeSettings) -> Session:
    """A new session as this server starts it (its pipeline), before any update."""
    session = Session()
    return session.model_copy(update={
        "cascade": session.cascade.model_copy(update={"pipeline": settings.pipeline})})


def secrets_router(settings: ServeSettings,
                   secrets: Callable[[], ClientSecrets | None],
                   limiter: TenantLimiter | None = None) -> APIRouter:
    """``POST /v1/realtime/client_secrets``. ``secrets()`` is None until the server has
    loaded its store (then 503). With ``limiter`` each key mints at most its connection
    rate (a bucket of its own), so no key can fill the store's bound of live secrets."""
    router = APIRouter()

    @router.post(CLIENT_SECRETS_PATH)
    async def create_client_secret(request: Request) -> JSONResponse:
        tenant = DEFAULT_TENANT
        if settings.auth_required:
            keys = presented_keys(request.headers)
            grant = await authorize(keys, api_key=settings.key_ring(), secrets=None,
                                    allow_ephemeral=False)
            if grant is None:
                if any(k.startswith(EPHEMERAL_PREFIX) for k in keys):
                    message = ("A client secret (ek_ key) cannot create client secrets: "
                               "use the server's API key.")
                else:
                    message = "Missing or incorrect API key: send 'Authorization: Bearer <key>'."
                return error_response(401, "invalid_api_key", message)
            tenant = grant.tenant
        if limiter is not None and (refusal := limiter.connect(tenant, "client secrets")):
            REJECTED_CONNECTIONS.labels(refusal.reason).inc()
            return refusal_response(refusal)
        store = secrets()
        if store is None:
            return error_response(503, "server_not_ready",
                                  "The server is still loading. Try again later.",
                                  type="server_error")
        body = await read_body(request, MAX_BODY_BYTES)
        if body is None:
            return error_response(413, "payload_too_large",
                                  f"The request body is over {MAX_BODY_BYTES} bytes.")
        try:
            data = strict_loads(body) if body.strip() else {}
        except (ValueError, RecursionError):
            return error_response(400, "invalid_json",
                                  "The request body is not valid JSON.")
        if not isinstance(data, dict):
            return error_response(400, "invalid_type",
                                  "The request body must be a JSON object.")
        try:
            req = ClientSecretRequest.model_validate(data)
        except ValidationError as exc:
            err = from_validation_error(exc, data, None)
            return error_response(400, err.code, err.message, param=err.param)
        seconds = req.expires_after.seconds if req.expires_after else DEFAULT_SECONDS
        try:
            secret = await store.mint(seconds=seconds, session=req.session, tenant=tenant)
        except StoreLimitError as exc:
            return error_response(429, exc.code, f"Cannot create a client secret now: {exc}",
                                  type="server_error")
        except StoreError as exc:
            log.warning("client secret not stored: %s", exc)
            return error_response(503, exc.code, "The key store is unavailable. "
                                  "Try again later.", type="server_error")
        effective = session_from_config(req.session, _server_default(settings))
        log.info("minted a client secret for %s expiring at %d", tenant, secret.expires_at)
        return JSONResponse(
            {"value": secret.value, "expires_at": secret.expires_at,
             "session": effective.model_dump(mode="json", context=wire_context("ga"))},
            headers={"Cache-Control": "no-store"})

    return router
