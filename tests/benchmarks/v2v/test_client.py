"""The client's timing logic on scripted event sequences (exact clock values)."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import numpy as np
import pytest

from benchmarks.v2v.client import (
    FRAME,
    LEAD_S,
    PreparedClip,
    TurnOptions,
    _finish,
    _Marks,
    _on_event,
    _session_update,
)
from benchmarks.v2v.corpus import RATE, Clip
from benchmarks.v2v.records import ClipInfo, TurnRecord

OPTS = TurnOptions(url="ws://127.0.0.1:1/v1/realtime", headers={})


def _clip(text: str | None = "what is the capital of france") -> PreparedClip:
    pcm = np.zeros(RATE, np.int16)
    pcm[: RATE // 2] = 1000
    info = ClipInfo(name="q", text=text, source="builtin", duration_ms=1000.0,
                    speech_end_ms=500.0)
    return PreparedClip(Clip(info, pcm))


def _audio(response_id: str, seconds: float) -> dict[str, Any]:
    pcm = np.zeros(round(seconds * RATE), np.int16).tobytes()
    return {"type": "response.output_audio.delta", "response_id": response_id,
            "delta": base64.b64encode(pcm).decode()}


def _play(script: list[tuple[float, dict[str, Any]]], eos: float = 10.0) -> _Marks:
    marks = _Marks()
    for at, event in script:
        if marks.eos is None and at >= eos:
            marks.eos = eos
        _on_event(event, at, marks)
    marks.eos = marks.eos or eos
    return marks


def _record() -> TurnRecord:
    return TurnRecord(phase="compare", mode="streaming", concurrency=1, session_index=0,
                      round=0, clip="q", started_s=0.0, eos_s=0.0)


def test_a_clean_turn_is_timed_from_the_end_of_speech() -> None:
    marks = _play([
        (10.53, {"type": "input_audio_buffer.speech_stopped"}),
        (10.60, {"type": "response.created", "response": {"id": "r1"}}),
        (10.61, {"type": "conversation.item.input_audio_transcription.completed",
                 "transcript": "What is the capital of France?"}),
        (10.90, {"type": "response.output_audio_transcript.delta", "response_id": "r1",
                 "delta": "Paris "}),
        (11.00, _audio("r1", 0.5)),
        (11.20, _audio("r1", 0.5)),   # queued behind the first: no gap
        (12.30, _audio("r1", 0.2)),   # player ran dry at 12.0: a 300 ms gap
        (12.40, {"type": "response.done", "response": {"id": "r1", "status": "completed"}}),
        (12.41, {"type": "cascade.turn.timings", "endpoint_ms": 520.0,
                 "llm_first_token_ms": 250.5, "pipeline": "streaming"}),
    ])
    assert marks.finished.is_set() and marks.answer == "r1"
    rec = _finish(_record(), marks, _clip(), OPTS, t0=9.0)
    assert rec.error is None and rec.replied
    assert (rec.speech_stopped_ms, rec.final_transcript_ms, rec.first_text_ms,
            rec.first_audio_ms, rec.done_ms) == (530.0, 610.0, 900.0, 1000.0, 2400.0)
    assert rec.eos_s == 1.0
    assert rec.reply_audio_ms == 1200.0 and rec.audio_chunks == 3
    assert (rec.gap_count, rec.gap_total_ms, rec.gap_max_ms) == (1, 300.0, 300.0)
    assert rec.gaps == [(2000.0, 300.0)]  # the player ran dry at 12.0 s, EoS was 10.0 s
    assert rec.transcript == "What is the capital of France?" and rec.wer == 0.0
    assert rec.reply_text == "Paris"
    assert rec.server == {"endpoint_ms": 520.0, "llm_first_token_ms": 250.5}
    assert not rec.early_endpoint and rec.responses == 1


def test_a_reply_cut_off_by_the_user_continuing_is_not_the_answer() -> None:
    """An endpoint inside a mid-sentence pause starts a reply the server then cancels;
    the answer is the reply to the whole turn, and the early endpoint is flagged."""
    marks = _play([
        (9.0, {"type": "input_audio_buffer.speech_stopped"}),
        (9.1, {"type": "response.created", "response": {"id": "early"}}),
        (9.3, {"type": "response.done", "response": {"id": "early", "status": "cancelled"}}),
        (10.6, {"type": "input_audio_buffer.speech_stopped"}),
        (10.7, {"type": "response.created", "response": {"id": "r2"}}),
        (11.5, _audio("r2", 1.0)),
        (12.6, {"type": "response.done", "response": {"id": "early", "status": "cancelled"}}),
        (12.7, {"type": "response.done", "response": {"id": "r2", "status": "completed"}}),
    ])
    rec = _finish(_record(), marks, _clip(), OPTS, t0=0.0)
    assert marks.answer == "r2"
    assert rec.early_endpoint and rec.responses == 2
    assert rec.speech_stopped_ms == 600.0 and rec.first_audio_ms == 1500.0
    assert rec.gap_count == 0 and rec.server is None


def test_beta_event_names_are_understood() -> None:
    marks = _play([
        (10.7, {"type": "response.created", "response": {"id": "r"}}),
        (10.8, {"type": "response.audio_transcript.delta", "response_id": "r", "delta": "Hi"}),
        (10.9, {**_audio("r", 0.3), "type": "response.audio.delta"}),
        (11.3, {"type": "response.done", "response": {"id": "r", "status": "completed"}}),
    ])
    rec = _finish(_record(), marks, _clip(None), OPTS, t0=0.0)
    assert rec.first_text_ms == 800.0 and rec.first_audio_ms == 900.0
    assert rec.wer is None and rec.transcript is None


def test_errors_and_silent_replies_are_recorded_not_raised() -> None:
    marks = _play([(10.2, {"type": "error", "error": {"type": "invalid_request_error",
                                                      "code": "bad", "message": "nope"}})])
    assert marks.finished.is_set()
    rec = _finish(_record(), marks, _clip(), OPTS, t0=0.0)
    assert rec.error == "bad: nope" and not rec.replied

    text_only = _play([
        (10.7, {"type": "response.created", "response": {"id": "r"}}),
        (11.3, {"type": "response.done", "response": {"id": "r", "status": "completed"}}),
    ])
    rec = _finish(_record(), text_only, _clip(), OPTS, t0=0.0)
    assert rec.error == "the reply had no audio" and not rec.replied

    unsent = _Marks()
    assert _finish(_record(), unsent, _clip(), OPTS, t0=0.0).error


def test_prepared_clip_frames_and_eos_frame() -> None:
    clip = _clip()
    lead = round(LEAD_S * RATE)
    assert len(clip.frames) == -(-(lead + RATE) // FRAME)
    assert clip.eos_frame == (lead + RATE // 2 - 1) // FRAME
    first_voiced = json.loads(clip.frames[lead // FRAME])
    assert first_voiced["type"] == "input_audio_buffer.append"
    samples = np.frombuffer(base64.b64decode(first_voiced["audio"]), np.int16)
    assert samples.size == FRAME and samples.max() == 1000


@pytest.mark.parametrize("mode,extras", [("streaming", True), ("serial", True),
                                         ("default", False)])
def test_session_update_is_standard_with_optional_cascade_extras(mode: str,
                                                                 extras: bool) -> None:
    from openai.types.realtime import SessionUpdateEvent

    wire = json.loads(_session_update(mode, OPTS))
    SessionUpdateEvent.model_validate(wire)  # the SDK's own type accepts it
    session = wire["session"]
    assert session["audio"]["input"]["turn_detection"] == {"type": "server_vad"}
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": RATE}
    assert ("cascade" in session) is extras
    if extras:
        assert session["cascade"] == {"pipeline": mode, "timings": True}


@pytest.mark.parametrize("mode", ["streaming", "default"])
def test_beta_dialect_session_update(mode: str) -> None:
    from dataclasses import replace

    from openai.types.beta.realtime import SessionUpdateEvent as BetaSessionUpdate

    wire = json.loads(_session_update(mode, replace(OPTS, dialect="beta")))
    BetaSessionUpdate.model_validate(wire)
    session = wire["session"]
    assert session["input_audio_format"] == session["output_audio_format"] == "pcm16"
    assert session["turn_detection"] == {"type": "server_vad"}
    assert session["max_response_output_tokens"] == OPTS.max_output_tokens
    assert "audio" not in session and ("cascade" in session) is (mode == "streaming")


async def _scripted_server(after_update: list[str] | None, *, close: bool = False
                           ) -> tuple[Any, str]:
    """A loopback WebSocket peer that plays a scripted misbehaving server."""
    from websockets.asyncio.server import ServerConnection, serve

    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "session.created", "session": {}}))
        await ws.recv()  # session.update
        await ws.send(json.dumps({"type": "session.updated", "session": {}}))
        for _ in range(10):  # some audio first
            await ws.recv()
        for text in after_update or []:
            await ws.send(text)
        if close:
            await ws.close()
            return
        async for _ in ws:  # keep reading audio, never reply
            pass

    server = await serve(handler, "127.0.0.1", 0)
    port = next(iter(server.sockets)).getsockname()[1]
    return server, f"ws://127.0.0.1:{port}/v1/realtime"


@pytest.mark.parametrize("script,close,expect", [
    (["{not json"], False, "JSONDecodeError"),
    ([json.dumps({"type": "response.created"})], False, "KeyError"),
    ([], True, "closed"),
])
async def test_a_misbehaving_server_fails_the_turn_promptly(script: list[str], close: bool,
                                                           expect: str) -> None:
    from benchmarks.v2v.client import run_turn

    server, url = await _scripted_server(script, close=close)
    try:
        opts = TurnOptions(url=url, headers={}, reply_timeout_s=30.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        rec = await run_turn(opts, _clip(), "default", phase="compare")
        assert loop.time() - started < 5.0  # not the 30 s reply timeout
    finally:
        server.close()
        await server.wait_closed()
    assert rec.error is not None and expect in rec.error, rec.error
    assert not rec.replied
