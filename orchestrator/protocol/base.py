"""Base classes for wire models and server-side id generation.

Client-event models forbid unknown fields (OpenAI answers an unknown parameter with an
error, and a typo silently ignored is worse than a clear error). Server-event models are
built by us, so forbidding extras there only catches our own mistakes.

``CompactModel`` drops ``None`` fields when serialized: content parts, tool definitions and
usage details are sparse and OpenAI omits what does not apply. Top-level events keep
explicit ``null`` (``previous_item_id: null``, ``turn_detection: null``) because there
``null`` carries meaning.

Ids are ``<prefix>_<random>``: unique across processes (orchestrator replicas share
sessions through the store), cheap enough to call for every audio delta.
"""

from __future__ import annotations

import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer


class WireModel(BaseModel):
    """A protocol object: unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")


class CompactModel(WireModel):
    """A protocol object serialized without its ``None`` fields."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


def new_id(prefix: str) -> str:
    """A fresh id such as ``event_3fZk1...`` (18 random bytes, URL-safe)."""
    return f"{prefix}_{secrets.token_urlsafe(12)}"


def new_event_id() -> str:
    return new_id("event")


def new_item_id() -> str:
    return new_id("item")


def new_response_id() -> str:
    return new_id("resp")


def new_session_id() -> str:
    return new_id("sess")
