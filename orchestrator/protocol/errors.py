"""Protocol errors and their mapping to OpenAI-style ``error`` events.

Codes follow the OpenAI API's invalid-request vocabulary: ``invalid_json`` (not JSON),
``invalid_type`` (JSON that is not an object, or a field of the wrong type),
``missing_required_parameter``, ``unknown_parameter`` and ``invalid_value`` (including an
unknown event ``type``, as OpenAI reports it: ``param: "type"``). ``param`` is the dotted
path of the offending field as the client wrote it (``item.content[0].type``): pydantic's
location is followed through the client's own JSON, skipping union tags; validators that
judge one field of their object name it in the error context (``ctx["field"]``).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from orchestrator.protocol.server_events import ErrorDetail, ErrorEvent

INVALID_REQUEST = "invalid_request_error"


class ProtocolError(Exception):
    """A client event we cannot accept; the session answers with an ``error`` event and
    carries on."""

    def __init__(
        self,
        code: str,
        message: str,
        event_id: str | None = None,
        param: str | None = None,
        type: str = INVALID_REQUEST,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.event_id = event_id
        self.param = param
        self.type = type

    def __repr__(self) -> str:
        return f"ProtocolError(code={self.code!r}, param={self.param!r}, {self.message!r})"


def error_event(err: ProtocolError) -> ErrorEvent:
    return ErrorEvent(
        error=ErrorDetail(
            type=err.type,
            code=err.code,
            message=err.message,
            param=err.param,
            event_id=err.event_id,
        )
    )


_TYPE_ERRORS = frozenset(
    {
        "string_type",
        "int_type",
        "int_parsing",
        "int_from_float",
        "float_type",
        "float_parsing",
        "bool_type",
        "bool_parsing",
        "list_type",
        "dict_type",
        "model_type",
        "model_attributes_type",
        "none_required",
    }
)


def _param(loc: tuple[int | str, ...], data: Any, missing: bool) -> str:
    """Follow ``loc`` through the client's data; pydantic's union tags and branch names,
    which are not keys in the data, are skipped."""
    parts: list[str] = []
    node = data
    for i, key in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(key, int) and isinstance(node, list) and 0 <= key < len(node):
            parts.append(f"[{key}]")
            node = node[key]
        elif isinstance(key, str) and isinstance(node, dict) and key in node:
            parts.append(f".{key}" if parts else key)
            node = node[key]
        elif last and missing and isinstance(key, str):
            parts.append(f".{key}" if parts else key)
    return "".join(parts)


def from_validation_error(exc: ValidationError, data: Any, event_id: str | None) -> ProtocolError:
    """The first validation problem as a ``ProtocolError``."""
    err: ErrorDetails = exc.errors(include_url=False)[0]
    kind = err["type"]
    param = _param(tuple(err["loc"]), data, missing=kind == "missing") or None
    ctx = err.get("ctx") or {}
    field = ctx.get("field")
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # the tag field itself
        field = str(ctx.get("discriminator", "type")).strip("'")
    if isinstance(field, str):  # raised by a validator about one field of its object
        param = f"{param}.{field}" if param else field
    shown = param or "event"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "union_tag_not_found":
        kind = "missing"
    if kind == "missing":
        return ProtocolError(
            "missing_required_parameter",
            f"Missing required parameter: '{shown}'.",
            event_id,
            param,
        )
    if kind == "extra_forbidden":
        return ProtocolError("unknown_parameter", f"Unknown parameter: '{shown}'.", event_id, param)
    if kind in _TYPE_ERRORS:
        return ProtocolError("invalid_type", f"Invalid type for '{shown}': {msg}.", event_id, param)
    return ProtocolError("invalid_value", f"Invalid value for '{shown}': {msg}.", event_id, param)
