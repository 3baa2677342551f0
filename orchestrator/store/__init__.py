"""Session store: conversation items, session config and turn state, memory or Redis.

A session is created with a config and answers a (session id, resume token) pair; a
client that reconnects with both continues the same conversation on any orchestrator
process sharing the store. A connection holds the session through a renewed lease so
two live connections never drive one conversation (``takeover`` overrides).
"""

from orchestrator.store.codec import ROOT
from orchestrator.store.errors import (
    InvalidItem,
    InvalidResumeToken,
    ItemExists,
    ItemNotFound,
    LeaseLost,
    SessionBusy,
    SessionNotFound,
    StoreClosed,
    StoreError,
    StoreLimitError,
    StoreUnavailable,
)
from orchestrator.store.factory import open_store
from orchestrator.store.interface import NewSession, SessionSnapshot, SessionStore
from orchestrator.store.lease import LeaseKeeper
from orchestrator.store.memory import MemoryStore
from orchestrator.store.settings import StoreSettings

__all__ = [
    "ROOT",
    "InvalidItem",
    "InvalidResumeToken",
    "ItemExists",
    "ItemNotFound",
    "LeaseKeeper",
    "LeaseLost",
    "MemoryStore",
    "NewSession",
    "SessionBusy",
    "SessionNotFound",
    "SessionSnapshot",
    "SessionStore",
    "StoreClosed",
    "StoreError",
    "StoreLimitError",
    "StoreSettings",
    "StoreUnavailable",
    "open_store",
]
