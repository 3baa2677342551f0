"""The store interface every backend implements, and the snapshot a resume returns.

Items are plain JSON objects (``dict[str, Any]`` with a string ``id``): the store is
generic and knows nothing of the Realtime protocol models, which reach it as dicts or
pydantic models and come back as dicts. Positions are 0-based indexes in the
conversation order.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from pydantic import BaseModel, Field

from orchestrator.store.codec import JsonObject


class NewSession(NamedTuple):
    session_id: str
    # Given to the client once; only its SHA-256 is stored.
    resume_token: str


class SessionSnapshot(BaseModel):
    """Everything a resuming connection needs to continue the conversation."""

    session_id: str
    config: dict[str, Any]
    items: list[dict[str, Any]] = Field(default_factory=list)
    turn_state: dict[str, Any] | None = None


class SessionStore(Protocol):
    async def create_session(self, config: JsonObject, *,
                             owner: str | None = None) -> NewSession:
        """New session with ``config``; with ``owner`` its lease is taken at once."""
        ...

    async def resume(self, session_id: str, token: str, *, owner: str | None = None,
                     takeover: bool = False) -> SessionSnapshot:
        """Check the token and return the session's state, refreshing its TTL.

        Raises ``SessionNotFound``, ``InvalidResumeToken``, or ``SessionBusy`` when another
        owner holds a live lease (unless ``takeover``). With ``owner`` the lease is taken
        in the same atomic step, so two racing resumes cannot both win."""
        ...

    async def get_config(self, session_id: str) -> dict[str, Any]: ...

    # Every write takes ``owner``, the fence: with an owner the write applies only while
    # that owner holds the session's live lease, atomically with the check; otherwise it
    # raises ``LeaseLost`` and nothing changes (not even the TTL). ``owner=None`` writes
    # unfenced (tests, tools). The session must exist first (``SessionNotFound``); the
    # fence comes before every other check on the stored state (item exists, limits).

    async def update_config(self, session_id: str, config: JsonObject, *,
                            owner: str | None = None) -> None: ...

    async def append_item(self, session_id: str, item: JsonObject,
                          previous_item_id: str | None = None, *,
                          owner: str | None = None) -> int:
        """Insert after ``previous_item_id`` (``ROOT``: first; None: last); its position."""
        ...

    async def update_item(self, session_id: str, item_id: str, item: JsonObject, *,
                          owner: str | None = None) -> None: ...

    async def delete_item(self, session_id: str, item_id: str, *,
                          owner: str | None = None) -> None: ...

    async def get_item(self, session_id: str, item_id: str) -> dict[str, Any]: ...

    async def list_items(self, session_id: str) -> list[dict[str, Any]]: ...

    async def set_turn_state(self, session_id: str, state: JsonObject, *,
                             owner: str | None = None) -> None: ...

    async def get_turn_state(self, session_id: str) -> dict[str, Any] | None: ...

    async def touch(self, session_id: str, *, owner: str | None = None) -> None: ...

    async def delete_session(self, session_id: str, *, owner: str | None = None) -> bool:
        """Remove the session and all its keys; False if it did not exist."""
        ...

    async def acquire_lease(self, session_id: str, owner: str, *,
                            takeover: bool = False) -> None:
        """Take (or extend, if already ours) the lease; ``SessionBusy`` if another live
        owner holds it and not ``takeover``."""
        ...

    async def renew_lease(self, session_id: str, owner: str) -> None:
        """Extend our lease and the session's TTL; ``LeaseLost`` if it is no longer ours
        (expired, or taken over)."""
        ...

    async def release_lease(self, session_id: str, owner: str) -> None:
        """Drop the lease if we hold it; a no-op otherwise."""
        ...

    async def lease_owner(self, session_id: str) -> str | None: ...

    # Client secrets (ephemeral ``ek_`` keys, see orchestrator/keys.py): small JSON
    # records under an id, each with its own expiry, shared by every process using the
    # store. The id is a digest of the key (never the key itself), so a dump of the store
    # holds nothing a client could present.

    async def put_client_secret(self, key_id: str, record: JsonObject, ttl_s: float) -> None:
        """Store ``record`` under ``key_id`` for ``ttl_s`` seconds (replacing any record
        of that id). ``ValueError`` for a malformed id or a non-positive TTL,
        ``StoreLimitError`` when the record or the number of live secrets is over its
        bound."""
        ...

    async def get_client_secret(self, key_id: str) -> dict[str, Any] | None:
        """The live record stored under ``key_id``; None when unknown, expired or
        malformed."""
        ...

    async def aclose(self) -> None: ...
