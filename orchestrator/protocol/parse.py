"""``parse_client_event``: one WebSocket text frame -> a typed client event.

The event class is picked from ``type`` by a dict lookup and validated directly, so
errors name the field path inside the event (not the union branch), and an unknown type
is reported as such rather than as a union mismatch. Oversized frames are refused before
JSON decoding (OpenAI limits an append to 15 MiB of audio).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from orchestrator.protocol.client_events import (
    CLIENT_EVENT_TYPES,
    ClientEvent,
    ClientEventBase,
)
from orchestrator.protocol.errors import ProtocolError, from_validation_error
from stages.common.jsontext import strict_loads

MAX_EVENT_BYTES = 16 * 1024 * 1024

_BY_TYPE: dict[str, type[ClientEventBase]] = {
    cls.model_fields["type"].default: cls for cls in CLIENT_EVENT_TYPES
}
_UNSUPPORTED = {
    "transcription_session.update": "transcription-only sessions are not supported",
}


def parse_client_event(data: str | bytes, max_bytes: int = MAX_EVENT_BYTES) -> ClientEvent:
    """Parse and validate one client event; raises ``ProtocolError`` on any bad input."""
    if len(data) > max_bytes:
        raise ProtocolError(
            "invalid_value", f"Event is too large ({len(data)} > {max_bytes} bytes)."
        )
    try:
        raw: Any = strict_loads(data)
    except ValueError as exc:  # also too-deep nesting and lone surrogates
        raise ProtocolError("invalid_json", f"The event is not valid JSON: {exc}.") from None
    if not isinstance(raw, dict):
        raise ProtocolError(
            "invalid_type", f"An event must be a JSON object, got {type(raw).__name__}."
        )
    event_id = raw.get("event_id") if isinstance(raw.get("event_id"), str) else None
    etype = raw.get("type")
    if etype is None:
        raise ProtocolError(
            "missing_required_parameter", "Missing required parameter: 'type'.", event_id, "type"
        )
    if not isinstance(etype, str):
        raise ProtocolError(
            "invalid_type", "Invalid type for 'type': expected a string.", event_id, "type"
        )
    cls = _BY_TYPE.get(etype)
    if cls is None:
        reason = _UNSUPPORTED.get(etype)
        detail = f" ({reason})" if reason else ""
        raise ProtocolError(
            "invalid_value",
            f"Invalid value: '{etype[:100]}'{detail}. Supported values are: "
            + ", ".join(f"'{t}'" for t in _BY_TYPE)
            + ".",
            event_id,
            "type",
        )
    try:
        event: ClientEvent = cls.model_validate(raw)  # type: ignore[assignment]
    except ValidationError as exc:
        raise from_validation_error(exc, raw, event_id) from None
    return event
