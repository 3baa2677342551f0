"""Hostile client events the fuzzer (benchmarks/reliability/fuzz.py) found crashing the
parser: each must be a ``ProtocolError`` (an ``error`` event), never another exception."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.protocol import ProtocolError, parse_client_event


def _refused(frame: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_client_event(frame)
    return caught.value


@pytest.mark.parametrize("frame", [
    "[" * 100_000 + "]" * 100_000,
    '{"type":"conversation.item.create","item":' + '{"a":' * 5000 + "1" + "}" * 5001,
])
def test_deep_nesting_is_invalid_json(frame: str) -> None:
    # was: RecursionError out of json.loads -> "server_error" and a traceback
    assert _refused(frame).code == "invalid_json"


@pytest.mark.parametrize("frame", [
    '{"type":"\\ud800"}',
    '{"type":"conversation.item.create","item":{"type":"message","role":"user",'
    '"content":[{"type":"input_text","text":"a\\udfffb"}]}}',
    '{"type":"session.update","session":{"tracing":{"\\udbff":1}}}',
])
def test_lone_surrogates_are_invalid_json(frame: str) -> None:
    # they decode to text that no UTF-8 encoder accepts (store, echo, LLM)
    assert _refused(frame).code == "invalid_json"


def test_surrogate_pairs_are_text() -> None:
    event = parse_client_event('{"type":"conversation.item.create","item":{"type":"message",'
                               '"role":"user","content":[{"type":"input_text",'
                               '"text":"\\ud83d\\ude00"}]}}')
    assert event.item.content[0].text == "\U0001f600"  # type: ignore[union-attr]


@pytest.mark.parametrize(("event", "param"), [
    # was: TypeError ('int' object is not iterable) in the beta -> GA rewrite
    ({"type": "session.update", "session": {"voice": "x", "audio": 5}}, "session.audio"),
    ({"type": "session.update", "session": {"voice": "x", "audio": [["input", 5]]}},
     "session.audio"),
    ({"type": "session.update", "session": {"input_audio_format": "pcm16",
                                            "audio": {"input": [1]}}}, "session.audio.input"),
    ({"type": "response.create", "response": {"voice": "x", "audio": 5}}, "response.audio"),
    ({"type": "response.create", "response": {"voice": "x", "audio": {"output": "abc"}}},
     "response.audio.output"),
])
def test_beta_fields_beside_a_non_object(event: dict[str, Any], param: str) -> None:
    err = _refused(json.dumps(event))
    assert (err.code, err.param) == ("invalid_type", param)


def test_unhashable_content_type() -> None:
    # was: TypeError (unhashable type: 'list') in the beta content-name rewrite
    err = _refused(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": [1]}]}}))
    assert (err.code, err.param) == ("invalid_value", "item.content[0].type")
