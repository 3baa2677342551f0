"""One realistic instance of every server event class, for conformance tests."""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.protocol import server_events as se
from orchestrator.protocol.items import (
    ContentPart,
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
)
from orchestrator.protocol.response import (
    InputTokenDetails,
    OutputTokenDetails,
    Response,
    StatusDetails,
    Usage,
)
from orchestrator.protocol.session import Session

R, ITEM = "resp_1", "item_1"


def user_item(transcript: str | None = "hello there") -> MessageItem:
    """A spoken user turn; ``transcript=None`` is how it is first announced."""
    return MessageItem(
        id="item_u",
        object="realtime.item",
        status="completed",
        role="user",
        content=[ContentPart(type="input_audio", transcript=transcript)],
    )


def typed_item() -> MessageItem:
    return MessageItem(
        id="item_t",
        object="realtime.item",
        status="completed",
        role="user",
        content=[ContentPart(type="input_text", text="What is the weather?")],
    )


def assistant_item() -> MessageItem:
    return MessageItem(
        id=ITEM,
        object="realtime.item",
        status="completed",
        role="assistant",
        content=[ContentPart(type="output_audio", transcript="Hi! How can I help?")],
    )


def call_item() -> FunctionCallItem:
    return FunctionCallItem(
        id="item_c",
        object="realtime.item",
        status="completed",
        name="get_weather",
        call_id="call_1",
        arguments='{"city": "Paris"}',
    )


def done_response() -> Response:
    return Response(
        id=R,
        status="cancelled",
        status_details=StatusDetails(type="cancelled", reason="turn_detected"),
        output=[assistant_item(), call_item()],
        conversation_id="conv_1",
        usage=Usage(
            total_tokens=30,
            input_tokens=20,
            output_tokens=10,
            input_token_details=InputTokenDetails(text_tokens=5, audio_tokens=15),
            output_token_details=OutputTokenDetails(text_tokens=4, audio_tokens=6),
        ),
        metadata={"topic": "weather"},
    )


def _content(cls: type[se._ContentEvent], **kw: str) -> Callable[[], se.ServerEventBase]:
    fields = {"response_id": R, "item_id": ITEM, "output_index": 0, "content_index": 0, **kw}
    return lambda: cls.model_validate(fields)


