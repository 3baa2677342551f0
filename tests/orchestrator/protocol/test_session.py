"""Effective session defaults and partial updates."""

from __future__ import annotations

import json

from openai.types.realtime import SessionUpdatedEvent as SdkSessionUpdated

from orchestrator.protocol import (
    AudioPCM,
    AudioPCMU,
    SemanticVad,
    ServerVad,
    Session,
    SessionConfig,
    SessionUpdateEvent,
    apply_update,
    parse_client_event,
)
from orchestrator.protocol.server_events import SessionUpdatedEvent


def _update(session: dict[str, object]) -> SessionConfig:
    ev = parse_client_event(json.dumps({"type": "session.update", "session": session}))
    assert isinstance(ev, SessionUpdateEvent)
    return ev.session


def test_defaults() -> None:
    s = Session()
    assert s.id.startswith("sess_") and s.id != Session().id
    assert s.output_modalities == ["audio"]
    assert s.input_format == AudioPCM() and s.output_format == AudioPCM()
    assert s.voice == "alloy"
    td = s.turn_detection
    assert isinstance(td, ServerVad)
    assert (td.threshold, td.prefix_padding_ms, td.silence_duration_ms) == (0.5, 300, 500)
    assert td.create_response is True and td.interrupt_response is True
    assert s.max_output_tokens == "inf" and s.tool_choice == "auto" and s.tools == []
    assert s.cascade.pipeline == "streaming"


def test_partial_update_changes_only_what_is_present() -> None:
    s = Session(instructions="keep me")
    s2 = apply_update(
        s,
        _update(
            {
                "type": "realtime",
                "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 0.8}}},
            }
        ),
    )
    td = s2.turn_detection
    assert isinstance(td, ServerVad)
    assert td.threshold == 0.8 and td.silence_duration_ms == 500 and td.prefix_padding_ms == 300
    assert s2.instructions == "keep me" and s2.id == s.id
    assert s2.output_format == AudioPCM() and s2.voice == "alloy"
    assert s.turn_detection is not None and s.turn_detection.threshold == 0.5  # type: ignore[union-attr]


def test_null_turn_detection_means_manual_turns() -> None:
    s = apply_update(
        Session(), _update({"type": "realtime", "audio": {"input": {"turn_detection": None}}})
    )
    assert s.turn_detection is None
    assert s.input_format == AudioPCM()  # sibling fields untouched
    wire = json.loads(SessionUpdatedEvent(session=s).to_json())
    assert wire["session"]["audio"]["input"]["turn_detection"] is None
    SdkSessionUpdated.model_validate(wire)


def test_null_for_a_value_the_session_needs_counts_as_absent() -> None:
    # found by fuzzing: {"audio": null} left the session without audio (AttributeError
    # in apply_update, a server_error event; a 500 for a client secret)
    base = apply_update(Session(), _update({"instructions": "Be brief.", "tools": [
        {"type": "function", "name": "f"}]}))
    s = apply_update(base, _update({
        "audio": None, "instructions": None, "tools": None, "tool_choice": None,
        "temperature": None, "max_output_tokens": None, "truncation": None, "cascade": None,
        "output_modalities": None, "model": None}))
    assert s == base
    SdkSessionUpdated.model_validate(json.loads(SessionUpdatedEvent(session=s).to_json()))
    # where null means something, it still does
    assert apply_update(base, _update({"audio": {"input": {"turn_detection": None}}})
                        ).turn_detection is None


def test_switching_to_semantic_vad_gets_defaults() -> None:
    s = apply_update(
        Session(), _update({"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}})
    )
    td = s.turn_detection
    assert isinstance(td, SemanticVad)
    assert td.eagerness == "auto" and td.create_response is True


def test_beta_update_applies() -> None:
    s = apply_update(
        Session(),
        _update(
            {
                "modalities": ["text"],
                "input_audio_format": "g711_ulaw",
                "voice": "echo",
                "instructions": "",
            }
        ),
    )
    assert s.output_modalities == ["text"]
    assert s.input_format == AudioPCMU() and s.output_format == AudioPCM()
    assert s.voice == "echo" and s.instructions == ""


def test_cascade_pipeline_update_and_sdk_acceptance() -> None:
    s = apply_update(Session(), _update({"type": "realtime", "cascade": {"pipeline": "serial"}}))
    assert s.cascade.pipeline == "serial"
    wire = json.loads(SessionUpdatedEvent(session=s).to_json())
    sdk = SdkSessionUpdated.model_validate(wire)
    assert sdk.session.type == "realtime"
    assert wire["session"]["cascade"] == {"pipeline": "serial", "timings": False}
    s = apply_update(s, _update({"type": "realtime", "cascade": {"timings": True}}))
    assert s.cascade.timings and s.cascade.pipeline == "serial"


def test_truncation_defaults_to_auto_and_an_update_replaces_it_whole() -> None:
    s = Session()
    assert s.truncation == "auto"  # as OpenAI's session.created says
    s = apply_update(s, _update({"type": "realtime", "truncation": {
        "type": "retention_ratio", "retention_ratio": 0.5,
        "token_limits": {"post_instructions": 800}}}))
    assert s.model_dump(mode="json")["truncation"] == {
        "type": "retention_ratio", "retention_ratio": 0.5,
        "token_limits": {"post_instructions": 800}}
    s = apply_update(s, _update({"type": "realtime", "truncation": {
        "type": "retention_ratio", "retention_ratio": 0.8}}))
    # A new policy does not inherit the old one's token limit.
    assert s.model_dump(mode="json")["truncation"] == {
        "type": "retention_ratio", "retention_ratio": 0.8}
    s = apply_update(s, _update({"type": "realtime", "instructions": "x"}))
    assert s.model_dump(mode="json")["truncation"]["retention_ratio"] == 0.8
