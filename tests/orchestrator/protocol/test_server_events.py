"""Every server event serializes to JSON that the openai SDK's own types accept, and that
matches OpenAI's published schema strictly (tests/support/openai_schema.py), in both
dialects."""

from __future__ import annotations

import json
import typing
from typing import Any

import pytest
from openai.types.beta.realtime import realtime_server_event as beta_union_mod
from openai.types.realtime import realtime_server_event as ga_union_mod
from pydantic import BaseModel

from orchestrator.protocol import SERVER_EVENT_TYPES, EventEncoder, ServerEventBase, Session
from orchestrator.protocol.items import ContentPart, MessageItem
from orchestrator.protocol.server_events import (
    CascadeTurnTimingsEvent,
    ConversationItemAddedEvent,
    SessionCreatedEvent,
)
from tests.orchestrator.protocol.samples import SERVER_SAMPLES, user_item
from tests.support.openai_schema import violations


def _by_type(union: Any) -> dict[str, type[BaseModel]]:
    members = typing.get_args(typing.get_args(union)[0])
    return {typing.get_args(m.model_fields["type"].annotation)[0]: m for m in members}


GA = _by_type(ga_union_mod.RealtimeServerEvent)
BETA = _by_type(beta_union_mod.RealtimeServerEvent)


def test_every_server_event_class_has_a_sample() -> None:
    assert set(SERVER_SAMPLES) == set(SERVER_EVENT_TYPES)
    types = [cls.model_fields["type"].default for cls in SERVER_EVENT_TYPES]
    assert len(types) == len(set(types))


@pytest.mark.parametrize("cls", SERVER_EVENT_TYPES, ids=lambda c: c.__name__)
def test_serializes_to_the_sdk_ga_type(cls: type[ServerEventBase]) -> None:
    event = SERVER_SAMPLES[cls]()
    assert isinstance(event, cls)
    wire = json.loads(event.to_json())
    assert wire["type"] == cls.model_fields["type"].default
    assert wire["event_id"].startswith("event_")
    sdk_cls = GA[wire["type"]]  # KeyError: a name the GA API does not have
    parsed = sdk_cls.model_validate(wire)
    assert parsed.type == wire["type"]  # type: ignore[attr-defined]
    # Everything we send is declared by the SDK type, apart from our own extension.
    extra = set(parsed.model_extra or {}) - {"cascade"}
    assert not extra, extra


@pytest.mark.parametrize("cls", SERVER_EVENT_TYPES, ids=lambda c: c.__name__)
def test_beta_encoding_validates_with_the_sdk_beta_type(cls: type[ServerEventBase]) -> None:
    event = SERVER_SAMPLES[cls]()
    text = EventEncoder(beta=True).encode(event)
    if text is None:
        assert cls.model_fields["type"].default in {
            "conversation.item.done",
            "input_audio_buffer.timeout_triggered",
        }
        return
    wire = json.loads(text)
    parsed = BETA[wire["type"]].model_validate(wire)
    assert parsed.type == wire["type"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", SERVER_EVENT_TYPES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("beta", [False, True], ids=["ga", "beta"])
def test_matches_the_published_schema_strictly(cls: type[ServerEventBase], beta: bool) -> None:
    text = EventEncoder(beta=beta).encode(SERVER_SAMPLES[cls]())
    if text is None:
        return  # no such event in beta (checked above)
    assert violations(json.loads(text), "beta" if beta else "ga") == []


def test_cascade_extension_event_is_accepted_as_a_named_extension() -> None:
    event = CascadeTurnTimingsEvent(response_id="resp_1", pipeline="streaming", status="completed")
    for beta in (False, True):
        text = EventEncoder(beta=beta).encode(event)
        assert text is not None
        assert violations(json.loads(text), "beta" if beta else "ga") == []


def test_event_ids_are_unique() -> None:
    ids = {SERVER_SAMPLES[cls]().event_id for cls in SERVER_EVENT_TYPES for _ in range(3)}
    assert len(ids) == 3 * len(SERVER_EVENT_TYPES)


def test_nulls_are_sent_where_openai_sends_them() -> None:
    from orchestrator.protocol.server_events import InputAudioBufferCommittedEvent

    committed = json.loads(InputAudioBufferCommittedEvent(item_id="i").to_json())
    assert "previous_item_id" in committed and committed["previous_item_id"] is None
    # A spoken turn before its transcript: the part says so with null, as OpenAI does.
    added = json.loads(ConversationItemAddedEvent(item=user_item(transcript=None)).to_json())
    assert added["item"]["content"] == [{"type": "input_audio", "transcript": None}]
    # Each part carries the key its type is about, and no empty others.
    part = json.loads(SERVER_SAMPLES[_cls("response.content_part.added")]().to_json())
    assert part["part"] == {"type": "audio", "transcript": ""}
    text = MessageItem(role="assistant", content=[ContentPart(type="output_text")])
    assert text.model_dump(mode="json")["content"] == [{"type": "output_text", "text": None}]
    audio = ContentPart(type="input_audio", audio="AAAA", transcript="hi")
    assert audio.model_dump() == {"type": "input_audio", "audio": "AAAA", "transcript": "hi"}


def test_session_fields_outside_the_ga_schema_stay_internal() -> None:
    """``temperature`` steers the LLM and is stored with the session, but OpenAI's GA
    session object has no such key; beta's has, and gets it."""
    session = Session(temperature=0.6)
    assert session.model_dump()["temperature"] == 0.6  # what the store keeps
    assert Session.model_validate(session.model_dump(mode="json")) == session
    ga = json.loads(SessionCreatedEvent(session=session).to_json())["session"]
    assert "temperature" not in ga and "parallel_tool_calls" not in ga
    beta = json.loads(EventEncoder(beta=True).encode(SessionCreatedEvent(session=session)) or "")
    assert beta["session"]["temperature"] == 0.6 and "object" not in beta["session"]


def _cls(type_name: str) -> type[ServerEventBase]:
    return next(c for c in SERVER_EVENT_TYPES if c.model_fields["type"].default == type_name)
