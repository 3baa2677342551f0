"""Conversation items: messages (system / user / assistant), function calls and their
outputs, as sent in ``conversation.item.create`` and returned in server events.

One model per item kind, discriminated by ``type``. Beta clients name assistant content
parts ``text`` / ``audio``; they are normalized to the GA ``output_text`` / ``output_audio``
on parse, and a message's parts are checked against its role (a user cannot send
``output_audio``, a system message is text only). ``input_image`` is not accepted: the
cascade has no vision stage, so it is a clear error rather than a silently dropped part.

On the wire a content part carries the key its type is about even when it is ``null``,
as OpenAI sends it: ``{"type": "input_audio", "transcript": null}`` while a user's audio
is not transcribed yet, ``{"type": "input_text", "text": "..."}``. Other empty fields
(``audio`` when the audio is not echoed) are left out.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from orchestrator.protocol.base import CompactModel, WireModel

ItemStatus = Literal["completed", "incomplete", "in_progress"]
ContentType = Literal["input_text", "input_audio", "output_text", "output_audio"]
Role = Literal["system", "user", "assistant"]

_BETA_CONTENT = {"text": "output_text", "audio": "output_audio"}
_ALLOWED: dict[str, frozenset[str]] = {
    "system": frozenset({"input_text"}),
    "user": frozenset({"input_text", "input_audio"}),
    "assistant": frozenset({"output_text", "output_audio"}),
}


# The field each content type is about: always serialized, as null when unknown.
_PAYLOAD: dict[str, str] = {
    "input_text": "text",
    "output_text": "text",
    "input_audio": "transcript",
    "output_audio": "transcript",
    # response.content_part.* name the assistant's parts "text" / "audio"
    "text": "text",
    "audio": "transcript",
}


def keep_payload(data: dict[str, Any], part_type: str) -> dict[str, Any]:
    """A dumped part without its ``None`` fields, except the one its type is about."""
    keep = _PAYLOAD.get(part_type)
    return {k: v for k, v in data.items() if v is not None or k == keep}


class ContentPart(WireModel):
    """One part of a message. ``audio`` is base64 in the item's audio format;
    ``transcript`` accompanies audio parts."""

    type: ContentType
    text: str | None = None
    audio: str | None = None
    transcript: str | None = None

    @model_serializer(mode="wrap")
    def _wire_shape(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if not isinstance(data, dict):
            return data
        return keep_payload(data, self.type)

    @model_validator(mode="before")
    @classmethod
    def _beta_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("type"), str) \
                and data["type"] in _BETA_CONTENT:
            return {**data, "type": _BETA_CONTENT[data["type"]]}
        return data


class MessageItem(CompactModel):
    type: Literal["message"] = "message"
    role: Role
    content: list[ContentPart]
    id: str | None = None
    object: Literal["realtime.item"] | None = None
    status: ItemStatus | None = None

    @model_validator(mode="after")
    def _content_matches_role(self) -> MessageItem:
        allowed = _ALLOWED[self.role]
        for part in self.content:
            if part.type not in allowed:
                raise PydanticCustomError(
                    "content_for_role",
                    "content type {part} is not allowed in a {role} message (allowed: {allowed})",
                    {
                        "part": repr(part.type),
                        "role": self.role,
                        "allowed": ", ".join(sorted(allowed)),
                        "field": "content",
                    },
                )
        return self

    def text(self) -> str:
        """The message's text: text parts and audio transcripts, in order."""
        return "".join(p.text or p.transcript or "" for p in self.content)


class FunctionCallItem(CompactModel):
    type: Literal["function_call"] = "function_call"
    name: str
    arguments: str
    call_id: str | None = None
    id: str | None = None
    object: Literal["realtime.item"] | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(CompactModel):
    type: Literal["function_call_output"] = "function_call_output"
    call_id: str
    output: str
    id: str | None = None
    object: Literal["realtime.item"] | None = None
    status: ItemStatus | None = None


ConversationItem = Annotated[
    MessageItem | FunctionCallItem | FunctionCallOutputItem, Field(discriminator="type")
]
