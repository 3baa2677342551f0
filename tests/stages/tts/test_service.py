"""The TTS service as a separate process (`cascade stage tts`), driven over its network API."""

from __future__ import annotations

import asyncio
import io
import json
import time
import wave
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from stages.tts.client import TtsClient
from stages.tts.phrases import split_phrases
from tests.support.procs import stage_process

TEXT = ("Hello there! The store opens at nine in the morning and closes at six in the "
        "evening. On weekends it opens later, at ten. You can also order online at any time.")
MAX_BYTES = 65536
MAX_STREAMS = 3


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with stage_process("tts", "--set", f"max_message_bytes={MAX_BYTES}",
                       "--set", "max_text_chars=2000", "--set", f"max_streams={MAX_STREAMS}"
                       ) as url:
        yield url


def ws_url(base: str, query: str = "sample_rate=24000") -> str:
    return base.replace("http", "ws", 1) + "/v1/stream?" + query


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.recv(), timeout=60)
    assert isinstance(msg, str), "expected a JSON text message"
    data: dict[str, Any] = json.loads(msg)
    return data


async def recv_until(ws: ClientConnection, kind: str) -> list[dict[str, Any]]:
    """Collect events (chunk headers with their audio size checked) until ``kind``."""
    events = []
    while True:
        event = await recv_json(ws)
        events.append(event)
        if event["type"] == "chunk":
            audio = await asyncio.wait_for(ws.recv(), timeout=60)
            assert isinstance(audio, bytes) and len(audio) == event["audio_bytes"]
        if event["type"] == kind:
            return events


async def test_streaming_through_the_client(base: str) -> None:
    client = TtsClient(base)
    stream = await client.open_stream(sample_rate=8000)
    t_sent: list[float] = []
    for tok in TEXT.split(" "):
        await stream.push_text(tok if tok.endswith("time.") else tok + " ")
        t_sent.append(time.perf_counter())
        await asyncio.sleep(0.01)
    await stream.flush()
    chunks = [c async for c in stream.chunks()]
    await stream.aclose()
    await client.aclose()
    assert "".join(c.text for c in chunks) == TEXT
    assert chunks[0].text == "Hello there! "
    assert [c.text_offset for c in chunks] == [TEXT.index(c.text) for c in chunks]
    for c in chunks:
        assert c.sample_rate == 8000
        assert c.duration_ms == pytest.approx(len(c.audio) / 2 / 8000 * 1000)
        if c.words is not None:
            assert all(0 <= w.start_ms <= w.end_ms <= c.duration_ms for w in c.words)
    assert any(c.words for c in chunks)


async def test_rounds_on_one_socket_continue_indexes(base: str) -> None:
    async with connect(ws_url(base)) as ws:
        assert (await recv_json(ws))["type"] == "ready"
        await ws.send(json.dumps({"type": "text", "text": "First round. "}))
        await ws.send(json.dumps({"type": "flush"}))
        first = await recv_until(ws, "done")
        await ws.send(json.dumps({"type": "text", "text": "Second round."}))
        await ws.send(json.dumps({"type": "flush"}))
        second = await recv_until(ws, "done")
        await ws.send(json.dumps({"type": "flush"}))  # nothing pending: just "done"
        assert [e["type"] for e in await recv_until(ws, "done")] == ["done"]
    chunks = [e for e in first + second if e["type"] == "chunk"]
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert "".join(c["text"] for c in chunks) == "First round. Second round."
    assert chunks[-1]["text_offset"] == len("First round. ")


async def test_cancel_mid_stream_then_socket_still_works(base: str) -> None:
    async with connect(ws_url(base)) as ws:
        assert (await recv_json(ws))["type"] == "ready"
        await ws.send(json.dumps({"type": "text", "text": TEXT * 4}))
        await ws.send(json.dumps({"type": "flush"}))
        header = await recv_json(ws)
        assert header["type"] == "chunk" and header["index"] == 0
        await ws.recv()
        await ws.send(json.dumps({"type": "cancel"}))
        events = await recv_until(ws, "cancelled")
        n_chunks = 1 + sum(e["type"] == "chunk" for e in events)
        assert n_chunks < len(split_phrases(TEXT * 4)) - 1  # stopped well before the end
        assert not any(e["type"] == "done" for e in events)
        await ws.send(json.dumps({"type": "text", "text": "After cancel."}))
        await ws.send(json.dumps({"type": "flush"}))
        events = await recv_until(ws, "done")
        assert [e["text"] for e in events if e["type"] == "chunk"] == ["After cancel."]


