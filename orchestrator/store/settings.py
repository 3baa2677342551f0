"""Settings of the session store (env prefix ``CASCADE_STORE_``).

The backend follows ``redis_url``: unset means the embedded in-memory store, set means
Redis. Every size is bounded so one client cannot grow a session without limit; a write
beyond a bound is refused with ``StoreLimitError`` rather than silently evicting old
items, because a Realtime conversation is expected to keep every item it was given.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class StoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CASCADE_STORE_", extra="ignore")

    # redis://host:port/db; None selects the in-memory backend.
    redis_url: str | None = None
    # Namespace of every Redis key: "{prefix}:s:{session_id}:...".
    key_prefix: str = Field(default="cascade", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    # Idle lifetime of a session; every write, touch, resume and lease renewal refreshes it.
    session_ttl_s: float = Field(default=3600.0, gt=0)
    # Lifetime of a connection's lease; the holder renews it well before (see lease.py).
    lease_ttl_s: float = Field(default=15.0, gt=0)
    max_items: int = Field(default=1000, ge=1)
    max_item_bytes: int = Field(default=256 * 1024, ge=64)
    # All items of one session together (config and turn state have their own bounds).
    max_session_bytes: int = Field(default=32 * 1024 * 1024, ge=64)
    max_config_bytes: int = Field(default=256 * 1024, ge=64)
    max_turn_state_bytes: int = Field(default=64 * 1024, ge=64)
    # Memory backend only: live sessions held by this process.
    max_sessions: int = Field(default=10_000, ge=1)
    # Client secrets (ephemeral ``ek_`` keys, orchestrator/keys.py): the largest record
    # (its session config) and, memory backend only, how many live ones this process holds.
    max_client_secret_bytes: int = Field(default=256 * 1024, ge=64)
    max_client_secrets: int = Field(default=100_000, ge=1)
    # Redis: socket timeout for connect and each command.
    redis_timeout_s: float = Field(default=5.0, gt=0)
    # Redis: connections per orchestrator process (calls beyond wait for one).
    redis_max_connections: int = Field(default=32, ge=1)
