"""The ASR service as a separate process, driven over its network API (bad inputs too)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from openai import OpenAI
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from stages.asr.client import AsrClient
from stages.asr.types import AsrBackend
from stages.common.audio import wav_bytes
from stages.common.text import wer
from tests.stages.asr.helpers import check_stability, stream_clip
from tests.support.procs import stage_process
from tests.support.speech import SENTENCES, espeak_clip, piper_clip, with_silence, word_errors

MAX_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with stage_process("asr", "--set", "max_streams=2",
                       "--set", f"max_message_bytes={MAX_BYTES}") as url:
        yield url


def ws_url(base: str, query: str = "sample_rate=16000") -> str:
    return "ws" + base[len("http"):] + "/v1/stream?" + query


async def test_client_streaming_over_websocket(base_url: str) -> None:
    client = AsrClient(base_url)
    assert isinstance(client, AsrBackend)
    try:
        for text in SENTENCES[:2]:
            partials, final, _ = await stream_clip(client, with_silence(piper_clip(text)))
            assert partials and partials[0].audio_ms < final.audio_ms
            check_stability(partials, final)
            # At most one word of the 8-9 wrong: which windows a streaming decoder sees
            # depends on timing (load), and Whisper may then hear one word differently.
            assert word_errors(text, final.text) <= 1, final.text
            assert final.words and final.audio_ms > 1000
        # The same backend's one-shot path (OpenAI endpoint), at 8 kHz.
        clip = piper_clip(SENTENCES[3], 8000)
        result = await client.transcribe(clip.tobytes(), 8000)
        assert wer(SENTENCES[3], result.text) <= 0.10, result.text
        assert abs(result.audio_ms - clip.size / 8) < 50
        assert result.words[0].start < result.words[-1].end
    finally:
        await client.aclose()


async def test_streaming_at_48k_is_resampled(base_url: str) -> None:
    client = AsrClient(base_url, sample_rate=48_000)
    try:
        clip = with_silence(piper_clip(SENTENCES[2], 48_000), rate=48_000)
        partials, final, _ = await stream_clip(client, clip, rate=48_000)
        check_stability(partials, final)
        assert wer(SENTENCES[2], final.text) <= 0.10, final.text
        assert abs(final.audio_ms - clip.size / 48) < 100  # duration counted at 16 kHz
    finally:
        await client.aclose()


def test_openai_client_transcription(base_url: str) -> None:
    oa = OpenAI(base_url=base_url + "/v1", api_key="unused")
    wav = wav_bytes(espeak_clip(SENTENCES[3], 24_000), 24_000)
    result = oa.audio.transcriptions.create(model="whisper-1", file=("q.wav", wav, "audio/wav"))
    # espeak's robotic voice: tiny.en gets up to a quarter of the words wrong.
    assert wer(SENTENCES[3], result.text) <= 0.25, result.text
    verbose = oa.audio.transcriptions.create(
        model="whisper-1", file=("q.wav", wav, "audio/wav"), response_format="verbose_json",
        timestamp_granularities=["word"], language="en")
    words = verbose.words or []
    assert len(words) >= 8
    assert all(a.start <= b.start for a, b in itertools.pairwise(words))
    text = oa.audio.transcriptions.create(model="whisper-1", file=("q.wav", wav, "audio/wav"),
                                          response_format="text")
    # Plain text, the same transcript (not one exact word: any word may be misheard).
    assert isinstance(text, str) and not text.lstrip().startswith("{")
    assert wer(SENTENCES[3], text) <= 0.25, text


def test_http_bad_inputs(base_url: str) -> None:
    url = base_url + "/v1/audio/transcriptions"
    wav = wav_bytes(piper_clip(SENTENCES[0]), 16_000)
    big = httpx.post(url, files={"file": ("a.wav", b"\0" * (MAX_BYTES + 10))},
                     data={"model": "whisper-1"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"
    notwav = httpx.post(url, files={"file": ("a.wav", b"hello")}, data={"model": "x"})
    assert notwav.status_code == 400 and notwav.json()["error"]["code"] == "invalid_audio"
    odd_rate = wav_bytes(np.zeros(1000, dtype=np.int16), 11_025)
    r = httpx.post(url, files={"file": ("a.wav", odd_rate)}, data={"model": "x"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "unsupported_sample_rate"
    assert "11025" in r.json()["error"]["message"]
    r = httpx.post(url, data={"model": "x"}, files={"other": ("a", b"1")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = httpx.post(url, files={"file": ("a.wav", wav)}, data={"response_format": "srt"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    r = httpx.post(url, content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert httpx.get(base_url + "/healthz").status_code == 200


async def test_websocket_bad_inputs(base_url: str) -> None:
    # Unsupported sample rate: error event, then close 1008.
    async with connect(ws_url(base_url, "sample_rate=22050")) as ws:
        event = json.loads(await ws.recv())
        assert event["type"] == "error" and event["code"] == "unsupported_sample_rate"
        await ws.wait_closed()
        assert ws.close_code == 1008

    async with connect(ws_url(base_url, "sample_rate=fast")) as ws:
        event = json.loads(await ws.recv())
        assert event["code"] == "unsupported_sample_rate" and "fast" in event["message"]
        await ws.wait_closed()
        assert ws.close_code == 1008

    # Recoverable errors keep the stream usable; the final still arrives.
    async with connect(ws_url(base_url)) as ws:
        await ws.send(b"\x01\x02\x03")  # odd byte count
        assert json.loads(await ws.recv())["code"] == "invalid_audio"
        await ws.send("{not json")
        assert json.loads(await ws.recv())["code"] == "malformed_json"
        # found by fuzzing: these ended the stream silently (RecursionError)
        for bad in ("[" * 5000 + "]" * 5000, '{"type": "\\ud800"}'):
            await ws.send(bad)
            assert json.loads(await ws.recv())["code"] == "malformed_json"
        await ws.send('{"type": "dance"}')
        assert json.loads(await ws.recv())["code"] == "unknown_message_type"
        await ws.send('{"type": "end_of_speech", "audio_ms": -5}')
        assert "end_of_speech" in json.loads(await ws.recv())["message"]
        clip = with_silence(piper_clip(SENTENCES[1]))
        await ws.send(clip.tobytes())
        # The pause hint: decode up to the end of the speech at once (one more partial).
        await ws.send(json.dumps({"type": "end_of_speech", "audio_ms": clip.size // 16}))
        await ws.send('{"type": "finalize"}')
        events = [json.loads(m) async for m in ws]
        assert events[-1]["type"] == "final"
        assert wer(SENTENCES[1], events[-1]["text"]) <= 0.2
        assert ws.close_code == 1000

    # Oversized message: error event, then close 1009.
    async with connect(ws_url(base_url), max_size=None) as ws:
        await ws.send(b"\0" * (MAX_BYTES + 2))
        event = json.loads(await ws.recv())
        assert event["code"] == "message_too_large"
        await ws.wait_closed()
        assert ws.close_code == 1009


async def test_vanishing_client_and_stream_limit(base_url: str) -> None:
    # A client that disappears mid-stream (no close frame).
    ws = await connect(ws_url(base_url))
    await ws.send(piper_clip(SENTENCES[0])[:16000].tobytes())
    ws.transport.abort()
    # The server cleans up: the active-stream gauge returns to 0.
    async with httpx.AsyncClient(base_url=base_url) as http:
        # Poll until cleaned up; the bound is a hang guard (a loaded CPU finishes the
        # stream's decode/synthesis in flight first), not a speed requirement.
        for _ in range(600):
            metrics = (await http.get("/metrics")).text
            if "cascade_asr_active_streams 0.0" in metrics:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("stream of the vanished client was not cleaned up")
    assert "cascade_asr_decode_seconds_count" in metrics

    # max_streams=2: a third concurrent stream is refused with a clear error.
    async with connect(ws_url(base_url)) as a, connect(ws_url(base_url)) as b:
        await a.send(b"\0\0" * 160)
        await b.send(b"\0\0" * 160)
        # Both streams are open on the server (not "0.2 s have passed": a loaded machine
        # may not have run the server's handlers by then).
        async with httpx.AsyncClient(base_url=base_url) as http:
            for _ in range(600):
                if "cascade_asr_active_streams 2.0" in (await http.get("/metrics")).text:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the two streams never showed as active")
        # Refused in the handshake (503 + Retry-After + a JSON reason): a client learns it
        # at connect time and can try another replica at once.
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(base_url)):
                pass
        response = refused.value.response
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert json.loads(response.body)["error"]["code"] == "too_many_streams"
        async with httpx.AsyncClient(base_url=base_url) as http:
            load = (await http.get("/load")).json()
            ready = (await http.get("/readyz")).json()
        assert load["stage"] == "asr" and load["ready"] is True
        assert load["active"] == 2 and load["capacity"] == 2
        assert ready["load"]["active"] == 2
        await a.send('{"type": "close"}')
        await b.send('{"type": "close"}')

    # And the service still serves a full stream afterwards.
    client = AsrClient(base_url)
    try:
        _, final, _ = await stream_clip(client, with_silence(piper_clip(SENTENCES[3])),
                                        speed=4.0)
        assert wer(SENTENCES[3], final.text) <= 0.10, final.text
    finally:
        await client.aclose()
