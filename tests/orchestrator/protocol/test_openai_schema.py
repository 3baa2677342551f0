"""The strict schema checker itself (tests/support/openai_schema.py): it must fail on
exactly the departures it exists to catch."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from pydantic import BaseModel

from tests.support.openai_schema import (
    EXTENSIONS,
    SchemaViolation,
    always_sent,
    beta_available,
    check_event,
    event_models,
    model_violations,
    schema_overrides,
    violations,
)


def speech_started(**changes: Any) -> dict[str, Any]:
    event = {"type": "input_audio_buffer.speech_started", "event_id": "event_1",
             "audio_start_ms": 120, "item_id": "item_1"}
    return {k: v for k, v in {**event, **changes}.items() if v is not ...}


def item_added(content: list[dict[str, Any]], role: str = "user") -> dict[str, Any]:
    return {"type": "conversation.item.added", "event_id": "event_2", "previous_item_id": None,
            "item": {"id": "item_1", "object": "realtime.item", "type": "message",
                     "status": "completed", "role": role, "content": content}}


def session_created(**session: Any) -> dict[str, Any]:
    return {"type": "session.created", "event_id": "event_3",
            "session": {"type": "realtime", "object": "realtime.session", "id": "sess_1",
                        **session}}


def test_a_conforming_event_passes() -> None:
    assert violations(speech_started()) == []
    check_event(speech_started())


def test_a_missing_required_key_fails() -> None:
    problems = violations(speech_started(item_id=...))
    assert problems == ["item_id: required key is missing"]
    with pytest.raises(SchemaViolation, match="item_id"):
        check_event(speech_started(item_id=...))


def test_an_extra_key_fails() -> None:
    assert violations(speech_started(audio_end_ms=5)) == [
        "audio_end_ms: unknown key (not in InputAudioBufferSpeechStartedEvent)"
    ]


def test_a_nested_extra_key_fails() -> None:
    problems = violations(item_added([{"type": "input_text", "text": "hi", "lang": "en"}]))
    assert problems == ["item.content[0].lang: unknown key (not in Content)"]


def test_null_where_the_schema_allows_it_passes_and_elsewhere_fails() -> None:
    assert violations(item_added([{"type": "input_audio", "transcript": None}])) == []
    assert violations(speech_started(item_id=None)) == ["item_id: expected string, got null"]


def test_nullable_but_required_must_be_present() -> None:
    class Model(BaseModel):
        transcript: str | None  # no default: nullable, but required
        note: str | None = None  # optional

    assert model_violations(Model, {"transcript": None}) == []
    assert model_violations(Model, {"transcript": "hi", "note": None}) == []
    assert model_violations(Model, {}) == [
        "transcript: required key is missing (nullable: send null)"
    ]


def test_values_must_have_the_right_json_kind() -> None:
    assert violations(speech_started(audio_start_ms="120")) == [
        "audio_start_ms: expected integer, got string '120'"
    ]
    assert violations(speech_started(audio_start_ms=True)) == [
        "audio_start_ms: expected integer, got boolean True"
    ]
    assert violations(speech_started(audio_start_ms=1.5)) == [
        "audio_start_ms: expected integer, got number 1.5"
    ]
    problems = violations(session_created(output_modalities=["video"]))
    assert problems == ["session.output_modalities[0]: 'video' is not one of ['text', 'audio']"]
    assert violations(session_created(tools={"type": "function"})) == [
        "session.tools: expected an array, got object"
    ]


def test_union_members_are_picked_by_their_tags() -> None:
    # A user may send input_audio; an assistant message may not.
    assert violations(item_added([{"type": "input_audio", "transcript": None}], "user")) == []
    problems = violations(item_added([{"type": "input_audio", "transcript": None}], "assistant"))
    assert problems == [
        "item.content[0].type: 'input_audio' is not one of ['output_text', 'output_audio']"
    ]
    problems = violations(item_added([], role="robot"))
    assert len(problems) == 1 and "matches no member" in problems[0]
    # Non-model unions: "inf" or an integer, nothing else.
    assert violations(session_created(max_output_tokens="inf")) == []
    assert violations(session_created(max_output_tokens=300)) == []
    assert violations(session_created(max_output_tokens="lots"))


def test_keys_openai_always_sends_must_be_present() -> None:
    """The SDK marks a part's transcript optional; OpenAI sends ``null`` until it knows."""
    problems = violations(item_added([{"type": "input_audio"}]))
    assert problems == [
        "item.content[0].transcript: missing; OpenAI always sends this key "
        "(null when it does not apply)"
    ]
    event = item_added([{"type": "input_text", "text": "hi"}])
    del event["previous_item_id"]
    assert violations(event) == [
        "previous_item_id: missing; OpenAI always sends this key (null when it does not apply)"
    ]


def test_only_the_named_extensions_are_accepted() -> None:
    timings = {"type": "cascade.turn.timings", "event_id": "event_4", "pipeline": "x"}
    assert violations(timings) == []
    assert violations({"type": "cascade.other", "event_id": "event_4"}) == [
        "type: 'cascade.other' is not a ga server event"
    ]
    assert violations(session_created(cascade={"pipeline": "serial"})) == []
    event = item_added([{"type": "input_text", "text": "hi"}])
    event["item"]["cascade"] = {}
    assert violations(event) == [
        "item.cascade: unknown key (not in RealtimeConversationItemUserMessage)"
    ]
    assert violations({**speech_started(), "cascade": {}}) == [
        "cascade: unknown key (not in InputAudioBufferSpeechStartedEvent)"
    ]
    assert EXTENSIONS.event_types == {"cascade.turn.timings"}


def test_ga_sessions_are_checked_as_the_session_object_openai_sends() -> None:
    assert violations(session_created()) == []
    assert violations(session_created(temperature=0.8)) == [
        "session.temperature: unknown key (not in RealtimeSessionCreateResponse)"
    ]
    event = session_created()
    del event["session"]["id"]
    assert violations(event) == ["session.id: required key is missing"]
    assert all(name == "session" for _, name in schema_overrides())


def test_event_types_are_per_dialect() -> None:
    delta = {"event_id": "event_5", "response_id": "r", "item_id": "i", "output_index": 0,
             "content_index": 0, "delta": "AAAA"}
    assert violations({"type": "response.output_audio.delta", **delta}) == []
    assert violations({"type": "response.audio.delta", **delta}) == [
        "type: 'response.audio.delta' is not a ga server event"
    ]
    assert violations({"type": "response.audio.delta", **delta}, "beta") == []
    assert violations({"type": "response.output_audio.delta", **delta}, "beta")


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_the_tables_name_real_sdk_classes_and_fields(dialect: Literal["ga", "beta"]) -> None:
    models = event_models(dialect)
    assert "response.done" in models and "error" in models
    assert always_sent(dialect)  # resolving the table asserts every class and field exists


def test_the_pinned_sdk_ships_the_beta_types() -> None:
    """The beta dialect is checked strictly too: the pinned openai SDK must ship its types
    (a pin without them fails here instead of silently skipping the beta checks)."""
    assert beta_available()
