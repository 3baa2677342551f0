"""Every server event serializes to JSON that the openai SDK's own types accept."""

from __future__ import annotations

import json
import typing
from typing import Any

import pytest
from openai.types.beta.realtime import realtime_server_event as beta_union_mod
from openai.types.realtime import realtime_server_event as ga_union_mod
from pydantic import BaseModel

from orchestrator.protocol import SERVER_EVENT_TYPES, EventEncoder, ServerEventBase
from tests.orchestrator.protocol.samples import SERVER_SAMPLES


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


def test_event_ids_are_unique() -> None:
    ids = {SERVER_SAMPLES[cls]().event_id for cls in SERVER_EVENT_TYPES for _ in range(3)}
    assert len(ids) == 3 * len(SERVER_EVENT_TYPES)


def test_sparse_parts_omit_nulls_but_events_keep_meaningful_nulls() -> None:
    from orchestrator.protocol.server_events import InputAudioBufferCommittedEvent

    committed = json.loads(InputAudioBufferCommittedEvent(item_id="i").to_json())
    assert "previous_item_id" in committed and committed["previous_item_id"] is None
    added = json.loads(SERVER_SAMPLES[_cls("response.content_part.added")]().to_json())
    assert added["part"] == {"type": "audio", "transcript": ""}


def _cls(type_name: str) -> type[ServerEventBase]:
    return next(c for c in SERVER_EVENT_TYPES if c.model_fields["type"].default == type_name)