async def test_bad_messages_get_errors_and_socket_stays_open(base: str) -> None:
    async with connect(ws_url(base)) as ws:
        assert (await recv_json(ws))["type"] == "ready"
        await ws.send("{not json")
        assert (await recv_json(ws))["code"] == "malformed_json"
        # found by fuzzing: these dropped the connection (RecursionError)
        for bad in ("[" * 5000 + "]" * 5000, '{"type": "text", "text": "\\ud800"}'):
            await ws.send(bad)
            assert (await recv_json(ws))["code"] == "malformed_json"
        await ws.send(json.dumps({"type": "speak", "text": "x"}))
        err = await recv_json(ws)
        assert err["type"] == "error" and err["code"] == "unknown_type"
        assert "speak" in err["message"]
        await ws.send(json.dumps({"type": "text"}))
        assert (await recv_json(ws))["code"] == "invalid_event"
        await ws.send(json.dumps({"type": "text", "text": "word " * 500}))
        assert (await recv_json(ws))["code"] == "text_too_long"
        await ws.send(b"\x00\x01")
        assert (await recv_json(ws))["code"] == "binary_not_supported"
        await ws.send(json.dumps({"type": "text", "text": "Still fine."}))
        await ws.send(json.dumps({"type": "flush"}))
        events = await recv_until(ws, "done")
        assert "".join(e["text"] for e in events if e["type"] == "chunk") == "Still fine."


async def test_oversized_message_closes_with_1009(base: str) -> None:
    async with connect(ws_url(base), max_size=None) as ws:
        assert (await recv_json(ws))["type"] == "ready"
        await ws.send(json.dumps({"type": "text", "text": "a" * (MAX_BYTES + 10)}))
        err = await recv_json(ws)
        assert err["code"] == "message_too_large"
        with pytest.raises(ConnectionClosed) as exc:
            await asyncio.wait_for(ws.recv(), timeout=10)
        assert exc.value.rcvd is not None and exc.value.rcvd.code == 1009


@pytest.mark.parametrize("query,code", [("sample_rate=12345", "unsupported_sample_rate"),
                                        ("sample_rate=abc", "unsupported_sample_rate"),
                                        ("sample_rate=24000&voice=nobody", "unknown_voice"),
                                        ("sample_rate=24000&encoding=mulaw",
                                         "unsupported_encoding")])
async def test_bad_connect_parameters_close_with_1008(base: str, query: str, code: str) -> None:
    async with connect(ws_url(base, query)) as ws:
        err = await recv_json(ws)
        assert err["type"] == "error" and err["code"] == code
        with pytest.raises(ConnectionClosed) as exc:
            await asyncio.wait_for(ws.recv(), timeout=10)
        assert exc.value.rcvd is not None and exc.value.rcvd.code == 1008


async def test_client_reports_bad_rate_at_open(base: str) -> None:
    from stages.tts.types import TtsError

    client = TtsClient(base)
    with pytest.raises(TtsError) as exc:
        await client.open_stream(sample_rate=11025)
    assert exc.value.code == "unsupported_sample_rate"
    with pytest.raises(TtsError, match="empty"):
        await client.speech("  ")
    await client.aclose()


async def test_vanishing_client_is_cleaned_up(base: str) -> None:
    ws = await connect(ws_url(base))
    assert (await recv_json(ws))["type"] == "ready"
    await ws.send(json.dumps({"type": "text", "text": TEXT * 3}))
    await ws.send(json.dumps({"type": "flush"}))
    assert (await recv_json(ws))["type"] == "chunk"
    assert ws.transport is not None
    ws.transport.abort()  # vanish without a close handshake
    client = TtsClient(base)
    chunks = await client.synthesize("Another stream works.")
    await client.aclose()
    assert "".join(c.text for c in chunks) == "Another stream works."
    async with httpx.AsyncClient(base_url=base) as http:
        # Poll until cleaned up; the bound is a hang guard (a loaded CPU finishes the
        # stream's decode/synthesis in flight first), not a speed requirement.
        for _ in range(600):
            metrics = (await http.get("/metrics")).text
            if "cascade_tts_active_streams 0.0" in metrics:
                break
            await asyncio.sleep(0.1)
    assert "cascade_tts_active_streams 0.0" in metrics


