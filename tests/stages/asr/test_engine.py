"""The in-process engine with the real tiny.en model: streaming accuracy and behaviour."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

import numpy as np
import pytest

from stages.asr.engine import WhisperAsr
from stages.asr.settings import AsrSettings
from stages.asr.types import AsrBackend, AsrStream
from stages.common.audio import AudioFormatError
from stages.common.metrics import ASR_DECODE_SECONDS
from stages.common.text import wer
from tests.stages.asr.helpers import check_stability, silence, stream_clip
from tests.support.speech import SENTENCES, espeak_clip, piper_clip, with_silence, word_errors

# Streaming WER depends on keeping up with real time: not beside another worker.
pytestmark = pytest.mark.serial


@pytest.fixture(scope="module")
def asr() -> Iterator[WhisperAsr]:
    engine = WhisperAsr(AsrSettings())
    yield engine
    asyncio.run(engine.aclose())


async def test_engine_implements_backend(asr: WhisperAsr) -> None:
    assert isinstance(asr, AsrBackend)
    stream = await asr.open_stream()
    assert isinstance(stream, AsrStream)
    await stream.aclose()
    await stream.aclose()  # idempotent
    assert asr.active_streams == 0


async def _stream_all(asr: WhisperAsr, clips: list[np.ndarray]) -> list[float]:
    # Two streams at a time: concurrent streams share the one model.
    wers = []
    for i in range(0, len(clips), 2):
        results = await asyncio.gather(*(stream_clip(asr, c) for c in clips[i : i + 2]))
        for (partials, final, _), text in zip(results, SENTENCES[i : i + 2], strict=True):
            assert partials, "no partial before the final"
            assert any(p.audio_ms < final.audio_ms for p in partials), "partials only at end"
            check_stability(partials, final)
            wers.append(wer(text, final.text))
    return wers


async def test_streaming_piper_wer(asr: WhisperAsr) -> None:
    clips = [with_silence(piper_clip(t)) for t in SENTENCES]
    wers = await _stream_all(asr, clips)
    assert sum(wers) / len(wers) <= 0.10, wers


async def test_streaming_espeak_wer(asr: WhisperAsr) -> None:
    clips = [with_silence(espeak_clip(t)) for t in SENTENCES]
    wers = await _stream_all(asr, clips)
    # tiny.en mishears espeak-ng's robotic voice even offline (~16 % WER on these clips:
    # "quick round fox", "train turn last"), so <= 10 % is out of reach for any streaming
    # scheme with this model. Streaming must stay close to a whole-file decode of the
    # same clips: at most 10 points worse (measured: 0-5 points).
    offline = [wer(t, (await asr.transcribe(c.tobytes())).text)
               for t, c in zip(SENTENCES, clips, strict=True)]
    mean, mean_off = sum(wers) / len(wers), sum(offline) / len(offline)
    assert mean <= max(0.10, mean_off + 0.10), (wers, offline)


async def test_finalize_after_silence_does_not_decode(asr: WhisperAsr) -> None:
    stream = await asr.open_stream()
    await stream.push(with_silence(piper_clip(SENTENCES[1]), after_s=0.8).tobytes())
    async for p in stream.partials():  # wait for a decode covering all pushed audio
        if p.audio_ms == stream.audio_ms:
            break
    before = stream.decodes
    await stream.push(silence(0.3).tobytes())  # VAD-style trailing silence
    final = await stream.finalize()
    # "Nearly free" is checked as "no model call", not as a wall-clock bound that a loaded
    # machine breaks: a finalize that decoded would have counted a decode.
    assert stream.decodes == before
    assert final.finalize_ms >= 0.0
    # One unconfirmed hypothesis: at most one of the 8 words wrong.
    assert word_errors(SENTENCES[1], final.text) <= 1, final.text


async def test_long_turn_keeps_window_short(asr: WhisperAsr) -> None:
    """The window is cut after committed words, so it never holds the whole turn.

    The audio arrives at 2x real time, but never more than ``MAX_LAG_MS`` ahead of the
    latest decode: on a loaded CPU decodes take longer and a free-running sender would
    pile up audio faster than any trimming can remove it. That tests the machine's speed,
    not the trimming; with the lag bounded the window depends only on the policy.
    """
    max_lag_ms = 2000  # on an idle 2-core machine the lag stays below this by itself
    turn = np.concatenate([piper_clip(t) for t in SENTENCES] + [silence(0.5)])
    assert turn.size / 16000 > 10
    stream = await asr.open_stream()
    windows = []
    decoded_ms = 0
    progress = asyncio.Event()

    async def read() -> None:
        nonlocal decoded_ms
        async for p in stream.partials():
            windows.append(stream.window_seconds)
            decoded_ms = p.audio_ms
            progress.set()

    reader = asyncio.create_task(read())
    step = 1600
    for i in range(0, turn.size, step):
        while stream.audio_ms - decoded_ms > max_lag_ms:
            progress.clear()
            await asyncio.wait_for(progress.wait(), timeout=120)
        await stream.push(turn[i : i + step].tobytes())
        await asyncio.sleep(0.05)  # 2x real time
    final = await stream.finalize()
    await reader
    assert wer(" ".join(SENTENCES), final.text) <= 0.10, final.text
    # Trimmed after committed words: the window never holds the whole turn.
    assert windows and max(windows) < 0.7 * turn.size / 16000, windows
    # Word times are relative to the stream start, in order, within the audio.
    starts = [w.start for w in final.words]
    assert all(b >= a - 0.05 for a, b in itertools.pairwise(starts)), starts
    assert final.words[-1].end <= turn.size / 16000 + 0.5


async def test_transcribe_file_at_other_rates(asr: WhisperAsr) -> None:
    for rate in (8000, 48000):
        clip = piper_clip(SENTENCES[0], rate)
        result = await asr.transcribe(clip.tobytes(), rate)
        # At most one of the 9 words wrong: 8 kHz audio has no energy above 4 kHz, where
        # the "s" of "jumps" lives, and Whisper's int8 kernels differ by CPU ("jump").
        assert word_errors(SENTENCES[0], result.text) <= 1, result.text
        assert abs(result.audio_ms - clip.size * 1000 / rate) < 50
        assert result.words and result.words[0].start < result.words[-1].end
    with pytest.raises(AudioFormatError):
        await asr.transcribe(b"\x00\x00" * 100, 11025)
    with pytest.raises(AudioFormatError):
        await asr.transcribe(b"\x00\x00\x00", 16000)


async def test_silent_stream_gives_empty_final_without_decoding(asr: WhisperAsr) -> None:
    stream = await asr.open_stream()
    await stream.push(silence(0.3).tobytes())
    final = await stream.finalize()
    assert final.text == ""
    assert stream.decodes == 0


async def test_cross_stream_batching_mode(asr: WhisperAsr) -> None:
    # Same model, batched decodes: two concurrent streams decoded in shared batches.
    batched = WhisperAsr(AsrSettings(batch_decodes=True), model=asr.model)
    try:
        clips = [with_silence(piper_clip(t)) for t in SENTENCES[2:]]
        results = await asyncio.gather(*(stream_clip(batched, c) for c in clips))
        for (partials, final, _), text in zip(results, SENTENCES[2:], strict=True):
            check_stability(partials, final)
            assert wer(text, final.text) <= 0.10, final.text
        count = ASR_DECODE_SECONDS.labels("batch")._sum
        assert count.get() > 0
    finally:
        await batched.aclose()
