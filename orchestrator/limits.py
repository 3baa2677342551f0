"""API keys ("tenants") and what each may hold: concurrent sessions and a connection rate.

A server has one standard key (``CASCADE_API_KEY``, tenant ``default``) and any number of
named keys (``CASCADE_API_KEYS``, a JSON list of ``ApiKeyConfig``), each with its own
limits or the server's per-key defaults. Every session (a Realtime WebSocket or a WebRTC
call) is counted against the tenant of the key that opened it; an ``ek_`` client secret
counts against the tenant that minted it.

Why it is built this way:

- ``KeyRing.match`` compares every presented key with every configured key using
  ``hmac.compare_digest`` and keeps going after a match, so how long it takes depends on
  the number of keys, never on which one (or which prefix) matched.
- The connection rate is a token bucket per tenant (``rate`` new connections per
  ``window_s``, bursts up to ``rate``): a refusal says exactly when the next connection
  will be let in (``Retry-After``), and a client that keeps retrying at the limit burns
  only its own tokens.
- The counts live in the process (``TenantLimiter``), checked without an await; with the
  Redis store a capped key's sessions are also counted across every server sharing it
  (``shared_caps.py``, one script call per new session of a capped key). The connection
  rate stays per process.
- A refusal carries everything a transport needs (code, message, HTTP status, retry
  delay, metric reason), so the WebSocket and WebRTC paths say the same thing.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.store import InvalidResumeToken, SessionStore

DEFAULT_TENANT = "default"
# The key in a session's stored config naming the tenant that owns it (a resume by another
# tenant is refused like a wrong token). Not a protocol field: the session drops it.
TENANT_FIELD = "_tenant"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def new_member() -> str:
    """A new session's entry in its key's count shared by the servers (``shared_caps.py``)
    until its id is known."""
    return "c_" + secrets.token_urlsafe(12)


class ApiKeyConfig(BaseModel):
    """One entry of ``CASCADE_API_KEYS``: ``{"name": "acme", "key": "sk-...",
    "max_sessions": 10, "connection_rate": 30, "connection_window_s": 60}``; a limit left
    out takes the server's per-key default (``key_max_sessions``, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    # Shown in logs and metrics instead of the key; letters, digits, "_", "-", ".".
    name: str
    key: str = Field(min_length=16, repr=False)  # never in a repr, hence never in a log
    max_sessions: int | None = Field(default=None, ge=0)  # 0: only the process's cap
    connection_rate: int | None = Field(default=None, ge=0)  # 0: no rate limit
    connection_window_s: float | None = Field(default=None, gt=0)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if _NAME.fullmatch(name) is None:
            raise ValueError("a key's name is 1-64 letters, digits, '_', '-' or '.'")
        return name


@dataclass(frozen=True)
class TenantLimits:
    max_sessions: int = 0  # concurrent sessions; 0: only the process's max_sessions
    connection_rate: int = 0  # new connections per window; 0: unlimited
    connection_window_s: float = 60.0


class KeyRing:
    """The configured keys by tenant name, and their limits."""

    def __init__(self, keys: Sequence[tuple[str, str]],
                 limits: dict[str, TenantLimits] | None = None,
                 default: TenantLimits | None = None) -> None:
        names = [name for name, _ in keys]
        if len(set(names)) != len(names):
            raise ValueError("two API keys have the same name")
        values = [key for _, key in keys]
        if len(set(values)) != len(values):
            raise ValueError("two API keys have the same value")
        self._keys = [(name, key.encode("utf-8", "surrogatepass")) for name, key in keys]
        self._limits = dict(limits or {})
        self._default = default or TenantLimits()

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __contains__(self, name: object) -> bool:
        return any(n == name for n, _ in self._keys)

    def __repr__(self) -> str:  # names only: the values never reach a log line
        return f"KeyRing({[n for n, _ in self._keys]!r})"

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self._keys]

    def limits(self, tenant: str) -> TenantLimits:
        return self._limits.get(tenant, self._default)

    def match(self, presented: Sequence[str]) -> str | None:
        """The tenant of the first configured key any presented key equals, else None.

        Every (presented, configured) pair is compared in constant time and none is
        skipped, whatever matched (no early exit)."""
        found: str | None = None
        for candidate in presented:
            raw = candidate.encode("utf-8", "surrogatepass")
            for name, key in self._keys:
                equal = hmac.compare_digest(raw, key)
                if equal and found is None:
                    found = name
        return found


@dataclass(frozen=True)
class Refusal:
    """Why a connection is not let in, in every form a transport needs."""

    code: str
    message: str
    reason: str  # the label of cascade_rejected_connections_total
    http_status: int = 429
    retry_after_s: int = 1