def _openai(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def test_openai_client_wav_and_pcm(base: str) -> None:
    client = _openai(base)
    wav = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello from piper.",
                                     response_format="wav")
    with wave.open(io.BytesIO(wav.content)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        seconds = w.getnframes() / 24000
    assert 0.5 < seconds < 5
    pcm = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello from piper.",
                                     response_format="pcm", speed=1.5)
    assert len(pcm.content) % 2 == 0
    assert 0.3 < len(pcm.content) / 2 / 24000 < seconds  # faster speech, raw 24 kHz


def test_openai_bad_requests(base: str) -> None:
    client = _openai(base)
    with pytest.raises(openai.BadRequestError) as exc:
        client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.",
                                   response_format="mp3")
    assert "wav" in str(exc.value) and "pcm" in str(exc.value)
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.audio.speech.create(model="tts-1", voice="alloy", input="", response_format="wav")
    with pytest.raises(openai.BadRequestError, match="too long"):
        client.audio.speech.create(model="tts-1", voice="alloy", input="word " * 500,
                                   response_format="wav")
    with pytest.raises(openai.BadRequestError, match="speed"):
        client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.",
                                   response_format="wav", speed=10.0)
    with pytest.raises(openai.BadRequestError, match="voice"):
        client.audio.speech.create(model="tts-1", voice="nobody", input="Hi.",
                                   response_format="wav")


def test_http_errors_and_common_routes(base: str) -> None:
    big = httpx.post(base + "/v1/audio/speech", content=b"x" * (MAX_BYTES + 1),
                     headers={"content-type": "application/json"})
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "payload_too_large"
    bad = httpx.post(base + "/v1/audio/speech", content=b"{oops",
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "error" in bad.json()
    missing = httpx.post(base + "/v1/audio/speech", json={"model": "tts-1"})
    assert missing.status_code == 400 and "input" in missing.json()["error"]["message"]
    assert httpx.get(base + "/healthz").json()["stage"] == "tts"
    assert httpx.get(base + "/readyz").status_code == 200
    metrics = httpx.get(base + "/metrics").text
    for name in ("cascade_tts_ttfa_seconds", "cascade_tts_synth_seconds",
                 "cascade_tts_audio_seconds_total", "cascade_tts_active_streams"):
        assert name in metrics


async def test_stream_limit_refused_in_handshake_and_load_reported(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as http:
        for _ in range(600):  # earlier tests' streams are gone (hang guard, not a speed bound)
            if (await http.get("/load")).json()["active"] == 0:
                break
            await asyncio.sleep(0.1)
        streams = [await connect(ws_url(base)) for _ in range(MAX_STREAMS)]
        try:
            for ws in streams:
                assert (await recv_json(ws))["type"] == "ready"
            load = (await http.get("/load")).json()
            assert load == {**load, "stage": "tts", "ready": True, "active": MAX_STREAMS,
                            "capacity": MAX_STREAMS}
            with pytest.raises(InvalidStatus) as refused:
                await connect(ws_url(base))
            response = refused.value.response
            assert response.status_code == 503 and response.headers["Retry-After"] == "1"
            assert json.loads(response.body)["error"]["code"] == "too_many_streams"
            metrics = (await http.get("/metrics")).text
            assert f'cascade_stage_active_streams{{stage="tts"}} {MAX_STREAMS}.0' in metrics
            assert 'cascade_stage_load{stage="tts"}' in metrics
        finally:
            for ws in streams:
                await ws.close()
        # A freed place is taken again.
        client = TtsClient(base)
        try:
            for _ in range(600):
                if (await http.get("/load")).json()["active"] < MAX_STREAMS:
                    break
                await asyncio.sleep(0.1)
            chunks = await client.synthesize("Room again.")
            assert "".join(c.text for c in chunks) == "Room again."
        finally:
            await client.aclose()
