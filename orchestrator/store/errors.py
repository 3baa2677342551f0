"""Errors of the session store.

Each failure a caller must handle differently has its own class (a wrong token is not a
missing session, a busy session is not a wrong token), and each carries a short ``code``
so the transport can map it to a Realtime ``error`` event without string matching.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every store error."""

    code = "store_error"


class SessionNotFound(StoreError):
    """No such session: never created, deleted, expired, or a malformed id."""

    code = "session_not_found"


class InvalidResumeToken(StoreError):
    """The session exists but the resume token does not match it."""

    code = "invalid_resume_token"


class SessionBusy(StoreError):
    """Another live connection holds the session's lease."""

    code = "session_busy"


class LeaseLost(StoreError):
    """The caller no longer holds the lease it tries to renew, or to write under with
    ``owner=`` (expired, released or taken over); a refused write changed nothing."""

    code = "lease_lost"


class StoreLimitError(StoreError):
    """A bound was hit: too many items or sessions, or an item/config too large."""

    code = "store_limit"


class ItemNotFound(StoreError):
    """No item with that id in the session (also for an unknown ``previous_item_id``)."""

    code = "item_not_found"


class ItemExists(StoreError):
    """An item with that id is already in the session."""

    code = "item_exists"


class InvalidItem(StoreError, ValueError):
    """Not storable: not a JSON object, no string ``id``, or not JSON-serializable."""

    code = "invalid_item"


class StoreUnavailable(StoreError):
    """The backend cannot be reached (Redis down, connection dropped)."""

    code = "store_unavailable"


class StoreClosed(StoreUnavailable):
    """The store was closed with ``aclose()``; this instance takes no more calls."""

    code = "store_closed"