class TokenBucket:
    """``rate`` tokens per ``window_s``, holding at most ``rate`` (the burst)."""

    def __init__(self, rate: int, window_s: float, clock: Callable[[], float]) -> None:
        self.rate, self.window_s = rate, window_s
        self._clock = clock
        self._tokens = float(rate)
        self._at = clock()

    def _refill(self) -> float:
        now = self._clock()
        self._tokens = min(float(self.rate),
                           self._tokens + (now - self._at) * self.rate / self.window_s)
        self._at = now
        return self._tokens

    def take(self) -> float:
        """0.0 when a token was taken; else the seconds until one will be there."""
        if self._refill() >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) * self.window_s / self.rate


class TenantLimiter:
    """Live sessions and connection buckets per tenant, for one process."""

    def __init__(self, ring: KeyRing, clock: Callable[[], float] = time.monotonic) -> None:
        self.ring = ring
        self._clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self.active: dict[str, int] = {}

    def connect(self, tenant: str, what: str = "connections") -> Refusal | None:
        """One new connection of ``tenant`` (a session, a call, a sideband): rate check.
        ``what="client secrets"``: a mint, against a bucket of its own at the same rate."""
        limits = self.ring.limits(tenant)
        if limits.connection_rate <= 0:
            return None
        bucket = self._buckets.get((tenant, what))
        if bucket is None or (bucket.rate, bucket.window_s) != (
                limits.connection_rate, limits.connection_window_s):
            bucket = TokenBucket(limits.connection_rate, limits.connection_window_s,
                                 self._clock)
            self._buckets[tenant, what] = bucket
        wait = bucket.take()
        if wait <= 0:
            return None
        retry = max(1, math.ceil(wait))
        return Refusal(
            "connection_rate_limited" if what == "connections" else "mint_rate_limited",
            f"Too many new {what} for this API key (limit {limits.connection_rate} "
            f"per {limits.connection_window_s:g} s). Try again in {retry} s.",
            "rate", retry_after_s=retry)

    def reserve(self, tenant: str) -> Refusal | None:
        """Count one more live session of ``tenant`` unless it is at its cap."""
        cap = self.ring.limits(tenant).max_sessions
        held = self.active.get(tenant, 0)
        if cap > 0 and held >= cap:
            return Refusal(
                "key_session_limit_reached",
                f"This API key already has {held} live sessions, its limit. Close one or "
                "try again later.", "key_capacity", retry_after_s=5)
        self.active[tenant] = held + 1
        return None

    def release(self, tenant: str) -> None:
        held = self.active.get(tenant, 0) - 1
        if held > 0:
            self.active[tenant] = held
        else:
            self.active.pop(tenant, None)

    def admit(self, tenant: str) -> Refusal | None:
        """A new session: the rate first (every attempt takes a token), then the cap."""
        return self.connect(tenant) or self.reserve(tenant)


def refusal_response(refusal: Refusal) -> JSONResponse:
    """An HTTP endpoint's answer: the status (429, 503 at process capacity), an OpenAI-style
    error body, and ``Retry-After``."""
    error = {"message": refusal.message, "code": refusal.code, "param": None,
             "type": "rate_limit_error" if refusal.http_status == 429 else "server_error"}
    return JSONResponse({"error": error}, status_code=refusal.http_status,
                        headers={"Retry-After": str(refusal.retry_after_s),
                                 "Cache-Control": "no-store"})


def process_capacity(max_sessions: int) -> Refusal:
    """The refusal when the whole process is at ``max_sessions``."""
    return Refusal("session_limit_reached", f"The server is at its limit of {max_sessions} "
                   "sessions. Try again later.", "capacity", http_status=503, retry_after_s=5)


_OWNER_ATTR = "tenant"  # RealtimeSession.tenant


def own(session: object, tenant: str) -> None:
    """Mark a new session object (``RealtimeSession``) as ``tenant``'s, before its start:
    the tenant is stored with it and a resume by another tenant is refused."""
    setattr(session, _OWNER_ATTR, tenant)


async def check_resume_owner(store: SessionStore, session_id: str, tenant: str) -> None:
    """Refuse a resume of ``session_id`` by another tenant than the one that created it,
    with the very error a wrong resume token gets (nothing tells the two apart), before
    the resume could take the session's lease from its owner."""
    config = await store.get_config(session_id)  # SessionNotFound as the resume would
    if config.get(TENANT_FIELD, DEFAULT_TENANT) != tenant:
        raise InvalidResumeToken("the resume token does not match this session")


# Query parameters that carry secrets: uvicorn's access log writes every request's path
# with its query string, and a resume travels as ``?session_id=...&resume_token=...``.
_SECRET_QUERY = re.compile(r"((?:resume_token|api_key|key|token|client_secret)=)[^&\s\"']+",
                           re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the values of secret-bearing query parameters replaced."""
    return _SECRET_QUERY.sub(r"\1<redacted>", text)


class RedactSecrets(logging.Filter):
    """Rewrites a record's message arguments through ``redact`` (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def redact_server_logs() -> None:
    """Install ``RedactSecrets`` on uvicorn's loggers (once). Filters on a logger survive
    the ``dictConfig`` uvicorn runs when it starts."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
