"""Hostile input: the quick fuzz run against live processes (cascade serve and the three
stage services) must find no crash, and every target must get the inputs it was asked
to; the oracle that judges Realtime answers must reject wrong answers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from benchmarks.reliability import fuzz
from benchmarks.reliability.fuzz_cases import Case
from benchmarks.reliability.fuzz_realtime import judge


def _error(code: str, event_id: str | None = None, type_: str = "invalid_request_error"
           ) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "code": code, "message": "m",
                                       "event_id": event_id}}


BAD = Case("conversation.item.delete", '{"type":"conversation.item.delete"}', "error", "e1")
OK = Case("conversation.item.create", "{}", "ok", "e2")


@pytest.mark.parametrize(("case", "window"), [
    (BAD, []),                                              # bad input, no answer
    (BAD, [_error("invalid_type", "other")]),               # an error about another event
    (BAD, [{"type": "error", "error": {"code": "x"}}]),     # a malformed error event
    (BAD, [_error("server_error", "e1", "server_error")]),  # the server failed
    (OK, [_error("invalid_type", "e2")]),                   # a valid event refused
    (OK, []),                                               # item.create left unanswered
])
def test_oracle_rejects_wrong_answers(case: Case, window: list[dict[str, Any]]) -> None:
    assert judge(case, window) is not None


@pytest.mark.parametrize(("case", "window"), [
    (BAD, [_error("missing_required_parameter", "e1")]),
    (BAD, [_error("invalid_json")]),  # no readable event_id: the error names none
    (OK, [{"type": "conversation.item.added"}, {"type": "conversation.item.done"}]),
    (OK, [_error("conversation_too_long", "e2")]),  # a state error, not a parse error
])
def test_oracle_accepts_right_answers(case: Case, window: list[dict[str, Any]]) -> None:
    assert judge(case, window) is None


@pytest.mark.timeout(600)
def test_quick_fuzz_finds_no_crash() -> None:
    rows = asyncio.run(fuzz.run(quick=True))
    asked = fuzz.counts(quick=True)
    failed = [(row.name, row.result, row.note) for row in rows if not row.passed]
    assert not failed, failed
    assert len(rows) == 10 and {row.section for row in rows} == {"fuzz"}
    *targets, processes = rows
    assert processes.figures["problems"] == []
    for row in targets:
        assert row.figures["events"] >= row.figures["asked"] > 0, row
        assert row.figures["crashes"] == 0
    realtime = targets[0]
    assert realtime.figures["asked"] >= asked["realtime"]
    assert realtime.figures["errors"] > asked["realtime"] // 4  # bad input was sent
    assert realtime.figures["bystander_checks"] >= 3  # items throughout, then a reply
    asr_ws, tts_ws = targets[4], targets[5]
    assert asr_ws.name.startswith("asr WebSocket") and tts_ws.name.startswith("tts WebSocket")
    assert min(asr_ws.figures["asked"], tts_ws.figures["asked"]) > asked["stage"]
