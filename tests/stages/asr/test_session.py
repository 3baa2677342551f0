"""Streaming session logic with a fake decoder (no model): pacing, backpressure, reuse."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stages.asr.session import StreamClosedError, StreamConfig, WhisperStream
from stages.asr.types import AsrWord
from stages.common.audio import Float32Array

TEXT = "one two three four five six seven eight nine ten".split()
WORD_S = 0.4  # the fake speaker says one word every 0.4 s


class FakeDecoder:
    """Transcribes 'loud' audio as the words of TEXT spoken back to back from t=0."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.prompts: list[str | None] = []

    async def __call__(self, audio: Float32Array, prompt: str | None, language: str | None,
                       kind: str) -> list[AsrWord]:
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.prompts.append(prompt)
        try:
            await asyncio.sleep(self.delay)
            # The window may start mid-"stream": words are recovered from the amplitude
            # marker each word's audio carries (word index i -> amplitude (i+1)/100).
            out: list[AsrWord] = []
            step = int(WORD_S * 16000)
            for k in range(audio.size // step):  # only complete words are heard
                seg = audio[k * step : (k + 1) * step]
                idx = round(float(np.max(np.abs(seg))) * 100) - 1
                if 0 <= idx < len(TEXT):
                    end = (k + 1) * WORD_S
                    word = TEXT[idx] + ("." if idx == len(TEXT) - 1 else "")
                    out.append(AsrWord(word=" " + word, start=end - WORD_S, end=end,
                                       probability=0.9))
            return out
        finally:
            self.in_flight -= 1


def speech(n_words: int) -> bytes:
    step = int(WORD_S * 16000)
    out = np.concatenate([np.full(step, (i + 1) * 327.68, dtype=np.float32)
                          for i in range(n_words)])
    return out.astype(np.int16).tobytes()


def config(**kw: float) -> StreamConfig:
    base: dict[str, float] = {"decode_interval_s": 0.01, "min_decode_audio_s": 0.1,
                              "max_window_s": 4.0, "trim_window_s": 1.0}
    base.update(kw)
    return StreamConfig(**base)  # type: ignore[arg-type]


async def test_partials_then_final_with_one_decode_in_flight() -> None:
    dec = FakeDecoder()
    stream = WhisperStream(dec, config())
    seen = []

    async def read() -> None:
        async for p in stream.partials():
            seen.append(p)

    reader = asyncio.create_task(read())
    audio = speech(10)
    step = 3200  # 100 ms
    for i in range(0, len(audio), step):
        await stream.push(audio[i : i + step])
        await asyncio.sleep(0.01)
    final = await stream.finalize()
    await reader
    assert final.text == " ".join(TEXT) + "."
    assert dec.max_in_flight == 1
    assert seen, "no partial before the final"
    prev = ""
    for p in seen:
        assert p.stable.startswith(prev)
        prev = p.stable
    assert final.text.startswith(prev)
    assert final.audio_ms == 4000
    # The window was cut after committed words, and their text went into the prompt.
    assert any(p and p.startswith("one") for p in dec.prompts)


async def test_finalize_reuses_hypothesis_after_silence() -> None:
    dec = FakeDecoder()
    stream = WhisperStream(dec, config())
    await stream.push(speech(3))
    await stream.push(np.zeros(8000, dtype=np.int16).tobytes())  # 0.5 s silence
    # Wait until a decode has covered the whole window (including the silence).
    async for p in stream.partials():
        if p.audio_ms == stream.audio_ms:
            break
    calls = dec.calls
    await stream.push(np.zeros(4000, dtype=np.int16).tobytes())  # more silence
    final = await stream.finalize()
    assert dec.calls == calls, "finalize decoded again although only silence followed"
    assert final.text == "one two three"


async def test_finalize_decodes_new_speech() -> None:
    dec = FakeDecoder(delay=0.0)
    stream = WhisperStream(dec, config(decode_interval_s=10.0))  # no partial decode soon
    await stream.push(speech(2))
    final = await stream.finalize()
    assert final.text == "one two"
    assert dec.calls >= 1


async def test_backpressure_when_window_is_full() -> None:
    dec = FakeDecoder(delay=0.2)
    stream = WhisperStream(dec, config(max_window_s=1.0))  # capacity 1 s + 5 s slack
    big = np.full(16000 * 8, 1000, dtype=np.int16).tobytes()  # 8 s, no recognizable word
    task = asyncio.create_task(stream.push(big))
    await asyncio.sleep(0.05)
    assert not task.done(), "push of more than the window capacity returned at once"
    await asyncio.wait_for(task, timeout=10)  # forced trims make room eventually
    assert stream.window_seconds <= 6.0
    await stream.aclose()


async def test_empty_stream_and_misuse() -> None:
    dec = FakeDecoder()
    stream = WhisperStream(dec, config())
    final = await stream.finalize()
    assert final.text == "" and final.words == [] and dec.calls == 0
    assert await stream.finalize() is final  # idempotent
    with pytest.raises(StreamClosedError):
        await stream.push(b"\x00\x00")
    items = [p async for p in stream.partials()]
    assert items == []
    await stream.aclose()


async def test_silence_after_the_speech_is_not_decoded() -> None:
    dec = FakeDecoder(delay=0.05)
    stream = WhisperStream(dec, config())
    await stream.push(speech(3))
    async for p in stream.partials():  # a decode covering all the speech has finished
        if p.audio_ms == stream.audio_ms:
            break
    calls = dec.calls
    for _ in range(10):  # 1 s of silence in 100 ms pushes, well past the decode interval
        await stream.push(np.zeros(1600, dtype=np.int16).tobytes())
        await asyncio.sleep(0.02)
    assert dec.calls == calls and dec.in_flight == 0  # the CPU stays free for the reply
    final = await stream.finalize()
    assert dec.calls == calls
    assert final.text == "one two three"
    # Speech after the silence is decoded again.
    stream2 = WhisperStream(dec, config())
    await stream2.push(speech(2))
    await stream2.push(np.zeros(3200, dtype=np.int16).tobytes())
    await stream2.push(speech(3)[2 * 6400:])
    final2 = await stream2.finalize()
    assert final2.text.endswith("three")


async def test_end_of_speech_decodes_at_once_and_finalize_reuses_that_decode() -> None:
    dec = FakeDecoder(delay=0.0)
    stream = WhisperStream(dec, config(decode_interval_s=30.0))  # no scheduled decode soon
    await stream.push(speech(3))
    await asyncio.sleep(0.05)
    first = dec.calls  # at most the first decode (the interval counts from it)
    await stream.push(speech(1)[:3200])  # a little more audio: still no scheduled decode
    await asyncio.sleep(0.05)
    assert dec.calls == first
    await stream.push(np.zeros(1600, dtype=np.int16).tobytes())  # 100 ms of pause
    await stream.end_of_speech(1200 + 100)  # the VAD heard the pause after 1.3 s
    async for p in stream.partials():
        if p.audio_ms >= 1300:
            break
    assert dec.calls == first + 1  # decoded at once, not 30 s later
    calls = dec.calls
    await stream.push(np.zeros(6400, dtype=np.int16).tobytes())  # the rest of the silence
    final = await stream.finalize()
    assert dec.calls == calls  # the pause's decode was the final one
    assert final.text == "one two three"


async def test_end_of_speech_already_covered_is_a_no_op() -> None:
    dec = FakeDecoder(delay=0.0)
    stream = WhisperStream(dec, config(decode_interval_s=30.0))
    await stream.push(speech(2))
    async for p in stream.partials():
        if p.audio_ms == stream.audio_ms:
            break
    calls = dec.calls
    await stream.end_of_speech(500)  # inside what the last decode heard
    await asyncio.sleep(0.05)
    assert dec.calls == calls
    await stream.aclose()
    await stream.end_of_speech(900)  # after close: ignored, no error
