"""GA -> beta naming and reshaping for sessions that connected in beta mode."""

from __future__ import annotations

import json

from orchestrator.protocol import EventEncoder, Session, beta_event_type
from orchestrator.protocol.server_events import (
    ConversationItemAddedEvent,
    ResponseOutputAudioDeltaEvent,
    SessionCreatedEvent,
)
from tests.orchestrator.protocol.samples import assistant_item, done_response


def test_type_mapping() -> None:
    assert beta_event_type("response.output_audio.delta") == "response.audio.delta"
    assert (
        beta_event_type("response.output_audio_transcript.done") == "response.audio_transcript.done"
    )
    assert beta_event_type("response.output_text.delta") == "response.text.delta"
    assert beta_event_type("conversation.item.added") == "conversation.item.created"
    assert beta_event_type("conversation.item.done") is None
    assert beta_event_type("response.done") == "response.done"


def test_ga_encoder_is_plain_json() -> None:
    ev = ResponseOutputAudioDeltaEvent(
        response_id="r", item_id="i", output_index=0, content_index=0, delta="AA"
    )
    assert EventEncoder().encode(ev) == ev.to_json()
    beta = json.loads(EventEncoder(beta=True).encode(ev) or "")
    assert beta["type"] == "response.audio.delta" and beta["delta"] == "AA"
    assert beta["event_id"] == ev.event_id


def test_beta_session_is_flat() -> None:
    s = json.loads(EventEncoder(beta=True).encode(SessionCreatedEvent(session=Session())) or "")[
        "session"
    ]
    assert "audio" not in s and "output_modalities" not in s
    assert s["input_audio_format"] == "pcm16" and s["output_audio_format"] == "pcm16"
    assert s["modalities"] == ["text", "audio"]
    assert s["turn_detection"]["type"] == "server_vad" and s["turn_detection"]["threshold"] == 0.5
    assert s["voice"] == "alloy" and s["max_response_output_tokens"] == "inf"


def test_beta_items_and_responses_use_beta_content_names() -> None:
    enc = EventEncoder(beta=True)
    added = json.loads(enc.encode(ConversationItemAddedEvent(item=assistant_item())) or "")
    assert added["type"] == "conversation.item.created"
    assert added["item"]["content"][0]["type"] == "audio"
    from orchestrator.protocol.server_events import ResponseDoneEvent

    done = json.loads(enc.encode(ResponseDoneEvent(response=done_response())) or "")
    assert done["response"]["output"][0]["content"][0]["type"] == "audio"
    assert done["response"]["modalities"] == ["text", "audio"]
    assert "output_modalities" not in done["response"]
