"""Base classes for wire models and server-side id generation.

Client-event models forbid unknown fields (OpenAI answers an unknown parameter with an
error, and a typo silently ignored is worse than a clear error). Server-event models are
built by us, so forbidding extras there only catches our own mistakes.

``CompactModel`` drops ``None`` fields when serialized: tool definitions, usage details and
audio formats are sparse and OpenAI omits what does not apply. Everything else keeps
explicit ``null`` (``previous_item_id: null``, ``turn_detection: null``, a user audio part's
``transcript: null``), because OpenAI sends those keys as ``null`` and strict clients
require them; content parts choose per type (``items``).

A model serialized *for the wire* gets the dialect in the serialization context
(``wire_context``): a few internal fields that OpenAI's session object does not have
(``temperature`` in GA) are left out there, but kept when cascade stores the model.

Ids are ``<prefix>_<random>``: unique across processes (orchestrator replicas share
sessions through the store), cheap enough to call for every audio delta.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    model_serializer,
)
from pydantic_core import PydanticCustomError

Dialect = Literal["ga", "beta"]


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


def wire_context(dialect: Dialect) -> dict[str, Dialect]:
    """The serialization context of a model dumped for a client in ``dialect``."""
    return {"wire": dialect}


def wire_dialect(info: SerializationInfo) -> Dialect | None:
    """The dialect being serialized for (``None``: not for the wire, e.g. the store)."""
    context = info.context
    if isinstance(context, dict):
        dialect = context.get("wire")
        if dialect in ("ga", "beta"):
            return dialect  # type: ignore[no-any-return]
    return None


def nested_object(parent: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    """A copy of ``parent[key]`` for a ``before`` validator that reshapes a client's
    object: ``{}`` when absent or null; anything but an object is the client's error
    (``path`` names it), not a ``TypeError`` inside the validator."""
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PydanticCustomError("dict_type", "Input should be a valid dictionary",
                                  {"field": path})
    return dict(value)


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
