"""What stock openai SDK clients put on the wire parses, and what we send parses in them.

The SDK's connection objects are driven with a fake socket that records frames, so the
frames are exactly those a GA (``client.realtime.connect``) or beta
(``client.beta.realtime.connect``) client sends, with no network involved.
"""

from __future__ import annotations

import json
from typing import Any

from openai.resources.beta.realtime.realtime import RealtimeConnection as BetaConnection
from openai.resources.realtime.realtime import RealtimeConnection as GaConnection

from orchestrator.protocol import (
    SERVER_EVENT_TYPES,
    AudioPCMA,
    AudioPCMU,
    ConversationItemCreateEvent,
    ConversationItemTruncateEvent,
    EventEncoder,
    InputAudioBufferAppendEvent,
    ResponseCreateEvent,
    SessionUpdateEvent,
    parse_client_event,
)
from tests.orchestrator.protocol.samples import SERVER_SAMPLES


class _Recorder:
    def __init__(self) -> None:
        self.frames: list[str] = []

    def send(self, data: str, *args: Any, **kwargs: Any) -> None:
        self.frames.append(data)


def test_ga_sdk_client_frames_parse() -> None:
    sock = _Recorder()
    conn = GaConnection(sock)  # type: ignore[arg-type]
    conn.session.update(
        session={
            "type": "realtime",
            "instructions": "Be brief.",
            "output_modalities": ["audio"],
            "audio": {
                "input": {"format": {"type": "audio/pcmu"}, "turn_detection": None},
                "output": {"voice": "marin", "format": {"type": "audio/pcm", "rate": 24000}},
            },
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": "auto",
        }
    )
    conn.input_audio_buffer.append(audio="AAAA")
    conn.input_audio_buffer.commit()
    conn.input_audio_buffer.clear()
    conn.conversation.item.create(
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hey"}]}
    )
    conn.conversation.item.retrieve(item_id="item_1")
    conn.conversation.item.truncate(item_id="item_1", content_index=0, audio_end_ms=640)
    conn.conversation.item.delete(item_id="item_1")
    conn.response.create(response={"output_modalities": ["text"], "conversation": "none"})
    conn.response.cancel(response_id="resp_1")
    conn.output_audio_buffer.clear()

    events = [parse_client_event(f) for f in sock.frames]
    assert [e.type for e in events] == [json.loads(f)["type"] for f in sock.frames]
    assert len(events) == 11
    update = events[0]
    assert isinstance(update, SessionUpdateEvent)
    assert update.session.audio is not None and update.session.audio.input is not None
    assert update.session.audio.input.format == AudioPCMU()
    assert update.session.audio.input.turn_detection is None
    assert "turn_detection" in update.session.audio.input.model_fields_set
    assert isinstance(events[3], InputAudioBufferAppendEvent) is False  # clear, not append
    assert isinstance(events[1], InputAudioBufferAppendEvent) and events[1].audio == "AAAA"
    assert isinstance(events[4], ConversationItemCreateEvent)
    truncate = events[6]
    assert isinstance(truncate, ConversationItemTruncateEvent) and truncate.audio_end_ms == 640
    create = events[8]
    assert isinstance(create, ResponseCreateEvent) and create.response is not None
    assert create.response.conversation == "none"


def test_beta_sdk_client_frames_parse() -> None:
    sock = _Recorder()
    conn = BetaConnection(sock)  # type: ignore[arg-type]
    conn.session.update(
        session={
            "modalities": ["text", "audio"],
            "input_audio_format": "g711_alaw",
            "output_audio_format": "g711_alaw",
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 350},
            "voice": "sage",
        }
    )
    conn.conversation.item.create(
        item={"type": "message", "role": "assistant", "content": [{"type": "text", "text": "ok"}]}
    )
    conn.response.create(response={"modalities": ["text"], "instructions": "x"})
    events = [parse_client_event(f) for f in sock.frames]
    update = events[0]
    assert isinstance(update, SessionUpdateEvent)
    audio = update.session.audio
    assert audio is not None and audio.input is not None and audio.output is not None
    assert audio.input.format == AudioPCMA() and audio.output.voice == "sage"
    assert update.session.output_modalities == ["audio"]
    create = events[2]
    assert isinstance(create, ResponseCreateEvent) and create.response is not None
    assert create.response.output_modalities == ["text"]


def test_sdk_clients_parse_our_server_events() -> None:
    ga = GaConnection(_Recorder())  # type: ignore[arg-type]
    beta = BetaConnection(_Recorder())  # type: ignore[arg-type]
    encoder = EventEncoder(beta=True)
    for cls in SERVER_EVENT_TYPES:
        event = SERVER_SAMPLES[cls]()
        parsed: Any = ga.parse_event(event.to_json())
        assert parsed.type == event.type
        assert parsed.event_id == event.event_id
        beta_text = encoder.encode(event)
        if beta_text is not None:
            parsed_beta: Any = beta.parse_event(beta_text)
            assert parsed_beta.type == json.loads(beta_text)["type"]