SERVER_SAMPLES: dict[type[se.ServerEventBase], Callable[[], se.ServerEventBase]] = {
    se.SessionCreatedEvent: lambda: se.SessionCreatedEvent(session=Session()),
    se.SessionUpdatedEvent: lambda: se.SessionUpdatedEvent(session=Session(instructions="x")),
    se.InputAudioBufferSpeechStartedEvent: lambda: se.InputAudioBufferSpeechStartedEvent(
        audio_start_ms=1000, item_id="item_u"
    ),
    se.InputAudioBufferSpeechStoppedEvent: lambda: se.InputAudioBufferSpeechStoppedEvent(
        audio_end_ms=2500, item_id="item_u"
    ),
    se.InputAudioBufferCommittedEvent: lambda: se.InputAudioBufferCommittedEvent(
        previous_item_id=None, item_id="item_u"
    ),
    se.InputAudioBufferClearedEvent: se.InputAudioBufferClearedEvent,
    se.InputAudioBufferTimeoutTriggeredEvent: lambda: se.InputAudioBufferTimeoutTriggeredEvent(
        audio_start_ms=0, audio_end_ms=5000, item_id="item_t"
    ),
    se.ConversationItemAddedEvent: lambda: se.ConversationItemAddedEvent(
        previous_item_id="item_0", item=user_item(transcript=None)
    ),
    se.ConversationItemDoneEvent: lambda: se.ConversationItemDoneEvent(
        previous_item_id="item_0", item=user_item()
    ),
    se.ConversationItemCreatedEvent: lambda: se.ConversationItemCreatedEvent(
        previous_item_id=None, item=FunctionCallOutputItem(call_id="call_1", output="{}", id="x")
    ),
    se.ConversationItemDeletedEvent: lambda: se.ConversationItemDeletedEvent(item_id="item_u"),
    se.ConversationItemRetrievedEvent: lambda: se.ConversationItemRetrievedEvent(
        item=typed_item()
    ),
    se.ConversationItemTruncatedEvent: lambda: se.ConversationItemTruncatedEvent(
        item_id=ITEM, content_index=0, audio_end_ms=1200
    ),
    se.InputAudioTranscriptionDeltaEvent: lambda: se.InputAudioTranscriptionDeltaEvent(
        item_id="item_u", delta="hel"
    ),
    se.InputAudioTranscriptionCompletedEvent: lambda: se.InputAudioTranscriptionCompletedEvent(
        item_id="item_u",
        transcript="hello there",
        usage=se.TranscriptionDurationUsage(seconds=1.5),
    ),
    se.InputAudioTranscriptionFailedEvent: lambda: se.InputAudioTranscriptionFailedEvent(
        item_id="item_u",
        error=se.TranscriptionError(type="server_error", code="asr_unavailable", message="x"),
    ),
    se.ResponseCreatedEvent: lambda: se.ResponseCreatedEvent(response=Response(id=R)),
    se.ResponseDoneEvent: lambda: se.ResponseDoneEvent(response=done_response()),
    se.ResponseOutputItemAddedEvent: lambda: se.ResponseOutputItemAddedEvent(
        response_id=R,
        output_index=0,
        item=MessageItem(
            id=ITEM, object="realtime.item", status="in_progress", role="assistant", content=[]
        ),
    ),
    se.ResponseOutputItemDoneEvent: lambda: se.ResponseOutputItemDoneEvent(
        response_id=R, output_index=0, item=assistant_item()
    ),
    se.ResponseContentPartAddedEvent: lambda: se.ResponseContentPartAddedEvent(
        response_id=R,
        item_id=ITEM,
        output_index=0,
        content_index=0,
        part=se.Part(type="audio", transcript=""),
    ),
    se.ResponseContentPartDoneEvent: lambda: se.ResponseContentPartDoneEvent(
        response_id=R,
        item_id=ITEM,
        output_index=0,
        content_index=0,
        part=se.Part(type="audio", transcript="Hi! How can I help?"),
    ),
    se.ResponseOutputAudioDeltaEvent: _content(se.ResponseOutputAudioDeltaEvent, delta="AAAA"),
    se.ResponseOutputAudioDoneEvent: _content(se.ResponseOutputAudioDoneEvent),
    se.ResponseOutputAudioTranscriptDeltaEvent: _content(
        se.ResponseOutputAudioTranscriptDeltaEvent, delta="Hi! "
    ),
    se.ResponseOutputAudioTranscriptDoneEvent: _content(
        se.ResponseOutputAudioTranscriptDoneEvent, transcript="Hi! How can I help?"
    ),
    se.ResponseOutputTextDeltaEvent: _content(se.ResponseOutputTextDeltaEvent, delta="Hi"),
    se.ResponseOutputTextDoneEvent: _content(se.ResponseOutputTextDoneEvent, text="Hi"),
    se.ResponseFunctionCallArgumentsDeltaEvent: lambda: se.ResponseFunctionCallArgumentsDeltaEvent(
        response_id=R, item_id="item_c", output_index=1, call_id="call_1", delta='{"ci'
    ),
    se.ResponseFunctionCallArgumentsDoneEvent: lambda: se.ResponseFunctionCallArgumentsDoneEvent(
        response_id=R,
        item_id="item_c",
        output_index=1,
        call_id="call_1",
        name="get_weather",
        arguments='{"city": "Paris"}',
    ),
    se.OutputAudioBufferStartedEvent: lambda: se.OutputAudioBufferStartedEvent(response_id=R),
    se.OutputAudioBufferStoppedEvent: lambda: se.OutputAudioBufferStoppedEvent(response_id=R),
    se.OutputAudioBufferClearedEvent: lambda: se.OutputAudioBufferClearedEvent(response_id=R),
    se.RateLimitsUpdatedEvent: lambda: se.RateLimitsUpdatedEvent(
        rate_limits=[
            se.RateLimit(name="requests", limit=1000, remaining=999, reset_seconds=60.0),
            se.RateLimit(name="tokens", limit=50000, remaining=49000, reset_seconds=1.5),
        ]
    ),
    se.ErrorEvent: lambda: se.ErrorEvent(
        error=se.ErrorDetail(
            type="invalid_request_error",
            code="invalid_value",
            message="bad",
            param="type",
            event_id="evt_client_1",
        )
    ),
}
