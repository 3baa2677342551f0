"""The real ``openai`` SDK realtime client against ``cascade serve`` with real models.

One server process per module (embedded CPU models, API key required). Speech is piper
(deterministic) at 24 kHz, streamed in 20 ms frames at twice real time, followed by
silence, exactly like a client microphone.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI

from orchestrator import audio_codecs
from orchestrator.launcher import serve_process
from stages.common.text import wer
from tests.support.speech import piper_clip

API_KEY = "test-key-123"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve_process("--api-key", API_KEY) as url:
        yield url.replace("http://", "ws://") + "/v1"


def client(ws_url: str, key: str = API_KEY) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=key, websocket_base_url=ws_url, base_url="http://127.0.0.1:9/v1")


async def speak(conn: Any, pcm: np.ndarray, rate: int, fmt: str, speedup: float = 2.0) -> None:
    """Stream pcm (int16 at rate) as 20 ms appends, then 1.5 s of silence."""
    audio = np.concatenate([np.zeros(rate // 5, np.int16), pcm,
                            np.zeros(rate * 3 // 2, np.int16)])
    frame = rate // 50
    for i in range(0, audio.size, frame):
        payload = audio_codecs.encode_base64(audio[i:i + frame], fmt)
        await conn.input_audio_buffer.append(audio=payload)
        await asyncio.sleep(0.02 / speedup)


async def collect_until(conn: Any, kind: str, limit_s: float = 60.0) -> list[Any]:
    events: list[Any] = []

    async def read() -> None:
        async for event in conn:
            events.append(event)
            if event.type == kind:
                return

    await asyncio.wait_for(read(), limit_s)
    return events


async def test_sdk_spoken_turn_gets_transcript_audio_and_done(server: str) -> None:
    async with client(server).realtime.connect(model="cascade") as conn:
        created = await conn.recv()
        assert created.type == "session.created"
        reader = asyncio.create_task(collect_until(conn, "response.done"))
        await speak(conn, piper_clip(QUESTION, 24_000), 24_000, "audio/pcm", speedup=1.0)
        events = await reader
    types = [e.type for e in events]
    assert "input_audio_buffer.speech_started" in types
    assert "input_audio_buffer.speech_stopped" in types
    completed = [e for e in events
                 if e.type == "conversation.item.input_audio_transcription.completed"]
    # Streaming tiny.en on a shared CPU: at most one word of six may differ.
    assert wer(QUESTION, completed[0].transcript) <= 0.2, completed[0].transcript
    audio = b"".join(base64.b64decode(e.delta) for e in events
                     if e.type == "response.output_audio.delta")
    assert len(audio) > 24_000  # more than half a second of reply
    done = events[-1]
    assert done.response.status == "completed"
    assert done.response.output[0].content[0].transcript


async def test_sdk_manual_turn_and_g711(server: str) -> None:
    async with client(server).realtime.connect(model="cascade") as conn:
        await conn.recv()  # session.created
        await conn.session.update(session={
            "type": "realtime",
            "audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None},
                      "output": {"format": {"type": "audio/pcmu"}}}})
        updated = await conn.recv()
        assert updated.type == "session.updated"
        await speak(conn, piper_clip(QUESTION, 8_000), 8_000, "audio/pcmu", speedup=3.0)
        await conn.input_audio_buffer.commit()
        events = await collect_until(conn, "conversation.item.input_audio_transcription.completed")
        assert not any(e.type == "input_audio_buffer.speech_started" for e in events)
        assert wer(QUESTION, events[-1].transcript) <= 0.2, events[-1].transcript
        await conn.response.create()
        events = await collect_until(conn, "response.done")
    audio = b"".join(base64.b64decode(e.delta) for e in events
                     if e.type == "response.output_audio.delta")
    assert len(audio) > 4_000  # mu-law: one byte per 8 kHz sample
    assert events[-1].response.status == "completed"


async def test_sdk_with_a_wrong_key_is_refused(server: str) -> None:
    with pytest.raises(Exception) as info:
        async with client(server, key="wrong").realtime.connect(model="cascade") as conn:
            await conn.recv()
    assert "403" in str(info.value) or "401" in str(info.value)


async def test_sdk_barge_in_truncates_to_the_audio_sent(server: str) -> None:
    async with client(server).realtime.connect(model="cascade") as conn:
        await conn.recv()  # session.created
        await conn.session.update(session={"type": "realtime",
                                           "instructions": "Answer with a long story."})
        await conn.recv()  # session.updated
        question = piper_clip("Tell me a long story about a dragon.", 24_000)
        events: list[Any] = []
        got_audio = asyncio.Event()

        async def read() -> None:
            async for event in conn:
                events.append(event)
                if event.type == "response.output_audio.delta":
                    got_audio.set()
                if event.type == "response.done":
                    return

        reader = asyncio.create_task(read())
        await speak(conn, question, 24_000, "audio/pcm", speedup=1.0)
        await asyncio.wait_for(got_audio.wait(), 60)
        await asyncio.sleep(0.5)  # let some reply audio play out
        # The user talks over the reply (speech, then silence, like a microphone).
        await speak(conn, piper_clip("Stop, wait a second.", 24_000), 24_000, "audio/pcm",
                    speedup=1.0)
        await asyncio.wait_for(reader, 60)
    done = events[-1]
    assert done.response.status == "cancelled"
    truncated = [e for e in events if e.type == "conversation.item.truncated"]
    assert len(truncated) == 1
    sent_ms = sum(len(base64.b64decode(e.delta)) for e in events
                  if e.type == "response.output_audio.delta") / 2 / 24
    assert 0 < truncated[0].audio_end_ms <= sent_ms + 1
    # The kept text is what was voiced up to the cut: a prefix of the phrases sent.
    spoken = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    heard = done.response.output[0].content[0].transcript
    assert spoken.startswith(heard) and len(heard) < len(spoken) + 1


async def one_spoken_question(base_url: str) -> list[Any]:
    """QUESTION spoken once on a new connection to ``base_url`` (http://...); its events
    up to the reply's response.done."""
    ws_url = base_url.replace("http://", "ws://") + "/v1"
    async with client(ws_url).realtime.connect(model="cascade") as conn:
        await conn.recv()  # session.created
        reader = asyncio.create_task(collect_until(conn, "response.done"))
        await speak(conn, piper_clip(QUESTION, 24_000), 24_000, "audio/pcm", speedup=1.0)
        return await reader


async def test_distributed_shape_stage_services_behind_serve() -> None:
    """cascade serve with --asr-url/--llm-url/--tts-url: the same turn over three services."""
    from orchestrator.launcher import stage_processes

    with stage_processes(("asr", "llm", "tts")) as urls, serve_process(
            "--api-key", API_KEY, "--asr-url", urls["asr"], "--llm-url", urls["llm"],
            "--tts-url", urls["tts"]) as base:
        events = await one_spoken_question(base)
    completed = [e for e in events
                 if e.type == "conversation.item.input_audio_transcription.completed"]
    assert wer(QUESTION, completed[0].transcript) <= 0.2
    assert events[-1].response.status == "completed"
    assert any(e.type == "response.output_audio.delta" for e in events)


async def test_remote_llm_with_embedded_asr_and_tts() -> None:
    """cascade serve --llm-url alone: ASR and TTS in-process, the LLM a separate server."""
    from orchestrator.launcher import stage_processes

    with stage_processes(("llm",)) as urls, serve_process(
            "--api-key", API_KEY, "--llm-url", urls["llm"]) as base:
        events = await one_spoken_question(base)
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(urls["llm"] + "/metrics")).text
    assert events[-1].response.status == "completed"
    assert any(e.type == "response.output_audio.delta" for e in events)
    # The reply's tokens came from the LLM server, not an embedded engine.
    served = [line for line in metrics.splitlines() if line.startswith("cascade_llm_tokens_total")]
    assert served and float(served[0].split()[-1]) > 0


