"""The client: what it sends, and how it fails when a server misbehaves."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from benchmarks.v2v.client import (
    FRAME,
    LEAD_S,
    PreparedClip,
    TurnOptions,
    _client_truncate,
    _interrupt_now,
    _session_update,
)
from benchmarks.v2v.corpus import RATE, Clip
from benchmarks.v2v.events import Marks, Response
from benchmarks.v2v.records import ClipInfo

OPTS = TurnOptions(url="ws://127.0.0.1:1/v1/realtime", headers={})
# streaming, serial and default: the endpoint rule both pipelines share, sent explicitly.
SERVER_VAD = {"type": "server_vad", "silence_duration_ms": 500}


def _clip(text: str | None = "what is the capital of france") -> PreparedClip:
    pcm = np.zeros(RATE, np.int16)
    pcm[: RATE // 2] = 1000
    info = ClipInfo(name="q", text=text, source="builtin", duration_ms=1000.0,
                    speech_end_ms=500.0)
    return PreparedClip(Clip(info, pcm))


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
    assert session["audio"]["input"]["turn_detection"] == SERVER_VAD
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": RATE}
    assert ("cascade" in session) is extras
    if extras:
        assert session["cascade"] == {"pipeline": mode, "timings": True}


@pytest.mark.parametrize("mode,opts,pipeline,detection", [
    ("semantic", OPTS, "streaming", {"type": "semantic_vad", "eagerness": "auto"}),
    ("semantic", replace(OPTS, eagerness="high"), "streaming",
     {"type": "semantic_vad", "eagerness": "high"}),
    ("semantic:low", replace(OPTS, eagerness="high"), "streaming",
     {"type": "semantic_vad", "eagerness": "low"}),
    ("serial+semantic_vad:medium", OPTS, "serial",
     {"type": "semantic_vad", "eagerness": "medium"}),
    ("streaming+server_vad:300", OPTS, "streaming",
     {"type": "server_vad", "silence_duration_ms": 300}),
    ("default+semantic_vad", OPTS, None, {"type": "semantic_vad", "eagerness": "auto"}),
    ("semantic", replace(OPTS, cascade_extras=False), None,
     {"type": "semantic_vad", "eagerness": "auto"}),
])
def test_session_update_of_turn_detection_modes(mode: str, opts: TurnOptions,
                                                 pipeline: str | None,
                                                 detection: dict[str, Any]) -> None:
    """``semantic`` is the streaming pipeline with OpenAI's semantic_vad; a mode spec
    names the turn detection for any base, and both dialects accept what is sent."""
    from openai.types.beta.realtime import SessionUpdateEvent as BetaSessionUpdate
    from openai.types.realtime import SessionUpdateEvent

    wire = json.loads(_session_update(mode, opts))
    SessionUpdateEvent.model_validate(wire)
    session = wire["session"]
    assert session["audio"]["input"]["turn_detection"] == detection
    if pipeline is None:
        assert "cascade" not in session
    else:
        assert session["cascade"] == {"pipeline": pipeline, "timings": True}
    assert opts.timings(mode) is (pipeline is not None)
    beta = json.loads(_session_update(mode, replace(opts, dialect="beta")))
    BetaSessionUpdate.model_validate(beta)
    assert beta["session"]["turn_detection"] == detection
    assert beta["session"].get("cascade") == session.get("cascade")


@pytest.mark.parametrize("mode", ["streaming", "default"])
def test_beta_dialect_session_update(mode: str) -> None:
    from openai.types.beta.realtime import SessionUpdateEvent as BetaSessionUpdate

    wire = json.loads(_session_update(mode, replace(OPTS, dialect="beta")))
    BetaSessionUpdate.model_validate(wire)
    session = wire["session"]
    assert session["input_audio_format"] == session["output_audio_format"] == "pcm16"
    assert session["turn_detection"] == SERVER_VAD
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
        assert loop.time() - started < 15.0  # not the 30 s reply timeout
    finally:
        server.close()
        await server.wait_closed()
    assert rec.error is not None and expect in rec.error, rec.error
    assert not rec.replied


class _Wire:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, text: str) -> None:
        self.sent.append(json.loads(text))


def _playing_reply(started_ago: float, seconds: float, done: bool) -> Response:
    import time

    now = time.perf_counter()
    reply = Response(created=now - started_ago - 0.1, first_audio=now - started_ago,
                     status="completed" if done else None, item_id="item_1")
    reply.chunks.append((now - started_ago, seconds))
    if done:
        reply.done = now - started_ago + 0.05
    return reply


def test_interrupt_only_while_the_reply_is_audible() -> None:
    assert _interrupt_now(_playing_reply(0.5, 3.0, done=False), OPTS) == "wait"  # too early
    assert _interrupt_now(_playing_reply(1.2, 3.0, done=True), OPTS) == "now"  # playing
    assert _interrupt_now(_playing_reply(1.2, 0.8, done=True), OPTS) == "finished"
    assert _interrupt_now(_playing_reply(1.2, 0.8, done=False), OPTS) == "wait"  # ran dry


async def test_client_truncates_a_completed_reply_to_what_was_heard() -> None:
    import time

    marks = Marks(barge_in=True)
    reply = _playing_reply(1.5, 3.0, done=True)
    marks.responses["r"], marks.answer = reply, "r"
    marks.onset = time.perf_counter() - 0.3
    wire = _Wire()
    assert not await _client_truncate(wire, marks, OPTS)  # type: ignore[arg-type]
    assert wire.sent == []  # the server has not noticed the speech yet
    marks.speech_started.append(marks.onset + 0.1)
    assert not await _client_truncate(wire, marks, OPTS)  # type: ignore[arg-type]
    assert len(wire.sent) == 1 and marks.client_truncate
    sent = wire.sent[0]
    assert sent["type"] == "conversation.item.truncate" and sent["item_id"] == "item_1"
    # Playing started 1.5 s ago; the speech was noticed 0.2 s ago: 1.3 s were heard.
    assert abs(sent["audio_end_ms"] - 1300) <= 5
    assert not await _client_truncate(wire, marks, OPTS)  # type: ignore[arg-type]
    assert len(wire.sent) == 1  # asked once
    cancelled = Marks(barge_in=True, onset=marks.onset, answer="r",
                      speech_started=list(marks.speech_started))
    cancelled.responses["r"] = _playing_reply(1.5, 3.0, done=False)
    cancelled.responses["r"].status = "cancelled"
    assert not await _client_truncate(wire, cancelled, OPTS)  # type: ignore[arg-type]
    assert len(wire.sent) == 1  # the server cancels and truncates by itself
