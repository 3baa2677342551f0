"""The client: what it sends, and how it fails when a server misbehaves."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import numpy as np
import pytest

from benchmarks.v2v.client import FRAME, LEAD_S, PreparedClip, TurnOptions, _session_update
from benchmarks.v2v.corpus import RATE, Clip
from benchmarks.v2v.records import ClipInfo

OPTS = TurnOptions(url="ws://127.0.0.1:1/v1/realtime", headers={})


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