async def test_semantic_vad_ends_a_complete_question_on_the_model(server: str) -> None:
    """semantic_vad with the real Smart Turn model: a finished question ends the turn on
    the model's word ("semantic"), before server_vad's 500 ms of silence would have."""
    async with client(server).realtime.connect(model="cascade") as conn:
        await conn.recv()
        await conn.session.update(session={  # type: ignore[arg-type]
            "type": "realtime", "turn_detection": {"type": "semantic_vad", "eagerness": "high"},
            "cascade": {"timings": True}})
        reader = asyncio.create_task(collect_until(conn, "cascade.turn.timings"))
        await speak(conn, piper_clip(QUESTION, 24_000), 24_000, "audio/pcm", speedup=1.0)
        events = await reader
    timings = events[-1]
    assert timings.type == "cascade.turn.timings"
    extra = timings.model_extra or {}
    reason = getattr(timings, "endpoint_reason", None) or extra.get("endpoint_reason")
    probability = getattr(timings, "turn_probability", None) or extra.get("turn_probability")
    assert reason == "semantic" and probability is not None and probability >= 0.5
    assert any(e.type == "response.output_audio.delta" for e in events)


async def test_a_misbehaving_client_does_not_disturb_another_session(server: str) -> None:
    async with client(server).realtime.connect(model="cascade") as good, \
            client(server).realtime.connect(model="cascade") as bad:
        await good.recv()
        await bad.recv()
        reader = asyncio.create_task(collect_until(good, "response.done"))
        bad_ws = bad._connection  # raw frames the SDK would never send
        for frame in ("{not json", '{"type": "nope"}', '{"type": "input_audio_buffer.append", '
                      '"audio": "%%%"}', '{"type": "input_audio_buffer.commit"}'):
            await bad_ws.send(frame)
        await speak(good, piper_clip(QUESTION, 24_000), 24_000, "audio/pcm", speedup=1.0)
        events = await reader
        errors = []
        while len(errors) < 4:
            event = await asyncio.wait_for(bad.recv(), 10)
            if event.type == "error":
                errors.append(event.error.code)
    assert errors == ["invalid_json", "invalid_value", "invalid_audio",
                      "input_audio_buffer_commit_empty"]
    assert events[-1].type == "response.done" and events[-1].response.status == "completed"
