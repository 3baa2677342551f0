"""Client events (client -> server), one model per event type, keyed by a ``Literal``.

The GA and beta APIs use the same client event names; the differences are in payload
shapes (session, response config, content part names), which the nested models
normalize. Every client event may carry a client-chosen ``event_id``, echoed back in
``error.event_id`` when the event fails.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from orchestrator.protocol.base import WireModel
from orchestrator.protocol.items import ConversationItem
from orchestrator.protocol.response import ResponseConfig
from orchestrator.protocol.session import SessionConfig


class ClientEventBase(WireModel):
    type: str
    event_id: str | None = None


class SessionUpdateEvent(ClientEventBase):
    type: Literal["session.update"] = "session.update"
    session: SessionConfig


class InputAudioBufferAppendEvent(ClientEventBase):
    """``audio`` is base64 in the session's input format; decoded by the session (see
    ``orchestrator.audio_codecs``) so that parsing stays cheap and copy-free."""

    type: Literal["input_audio_buffer.append"] = "input_audio_buffer.append"
    audio: str


class InputAudioBufferCommitEvent(ClientEventBase):
    type: Literal["input_audio_buffer.commit"] = "input_audio_buffer.commit"


class InputAudioBufferClearEvent(ClientEventBase):
    type: Literal["input_audio_buffer.clear"] = "input_audio_buffer.clear"


class ConversationItemCreateEvent(ClientEventBase):
    type: Literal["conversation.item.create"] = "conversation.item.create"
    previous_item_id: str | None = None
    item: ConversationItem


class ConversationItemDeleteEvent(ClientEventBase):
    type: Literal["conversation.item.delete"] = "conversation.item.delete"
    item_id: str


class ConversationItemRetrieveEvent(ClientEventBase):
    type: Literal["conversation.item.retrieve"] = "conversation.item.retrieve"
    item_id: str


class ConversationItemTruncateEvent(ClientEventBase):
    type: Literal["conversation.item.truncate"] = "conversation.item.truncate"
    item_id: str
    content_index: int = Field(ge=0)
    audio_end_ms: int = Field(ge=0)


class ResponseCreateEvent(ClientEventBase):
    type: Literal["response.create"] = "response.create"
    response: ResponseConfig | None = None


class ResponseCancelEvent(ClientEventBase):
    type: Literal["response.cancel"] = "response.cancel"
    response_id: str | None = None


class OutputAudioBufferClearEvent(ClientEventBase):
    type: Literal["output_audio_buffer.clear"] = "output_audio_buffer.clear"


ClientEvent = Annotated[
    SessionUpdateEvent
    | InputAudioBufferAppendEvent
    | InputAudioBufferCommitEvent
    | InputAudioBufferClearEvent
    | ConversationItemCreateEvent
    | ConversationItemDeleteEvent
    | ConversationItemRetrieveEvent
    | ConversationItemTruncateEvent
    | ResponseCreateEvent
    | ResponseCancelEvent
    | OutputAudioBufferClearEvent,
    Field(discriminator="type"),
]

CLIENT_EVENT_TYPES: tuple[type[ClientEventBase], ...] = (
    SessionUpdateEvent,
    InputAudioBufferAppendEvent,
    InputAudioBufferCommitEvent,
    InputAudioBufferClearEvent,
    ConversationItemCreateEvent,
    ConversationItemDeleteEvent,
    ConversationItemRetrieveEvent,
    ConversationItemTruncateEvent,
    ResponseCreateEvent,
    ResponseCancelEvent,
    OutputAudioBufferClearEvent,
)
