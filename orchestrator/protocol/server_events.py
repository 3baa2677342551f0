"""Server events (server -> client), GA names, one model per event type.

Every event gets a fresh ``event_id`` when constructed. Serialize with ``event.to_json()``
(or ``orchestrator.protocol.beta.EventEncoder`` for a session that connected in beta
mode, which renames and reshapes events for beta clients).

GA announces a new conversation item with ``conversation.item.added`` (when it enters
the conversation) and ``conversation.item.done`` (when its content is final); beta sent a
single ``conversation.item.created``. The GA SDK still accepts ``conversation.item.created``,
so the model exists, but a GA session emits added/done; the beta encoder turns ``added``
into ``created`` and drops ``done``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from orchestrator.protocol.base import CompactModel, WireModel, new_event_id, wire_context
from orchestrator.protocol.items import ConversationItem, keep_payload
from orchestrator.protocol.response import Response
from orchestrator.protocol.session import Session


class ServerEventBase(WireModel):
    type: str
    event_id: str = Field(default_factory=new_event_id)

    def to_json(self) -> str:
        """The GA wire form (``EventEncoder`` for a session's own dialect)."""
        return self.model_dump_json(context=wire_context("ga"))


# --- session -----------------------------------------------------------------------------


class SessionCreatedEvent(ServerEventBase):
    type: Literal["session.created"] = "session.created"
    session: Session


class SessionUpdatedEvent(ServerEventBase):
    type: Literal["session.updated"] = "session.updated"
    session: Session


# --- input audio buffer ----------------------------------------------------------------


class InputAudioBufferSpeechStartedEvent(ServerEventBase):
    type: Literal["input_audio_buffer.speech_started"] = "input_audio_buffer.speech_started"
    audio_start_ms: int
    item_id: str


class InputAudioBufferSpeechStoppedEvent(ServerEventBase):
    type: Literal["input_audio_buffer.speech_stopped"] = "input_audio_buffer.speech_stopped"
    audio_end_ms: int
    item_id: str


class InputAudioBufferCommittedEvent(ServerEventBase):
    type: Literal["input_audio_buffer.committed"] = "input_audio_buffer.committed"
    previous_item_id: str | None = None
    item_id: str


class InputAudioBufferClearedEvent(ServerEventBase):
    type: Literal["input_audio_buffer.cleared"] = "input_audio_buffer.cleared"


class InputAudioBufferTimeoutTriggeredEvent(ServerEventBase):
    type: Literal["input_audio_buffer.timeout_triggered"] = "input_audio_buffer.timeout_triggered"
    audio_start_ms: int
    audio_end_ms: int
    item_id: str


# --- conversation ------------------------------------------------------------------------


class ConversationItemAddedEvent(ServerEventBase):
    type: Literal["conversation.item.added"] = "conversation.item.added"
    previous_item_id: str | None = None
    item: ConversationItem


class ConversationItemDoneEvent(ServerEventBase):
    type: Literal["conversation.item.done"] = "conversation.item.done"
    previous_item_id: str | None = None
    item: ConversationItem


class ConversationItemCreatedEvent(ServerEventBase):
    type: Literal["conversation.item.created"] = "conversation.item.created"
    previous_item_id: str | None = None
    item: ConversationItem


class ConversationItemDeletedEvent(ServerEventBase):
    type: Literal["conversation.item.deleted"] = "conversation.item.deleted"
    item_id: str


class ConversationItemRetrievedEvent(ServerEventBase):
    type: Literal["conversation.item.retrieved"] = "conversation.item.retrieved"
    item: ConversationItem


class ConversationItemTruncatedEvent(ServerEventBase):
    type: Literal["conversation.item.truncated"] = "conversation.item.truncated"
    item_id: str
    content_index: int
    audio_end_ms: int


class TranscriptionDurationUsage(CompactModel):
    type: Literal["duration"] = "duration"
    seconds: float


class TranscriptionTokenUsage(CompactModel):
    type: Literal["tokens"] = "tokens"
    input_tokens: int
    output_tokens: int
    total_tokens: int


class InputAudioTranscriptionDeltaEvent(ServerEventBase):
    type: Literal["conversation.item.input_audio_transcription.delta"] = (
        "conversation.item.input_audio_transcription.delta"
    )
    item_id: str
    content_index: int = 0
    delta: str


class InputAudioTranscriptionCompletedEvent(ServerEventBase):
    type: Literal["conversation.item.input_audio_transcription.completed"] = (
        "conversation.item.input_audio_transcription.completed"
    )
    item_id: str
    content_index: int = 0
    transcript: str
    usage: TranscriptionDurationUsage | TranscriptionTokenUsage


class TranscriptionError(CompactModel):
    type: str | None = None
    code: str | None = None
    message: str | None = None
    param: str | None = None


class InputAudioTranscriptionFailedEvent(ServerEventBase):
    type: Literal["conversation.item.input_audio_transcription.failed"] = (
        "conversation.item.input_audio_transcription.failed"
    )
    item_id: str
    content_index: int = 0
    error: TranscriptionError


# --- response lifecycle ------------------------------------------------------------------


class ResponseCreatedEvent(ServerEventBase):
    type: Literal["response.created"] = "response.created"
    response: Response


class ResponseDoneEvent(ServerEventBase):
    type: Literal["response.done"] = "response.done"
    response: Response


class ResponseOutputItemAddedEvent(ServerEventBase):
    type: Literal["response.output_item.added"] = "response.output_item.added"
    response_id: str
    output_index: int
    item: ConversationItem


class ResponseOutputItemDoneEvent(ServerEventBase):
    type: Literal["response.output_item.done"] = "response.output_item.done"
    response_id: str
    output_index: int
    item: ConversationItem


class Part(WireModel):
    """A content part as announced in ``response.content_part.*`` (the SDK names them
    ``text`` / ``audio`` here, unlike item content). Like item content, it always carries
    the key its type is about (``transcript`` for audio, ``text`` for text)."""

    type: Literal["text", "audio"]
    text: str | None = None
    audio: str | None = None
    transcript: str | None = None

    @model_serializer(mode="wrap")
    def _wire_shape(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        return keep_payload(data, self.type) if isinstance(data, dict) else data


class ResponseContentPartAddedEvent(ServerEventBase):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    part: Part


class ResponseContentPartDoneEvent(ServerEventBase):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    part: Part


# --- response content streams ------------------------------------------------------------


class _ContentEvent(ServerEventBase):
    response_id: str
    item_id: str
    output_index: int
    content_index: int


class ResponseOutputAudioDeltaEvent(_ContentEvent):
    """``delta`` is base64 audio in the session's output format."""

    type: Literal["response.output_audio.delta"] = "response.output_audio.delta"
    delta: str


class ResponseOutputAudioDoneEvent(_ContentEvent):
    type: Literal["response.output_audio.done"] = "response.output_audio.done"


class ResponseOutputAudioTranscriptDeltaEvent(_ContentEvent):
    type: Literal["response.output_audio_transcript.delta"] = (
        "response.output_audio_transcript.delta"
    )
    delta: str


class ResponseOutputAudioTranscriptDoneEvent(_ContentEvent):
    type: Literal["response.output_audio_transcript.done"] = "response.output_audio_transcript.done"
    transcript: str


class ResponseOutputTextDeltaEvent(_ContentEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str


class ResponseOutputTextDoneEvent(_ContentEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str


class ResponseFunctionCallArgumentsDeltaEvent(ServerEventBase):
    type: Literal["response.function_call_arguments.delta"] = (
        "response.function_call_arguments.delta"
    )
    response_id: str
    item_id: str
    output_index: int
    call_id: str
    delta: str


class ResponseFunctionCallArgumentsDoneEvent(ServerEventBase):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    response_id: str
    item_id: str
    output_index: int
    call_id: str
    name: str
    arguments: str


# --- output audio buffer (WebRTC) ----------------------------------------------------------


class OutputAudioBufferStartedEvent(ServerEventBase):
    type: Literal["output_audio_buffer.started"] = "output_audio_buffer.started"
    response_id: str


class OutputAudioBufferStoppedEvent(ServerEventBase):
    type: Literal["output_audio_buffer.stopped"] = "output_audio_buffer.stopped"
    response_id: str


class OutputAudioBufferClearedEvent(ServerEventBase):
    type: Literal["output_audio_buffer.cleared"] = "output_audio_buffer.cleared"
    response_id: str


# --- misc --------------------------------------------------------------------------------


class RateLimit(CompactModel):
    name: Literal["requests", "tokens"]
    limit: int
    remaining: int
    reset_seconds: float


class RateLimitsUpdatedEvent(ServerEventBase):
    type: Literal["rate_limits.updated"] = "rate_limits.updated"
    rate_limits: list[RateLimit]


class ErrorDetail(WireModel):
    type: str
    code: str | None = None
    message: str
    param: str | None = None
    event_id: str | None = None


class ErrorEvent(ServerEventBase):
    type: Literal["error"] = "error"
    error: ErrorDetail


# --- cascade's extensions (never sent unless the session asks) ---------------------------


class CascadeTurnTimingsEvent(ServerEventBase):
    """The server's own stage timings for one voice turn, ms from the moment the last
    voiced sample arrived; sent after ``response.done`` to sessions that set
    ``session.cascade.timings`` (``cascade bench`` does)."""

    type: Literal["cascade.turn.timings"] = "cascade.turn.timings"
    response_id: str
    pipeline: str
    speculative_hit: bool | None = None
    status: str
    # Speculative replies started during the user's turn (the kept one included), and the
    # LLM tokens / synthesized audio of those thrown away.
    speculations: int = 0
    wasted_llm_tokens: int = 0
    wasted_tts_ms: float = 0.0
    # Why the user's turn ended: "silence", "semantic" (semantic_vad's end-of-turn model,
    # with its probability), "max_turn"; None for a turn the client committed.
    endpoint_reason: str | None = None
    turn_probability: float | None = None
    endpoint_ms: float | None = None
    first_transcript_delta_ms: float | None = None
    final_transcript_ms: float | None = None
    reply_started_ms: float | None = None  # the kept reply's LLM request began
    llm_first_token_ms: float | None = None
    first_audio_ms: float | None = None


SERVER_EVENT_TYPES: tuple[type[ServerEventBase], ...] = (
    SessionCreatedEvent,
    SessionUpdatedEvent,
    InputAudioBufferSpeechStartedEvent,
    InputAudioBufferSpeechStoppedEvent,
    InputAudioBufferCommittedEvent,
    InputAudioBufferClearedEvent,
    InputAudioBufferTimeoutTriggeredEvent,
    ConversationItemAddedEvent,
    ConversationItemDoneEvent,
    ConversationItemCreatedEvent,
    ConversationItemDeletedEvent,
    ConversationItemRetrievedEvent,
    ConversationItemTruncatedEvent,
    InputAudioTranscriptionDeltaEvent,
    InputAudioTranscriptionCompletedEvent,
    InputAudioTranscriptionFailedEvent,
    ResponseCreatedEvent,
    ResponseDoneEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseOutputAudioDeltaEvent,
    ResponseOutputAudioDoneEvent,
    ResponseOutputAudioTranscriptDeltaEvent,
    ResponseOutputAudioTranscriptDoneEvent,
    ResponseOutputTextDeltaEvent,
    ResponseOutputTextDoneEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    OutputAudioBufferStartedEvent,
    OutputAudioBufferStoppedEvent,
    OutputAudioBufferClearedEvent,
    RateLimitsUpdatedEvent,
    ErrorEvent,
)
