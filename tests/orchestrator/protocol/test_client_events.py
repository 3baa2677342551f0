"""Client events: documented GA examples and beta shapes parse into the right models, and
every GA example is also accepted by the openai SDK's client event union (so the examples
are real, not invented)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.beta.realtime.realtime_client_event import (
    RealtimeClientEvent as BetaClientEvent,
)
from openai.types.realtime.realtime_client_event import RealtimeClientEvent as GaClientEvent
from pydantic import TypeAdapter

from orchestrator.protocol import (
    AudioPCM,
    AudioPCMA,
    AudioPCMU,
    ConversationItemCreateEvent,
    ConversationItemDeleteEvent,
    ConversationItemRetrieveEvent,
    ConversationItemTruncateEvent,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputAudioBufferAppendEvent,
    InputAudioBufferClearEvent,
    InputAudioBufferCommitEvent,
    MessageItem,
    OutputAudioBufferClearEvent,
    ResponseCancelEvent,
    ResponseCreateEvent,
    SemanticVad,
    ServerVad,
    SessionUpdateEvent,
    parse_client_event,
)

GA_ORACLE: TypeAdapter[Any] = TypeAdapter(GaClientEvent)
BETA_ORACLE: TypeAdapter[Any] = TypeAdapter(BetaClientEvent)

GA_EXAMPLES: list[tuple[dict[str, Any], type]] = [
    (
        {
            "type": "session.update",
            "event_id": "evt_1",
            "session": {
                "type": "realtime",
                "instructions": "You are a helpful assistant.",
                "output_modalities": ["audio"],
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "transcription": {"model": "whisper-1", "language": "en"},
                        "noise_reduction": {"type": "near_field"},
                        "turn_detection": {
                            "type": "server_vad",
                            "threshold": 0.6,
                            "prefix_padding_ms": 200,
                            "silence_duration_ms": 400,
                            "create_response": True,
                            "interrupt_response": False,
                            "idle_timeout_ms": 6000,
                        },
                    },
                    "output": {"format": {"type": "audio/pcmu"}, "voice": "marin", "speed": 1.1},
                },
                "tools": [
                    {
                        "type": "function",
                        "name": "get_weather",
                        "description": "Weather for a city",
                        "parameters": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}},
                            "required": ["city"],
                        },
                    }
                ],
                "tool_choice": "auto",
                "max_output_tokens": "inf",
                "tracing": "auto",
            },
        },
        SessionUpdateEvent,
    ),
    (
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {
                    "input": {"turn_detection": {"type": "semantic_vad", "eagerness": "low"}}
                },
                "tool_choice": {"type": "function", "name": "get_weather"},
                "max_output_tokens": 512,
            },
        },
        SessionUpdateEvent,
    ),
    (
        {
            "type": "session.update",
            "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}},
        },
        SessionUpdateEvent,
    ),
    (
        {"type": "input_audio_buffer.append", "event_id": "e2", "audio": "AAABAAIA"},
        InputAudioBufferAppendEvent,
    ),
    ({"type": "input_audio_buffer.commit"}, InputAudioBufferCommitEvent),
    ({"type": "input_audio_buffer.clear", "event_id": "e3"}, InputAudioBufferClearEvent),
    (
        {
            "type": "conversation.item.create",
            "previous_item_id": None,
            "item": {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "hello"},
                    {"type": "input_audio", "audio": "AAAA", "transcript": "hi"},
                ],
            },
        },
        ConversationItemCreateEvent,
    ),
    (
        {
            "type": "conversation.item.create",
            "previous_item_id": "root",
            "item": {
                "type": "message",
                "role": "system",
                "content": [{"type": "input_text", "text": "Be brief."}],
            },
        },
        ConversationItemCreateEvent,
    ),
    (
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": "Sure."},
                    {"type": "output_audio", "transcript": "Sure."},
                ],
            },
        },
        ConversationItemCreateEvent,
    ),
    (
        {
            "type": "conversation.item.create",
            "item": {
                "type": "function_call",
                "name": "get_weather",
                "call_id": "c1",
                "arguments": "{}",
            },
        },
        ConversationItemCreateEvent,
    ),
    (
        {
            "type": "conversation.item.create",
            "item": {"type": "function_call_output", "call_id": "c1", "output": '{"temp": 21}'},
        },
        ConversationItemCreateEvent,
    ),
    ({"type": "conversation.item.delete", "item_id": "item_1"}, ConversationItemDeleteEvent),
    ({"type": "conversation.item.retrieve", "item_id": "item_1"}, ConversationItemRetrieveEvent),
    (
        {
            "type": "conversation.item.truncate",
            "item_id": "item_1",
            "content_index": 0,
            "audio_end_ms": 1500,
        },
        ConversationItemTruncateEvent,
    ),
    ({"type": "response.create"}, ResponseCreateEvent),
    (
        {
            "type": "response.create",
            "response": {
                "instructions": "Answer in one sentence.",
                "output_modalities": ["text"],
                "conversation": "none",
                "metadata": {"topic": "weather"},
                "max_output_tokens": 100,
                "tool_choice": "none",
                "input": [
                    {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "hi"}],
                    }
                ],
                "audio": {"output": {"format": {"type": "audio/pcma"}, "voice": "alloy"}},
            },
        },
        ResponseCreateEvent,
    ),
    ({"type": "response.cancel"}, ResponseCancelEvent),
    ({"type": "response.cancel", "response_id": "resp_1"}, ResponseCancelEvent),
    ({"type": "output_audio_buffer.clear", "event_id": "e9"}, OutputAudioBufferClearEvent),
]


@pytest.mark.parametrize(
    "example,cls", GA_EXAMPLES, ids=[f"{e['type']}-{i}" for i, (e, _) in enumerate(GA_EXAMPLES)]
)
def test_ga_examples_parse(example: dict[str, Any], cls: type) -> None:
    GA_ORACLE.validate_python(example)  # the example is valid for the SDK itself
    for data in (json.dumps(example), json.dumps(example).encode()):
        event = parse_client_event(data)
        assert type(event) is cls
        assert event.event_id == example.get("event_id")


def test_session_update_fields() -> None:
    ev = parse_client_event(json.dumps(GA_EXAMPLES[0][0]))
    assert isinstance(ev, SessionUpdateEvent)
    s = ev.session
    assert s.instructions == "You are a helpful assistant."
    assert s.audio is not None and s.audio.input is not None and s.audio.output is not None
    assert s.audio.input.format == AudioPCM()
    assert s.audio.output.format == AudioPCMU()
    td = s.audio.input.turn_detection
    assert isinstance(td, ServerVad)
    assert (td.threshold, td.prefix_padding_ms, td.silence_duration_ms) == (0.6, 200, 400)
    assert td.interrupt_response is False and td.idle_timeout_ms == 6000
    assert s.tools is not None and s.tools[0].name == "get_weather"
    assert s.tools[0].parameters is not None and s.tools[0].parameters["required"] == ["city"]
    assert s.max_output_tokens == "inf"


def test_explicit_null_turn_detection_is_kept_apart_from_absent() -> None:
    manual = parse_client_event(json.dumps(GA_EXAMPLES[2][0]))
    assert isinstance(manual, SessionUpdateEvent)
    assert manual.session.audio is not None and manual.session.audio.input is not None
    assert "turn_detection" in manual.session.audio.input.model_fields_set
    assert manual.session.audio.input.turn_detection is None
    semantic = parse_client_event(json.dumps(GA_EXAMPLES[1][0]))
    assert isinstance(semantic, SessionUpdateEvent)
    assert semantic.session.audio is not None and semantic.session.audio.input is not None
    assert isinstance(semantic.session.audio.input.turn_detection, SemanticVad)
    assert "noise_reduction" not in semantic.session.audio.input.model_fields_set


def test_items_parse_to_their_kinds() -> None:
    kinds = []
    for example, _ in GA_EXAMPLES:
        if example["type"] == "conversation.item.create":
            ev = parse_client_event(json.dumps(example))
            assert isinstance(ev, ConversationItemCreateEvent)
            kinds.append(type(ev.item))
    assert kinds == [
        MessageItem,
        MessageItem,
        MessageItem,
        FunctionCallItem,
        FunctionCallOutputItem,
    ]
    user = parse_client_event(json.dumps(GA_EXAMPLES[6][0]))
    assert isinstance(user, ConversationItemCreateEvent) and isinstance(user.item, MessageItem)
    assert user.item.text() == "hellohi"


def test_response_create_config() -> None:
    ev = parse_client_event(json.dumps(GA_EXAMPLES[15][0]))
    assert isinstance(ev, ResponseCreateEvent) and ev.response is not None
    r = ev.response
    assert r.conversation == "none" and r.output_modalities == ["text"]
    assert r.input is not None and isinstance(r.input[0], MessageItem)
    assert r.audio is not None and r.audio.output is not None
    assert r.audio.output.format == AudioPCMA() and r.audio.output.voice == "alloy"


# --- beta shapes ---------------------------------------------------------------------------

BETA_SESSION = {
    "type": "session.update",
    "session": {
        "modalities": ["text", "audio"],
        "instructions": "Be nice.",
        "voice": "verse",
        "input_audio_format": "g711_ulaw",
        "output_audio_format": "g711_alaw",
        "input_audio_transcription": {"model": "whisper-1"},
        "turn_detection": {"type": "server_vad", "threshold": 0.4, "silence_duration_ms": 300},
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        "tool_choice": "auto",
        "temperature": 0.7,
        "max_response_output_tokens": 200,
    },
}


def test_beta_session_update_is_normalized_to_ga() -> None:
    BETA_ORACLE.validate_python(BETA_SESSION)
    ev = parse_client_event(json.dumps(BETA_SESSION))
    assert isinstance(ev, SessionUpdateEvent)
    s = ev.session
    assert s.output_modalities == ["audio"]
    assert s.max_output_tokens == 200 and s.temperature == 0.7
    assert s.audio is not None and s.audio.input is not None and s.audio.output is not None
    assert s.audio.input.format == AudioPCMU()
    assert s.audio.output.format == AudioPCMA()
    assert s.audio.output.voice == "verse"
    assert s.audio.input.transcription is not None
    assert s.audio.input.transcription.model == "whisper-1"
    td = s.audio.input.turn_detection
    assert isinstance(td, ServerVad) and td.threshold == 0.4 and td.silence_duration_ms == 300


def test_beta_turn_detection_null_and_untyped() -> None:
    ev = parse_client_event(
        json.dumps({"type": "session.update", "session": {"turn_detection": None}})
    )
    assert isinstance(ev, SessionUpdateEvent)
    assert ev.session.audio is not None and ev.session.audio.input is not None
    assert "turn_detection" in ev.session.audio.input.model_fields_set
    assert ev.session.audio.input.turn_detection is None
    ev = parse_client_event(
        json.dumps({"type": "session.update", "session": {"turn_detection": {"threshold": 0.9}}})
    )
    assert isinstance(ev, SessionUpdateEvent)
    assert ev.session.audio is not None and ev.session.audio.input is not None
    assert isinstance(ev.session.audio.input.turn_detection, ServerVad)


def test_beta_assistant_content_names() -> None:
    example = {
        "type": "conversation.item.create",
        "item": {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": "Hi"}, {"type": "audio", "transcript": "Hi"}],
        },
    }
    BETA_ORACLE.validate_python(example)
    ev = parse_client_event(json.dumps(example))
    assert isinstance(ev, ConversationItemCreateEvent) and isinstance(ev.item, MessageItem)
    assert [p.type for p in ev.item.content] == ["output_text", "output_audio"]


def test_beta_response_create() -> None:
    example = {
        "type": "response.create",
        "response": {
            "modalities": ["text"],
            "instructions": "Short.",
            "voice": "ash",
            "output_audio_format": "pcm16",
            "max_response_output_tokens": "inf",
            "temperature": 0.6,
        },
    }
    BETA_ORACLE.validate_python(example)
    ev = parse_client_event(json.dumps(example))
    assert isinstance(ev, ResponseCreateEvent) and ev.response is not None
    r = ev.response
    assert r.output_modalities == ["text"] and r.max_output_tokens == "inf"
    assert r.temperature == 0.6
    assert r.audio is not None and r.audio.output is not None
    assert r.audio.output.voice == "ash" and r.audio.output.format == AudioPCM()


def test_cascade_extension_is_optional() -> None:
    ev = parse_client_event(
        json.dumps(
            {
                "type": "session.update",
                "session": {"type": "realtime", "cascade": {"pipeline": "serial"}},
            }
        )
    )
    assert isinstance(ev, SessionUpdateEvent)
    assert ev.session.cascade is not None and ev.session.cascade.pipeline == "serial"
    plain = parse_client_event(
        json.dumps({"type": "session.update", "session": {"type": "realtime"}})
    )
    assert isinstance(plain, SessionUpdateEvent) and plain.session.cascade is None
