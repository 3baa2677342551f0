"""Bad client input -> ProtocolError with the right code and param, and an error event the
SDK accepts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.realtime import RealtimeErrorEvent

from orchestrator.protocol import ProtocolError, error_event, parse_client_event


def _err(data: str | bytes, **kw: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_client_event(data, **kw)
    return info.value


def _ev(obj: Any) -> str:
    return json.dumps(obj)


def test_malformed_json() -> None:
    e = _err('{"type": "input_audio_buffer.commit"')
    assert e.code == "invalid_json" and e.param is None and "JSON" in e.message
    assert _err(b"\xff\xfe{").code == "invalid_json"


@pytest.mark.parametrize("payload", ["[1, 2]", '"hello"', "42", "null"])
def test_non_object_json(payload: str) -> None:
    e = _err(payload)
    assert e.code == "invalid_type" and "JSON object" in e.message


def test_missing_type() -> None:
    e = _err(_ev({"event_id": "evt_7", "audio": "AAAA"}))
    assert (e.code, e.param, e.event_id) == ("missing_required_parameter", "type", "evt_7")


def test_non_string_type() -> None:
    e = _err(_ev({"type": 3}))
    assert (e.code, e.param) == ("invalid_type", "type")


def test_unknown_type_names_supported_values() -> None:
    e = _err(_ev({"type": "response.audio.delta", "event_id": "evt_9"}))
    assert (e.code, e.param, e.event_id) == ("invalid_value", "type", "evt_9")
    assert "'response.audio.delta'" in e.message and "'session.update'" in e.message
    t = _err(_ev({"type": "transcription_session.update", "session": {}}))
    assert t.code == "invalid_value" and "not supported" in t.message


def test_missing_field() -> None:
    e = _err(_ev({"type": "input_audio_buffer.append", "event_id": "a1"}))
    assert (e.code, e.param, e.event_id) == ("missing_required_parameter", "audio", "a1")
    assert "'audio'" in e.message


def test_missing_nested_field() -> None:
    e = _err(_ev({"type": "conversation.item.create", "item": {"type": "message", "role": "user"}}))
    assert (e.code, e.param) == ("missing_required_parameter", "item.content")


def test_unknown_field() -> None:
    e = _err(_ev({"type": "session.update", "session": {"type": "realtime", "colour": "red"}}))
    assert (e.code, e.param) == ("unknown_parameter", "session.colour")
    assert "session.colour" in e.message


def test_wrong_type() -> None:
    e = _err(
        _ev(
            {
                "type": "conversation.item.truncate",
                "item_id": "i",
                "content_index": 0,
                "audio_end_ms": "x",
            }
        )
    )
    assert (e.code, e.param) == ("invalid_type", "audio_end_ms")


def test_invalid_values_name_the_field() -> None:
    rate = _err(
        _ev(
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
                },
            }
        )
    )
    assert (rate.code, rate.param) == ("invalid_value", "session.audio.input.format.rate")
    vad = _err(
        _ev(
            {
                "type": "session.update",
                "session": {
                    "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 1.5}}}
                },
            }
        )
    )
    assert (vad.code, vad.param) == (
        "invalid_value",
        "session.audio.input.turn_detection.threshold",
    )
    td = _err(
        _ev(
            {
                "type": "session.update",
                "session": {"audio": {"input": {"turn_detection": {"type": "magic"}}}},
            }
        )
    )
    assert (td.code, td.param) == ("invalid_value", "session.audio.input.turn_detection.type")
    neg = _err(
        _ev(
            {
                "type": "conversation.item.truncate",
                "item_id": "i",
                "content_index": 0,
                "audio_end_ms": -5,
            }
        )
    )
    assert (neg.code, neg.param) == ("invalid_value", "audio_end_ms")
    tokens = _err(_ev({"type": "response.create", "response": {"max_output_tokens": 0}}))
    assert tokens.code == "invalid_value" and tokens.param == "response.max_output_tokens"


def test_content_part_must_suit_the_role() -> None:
    e = _err(
        _ev(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "output_audio", "audio": "AA"}],
                },
            }
        )
    )
    assert e.code == "invalid_value" and e.param == "item.content"
    assert "'output_audio' is not allowed in a user message" in e.message
    bad_part = _err(
        _ev(
            {
                "type": "conversation.item.create",
                "item": {"type": "message", "role": "user", "content": [{"type": "input_image"}]},
            }
        )
    )
    assert bad_part.param == "item.content[0].type"


def test_too_large() -> None:
    e = _err(_ev({"type": "input_audio_buffer.append", "audio": "A" * 1000}), max_bytes=100)
    assert e.code == "invalid_value" and "too large" in e.message


def test_error_event_round_trips_through_the_sdk() -> None:
    e = _err(_ev({"type": "input_audio_buffer.append", "event_id": "evt_c"}))
    ev = error_event(e)
    sdk = RealtimeErrorEvent.model_validate_json(ev.to_json())
    assert sdk.error.type == "invalid_request_error"
    assert sdk.error.code == "missing_required_parameter"
    assert sdk.error.param == "audio"
    assert sdk.error.event_id == "evt_c"
    assert sdk.error.message == e.message
    assert sdk.event_id.startswith("event_") and sdk.event_id != "evt_c"


def test_bad_beta_format_names_the_beta_field() -> None:
    e = _err(_ev({"type": "session.update", "session": {"input_audio_format": "mp3"}}))
    assert (e.code, e.param) == ("invalid_value", "session.input_audio_format")
    assert "'mp3'" in e.message and "g711_ulaw" in e.message
    r = _err(_ev({"type": "response.create", "response": {"output_audio_format": 7}}))
    assert (r.code, r.param) == ("invalid_value", "response.output_audio_format")


def test_bad_or_missing_union_tag_names_the_tag_field() -> None:
    bad = _err(_ev({"type": "conversation.item.create", "item": {"type": "thing"}}))
    assert (bad.code, bad.param) == ("invalid_value", "item.type")
    assert "'thing'" in bad.message
    missing = _err(
        _ev({"type": "conversation.item.create", "item": {"role": "user", "content": []}})
    )
    assert (missing.code, missing.param) == ("missing_required_parameter", "item.type")
