"""The conversation client: many turns on one connection against a scripted loopback server
that plays a Realtime server with a trivial VAD (any non-zero sample is speech)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np

from benchmarks.v2v.client import FRAME_S, LEAD_S, PreparedClip, TurnOptions
from benchmarks.v2v.conversation import (
    Router,
    conversation_clips,
    gap_before,
    run_conversation,
)
from benchmarks.v2v.corpus import RATE, Clip
from benchmarks.v2v.records import ClipInfo, TurnRecord

QUIET_FRAMES = 10  # the fake server's endpoint: this many silent frames after speech


def _clip(name: str = "q") -> PreparedClip:
    pcm = np.zeros(RATE, np.int16)
    pcm[: RATE // 2] = 1000
    info = ClipInfo(name=name, text="what is the capital of france", source="builtin",
                    duration_ms=1000.0, speech_end_ms=500.0)
    return PreparedClip(Clip(info, pcm))


@dataclass
class Script:
    """How the fake server behaves."""

    deaf_after: int | None = None  # after this many replies: an error for every append
    close_after: int | None = None  # after this many replies: close the connection
    timings_delay_s: float = 0.05  # cascade.turn.timings this long after response.done
    hits: tuple[bool | None, ...] = (False, True, None)  # speculative_hit per reply
    # Observed: silent frames received before each turn's speech (gap + lead + a few).
    silent_before: list[int] = field(default_factory=list)
    sessions: int = 0  # connections opened


async def _reply(ws: object, n: int, script: Script) -> None:
    from websockets.asyncio.server import ServerConnection

    assert isinstance(ws, ServerConnection)
    rid = f"resp_{n}"
    audio = base64.b64encode(np.zeros(RATE // 10, np.int16).tobytes()).decode()
    for event in (
        {"type": "input_audio_buffer.speech_stopped"},
        {"type": "conversation.item.input_audio_transcription.completed",
         "transcript": "What is the capital of France?"},
        {"type": "response.created", "response": {"id": rid}},
        {"type": "response.output_audio_transcript.delta", "response_id": rid,
         "delta": f"Paris {n}."},
        {"type": "response.output_audio.delta", "response_id": rid, "delta": audio},
        {"type": "response.done", "response": {"id": rid, "status": "completed"}},
    ):
        await ws.send(json.dumps(event))
    await asyncio.sleep(script.timings_delay_s)  # arrives during the following silence
    hit = script.hits[(n - 1) % len(script.hits)]
    await ws.send(json.dumps({"type": "cascade.turn.timings", "response_id": rid,
                              "pipeline": "streaming", "speculative_hit": hit,
                              "status": "completed", "llm_first_token_ms": 100.0 * n}))


@asynccontextmanager
async def fake_server(script: Script) -> AsyncIterator[str]:
    from websockets.asyncio.server import ServerConnection, serve

    async def handler(ws: ServerConnection) -> None:
        script.sessions += 1
        await ws.send(json.dumps({"type": "session.created",
                                  "session": {"id": f"sess_{script.sessions}"}}))
        await ws.recv()  # session.update
        await ws.send(json.dumps({"type": "session.updated", "session": {}}))
        replies, speaking, quiet, silent = 0, False, 0, 0
        async for raw in ws:
            event = json.loads(raw)
            if event.get("type") != "input_audio_buffer.append":
                continue
            if script.deaf_after is not None and replies >= script.deaf_after:
                await ws.send(json.dumps({"type": "error", "error": {
                    "type": "invalid_request_error", "code": "input_audio_buffer_full",
                    "message": "the input audio buffer is full"}}))
                continue
            loud = np.frombuffer(base64.b64decode(event["audio"]), np.int16).any()
            if loud and not speaking:
                script.silent_before.append(silent)
                await ws.send(json.dumps({"type": "input_audio_buffer.speech_started"}))
            if loud:
                speaking, quiet, silent = True, 0, 0
                continue
            silent += 1
            if speaking:
                quiet += 1
                if quiet == QUIET_FRAMES:
                    speaking, silent = False, 0
                    replies += 1
                    await _reply(ws, replies, script)
                    if script.close_after is not None and replies >= script.close_after:
                        await ws.close()
                        return

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v1/realtime"


def _opts(url: str, reply_timeout_s: float = 20.0) -> TurnOptions:
    return TurnOptions(url=url, headers={}, reply_timeout_s=reply_timeout_s)


async def test_turns_share_one_connection_with_silence_streamed_between_them() -> None:
    script = Script()
    seen: list[TurnRecord] = []
    async with fake_server(script) as url:
        recs = await run_conversation(_opts(url), [_clip("a"), _clip("b")], "streaming",
                                      turns=3, gaps=(0.4, 0.2), connection_id="streaming-1",
                                      progress=seen.append)
    assert seen == recs and script.sessions == 1
    assert [r.turn_index for r in recs] == [1, 2, 3]
    assert [r.clip for r in recs] == ["a", "b", "a"]  # the corpus, cycled
    for r in recs:
        assert r.phase == "conversation" and r.replied and r.error is None, r
        assert r.connection_id == "streaming-1" and r.session_id == "sess_1"
        assert r.responses == 1 and r.gap_errors == 0
        assert r.first_audio_ms is not None and r.speech_stopped_ms is not None
        assert r.after_endpoint_ms == round(r.first_audio_ms - r.speech_stopped_ms, 1)
    assert recs[0].gap_before_s is None
    assert [r.reply_text for r in recs] == ["Paris 1.", "Paris 2.", "Paris 3."]
    # The timings came after response.done, yet each reached its own turn.
    assert [r.server for r in recs] == [{"llm_first_token_ms": 100.0 * n} for n in (1, 2, 3)]
    assert [r.speculative_hit for r in recs] == [False, True, None]
    # The silence really was streamed (an open microphone): at least the gap plus the
    # leading silence, frame by frame, before each later turn's speech.
    lead = round(LEAD_S / FRAME_S)
    for gap, silent, rec in zip((0.4, 0.2), script.silent_before[1:], recs[1:], strict=True):
        assert rec.gap_before_s is not None and rec.gap_before_s >= gap
        assert silent >= round(gap / FRAME_S) + lead - 1, (gap, silent)


async def test_a_deaf_server_fails_the_later_turns_with_its_reason() -> None:
    """After one reply the server refuses every append (the old 60 s buffer limit): each
    later turn is a failure naming the server's error, with the errors of the silence
    before it counted, and the conversation still ends with one record per turn."""
    script = Script(deaf_after=1)
    async with fake_server(script) as url:
        recs = await run_conversation(_opts(url, reply_timeout_s=30.0), [_clip()], "serial",
                                      turns=3, gaps=(0.3,))
    assert len(recs) == 3 and recs[0].replied
    for rec in recs[1:]:
        assert not rec.replied
        assert rec.error is not None and "input_audio_buffer_full" in rec.error
        assert "no reply within" not in rec.error  # failed on the error, not the timeout
        assert rec.gap_errors > 0 and rec.gap_error is not None
        assert "input_audio_buffer_full" in rec.gap_error


async def test_a_dropped_connection_fails_every_remaining_turn() -> None:
    script = Script(close_after=1)
    async with fake_server(script) as url:
        recs = await run_conversation(_opts(url), [_clip()], "streaming", turns=4,
                                      gaps=(0.2,), connection_id="streaming-1")
    assert [r.turn_index for r in recs] == [1, 2, 3, 4]
    assert recs[0].replied
    for rec in recs[1:]:
        assert not rec.replied and rec.connection_id == "streaming-1"
        assert rec.error is not None and "gone before this turn" in rec.error


async def test_a_refused_connection_is_a_failed_conversation_not_a_crash() -> None:
    recs = await run_conversation(_opts("ws://127.0.0.1:1/v1/realtime"), [_clip()],
                                  "streaming", turns=2, gaps=(1.0,))
    assert len(recs) == 2 and not any(r.replied for r in recs)
    assert recs[0].error and "gone before this turn" not in recs[0].error
    assert recs[1].error and "gone before this turn" in recs[1].error
    assert recs[1].gap_before_s == 1.0


def test_gaps_apply_to_later_turns_and_repeat() -> None:
    assert [gap_before((1.0, 65.0), i) for i in range(1, 6)] == [None, 1.0, 65.0, 1.0, 65.0]
    assert gap_before((), 3) is None
    clips = [_clip("a"), _clip("b"), _clip("c")]
    assert [c.clip.info.name for c in conversation_clips(clips, 5)] == ["a", "b", "c", "a", "b"]


def test_router_hands_response_events_to_their_turn() -> None:
    router = Router()
    first = router.current
    router.on_event({"type": "response.created", "response": {"id": "r1"}}, 1.0)
    second = router.current = type(first)()
    router.on_event({"type": "response.output_audio_transcript.delta", "response_id": "r1",
                     "delta": "late"}, 2.0)
    router.on_event({"type": "input_audio_buffer.speech_started"}, 2.1)
    router.on_event({"type": "error", "error": {"code": "boom", "message": "x"}}, 2.2)
    assert first.responses["r1"].text == ["late"] and "r1" not in second.responses
    assert second.speech_started == [2.1] and first.speech_started == []
    assert second.error == "boom: x"
    assert router.take_errors() == (1, "boom: x") and router.take_errors() == (0, None)


def test_router_hands_a_late_transcript_to_the_turn_that_spoke_it() -> None:
    router = Router()
    turn = router.current
    router.on_event({"type": "input_audio_buffer.speech_stopped", "item_id": "u1"}, 1.0)
    router.current = type(turn)()
    router.on_event({"type": "conversation.item.input_audio_transcription.completed",
                     "item_id": "u1", "transcript": "hello"}, 2.0)
    assert turn.transcripts == [(2.0, "hello")] and router.current.transcripts == []
