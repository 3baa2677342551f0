from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.v2v import corpus
from benchmarks.v2v.corpus import RATE, builtin_corpus, voiced_span, wav_clip
from benchmarks.v2v.options import BUILTIN_CLIPS
from stages.asr.engine import WhisperAsr
from stages.asr.settings import AsrSettings
from stages.common.audio import wav_bytes
from tests.support.speech import near_word_errors


def _tone(seconds: float, amp: float = 8000.0) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (amp * np.sin(2 * np.pi * 220 * t)).astype(np.int16)


def test_voiced_span_finds_speech_within_room_noise() -> None:
    rng = np.random.default_rng(0)

    def noise(seconds: float) -> np.ndarray[Any, Any]:
        return rng.normal(0, 30, round(seconds * RATE)).astype(np.int16)

    pcm = np.concatenate([noise(0.5), _tone(1.0), noise(0.8)])
    start, end = voiced_span(pcm)
    assert abs(start - 0.5 * RATE) <= RATE // 100
    assert abs(end - 1.5 * RATE) <= RATE // 100
    assert voiced_span(np.zeros(RATE, np.int16)) == (0, 0)


def test_wav_clip_resamples_and_finds_the_end(tmp_path: Path) -> None:
    pcm16k = np.concatenate([np.zeros(8000, np.int16),
                             _tone(0.7)[: round(0.7 * 16000)],
                             np.zeros(16000, np.int16)])
    path = tmp_path / "me.wav"
    path.write_bytes(wav_bytes(pcm16k, 16000))
    clip = wav_clip(path, "hello")
    assert clip.pcm.size == pytest.approx(RATE * pcm16k.size / 16000, abs=2)
    assert clip.info.speech_end_ms == pytest.approx(1200, abs=15)
    assert clip.info.name == "me" and clip.info.text == "hello"


def test_silent_or_broken_wavs_are_refused(tmp_path: Path) -> None:
    silent = tmp_path / "silent.wav"
    silent.write_bytes(wav_bytes(np.zeros(16000, np.int16), 16000))
    with pytest.raises(ValueError, match="no speech"):
        wav_clip(silent)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really")
    with pytest.raises(ValueError):
        wav_clip(broken)


def test_option_default_lists_every_builtin_clip() -> None:
    assert BUILTIN_CLIPS.split(",") == [p.name for p in corpus.BUILTIN]
    with pytest.raises(ValueError, match="unknown"):
        builtin_corpus(["nope"])


@pytest.mark.slow
async def test_builtin_corpus_is_synthesized_once_cached_and_intelligible(
        tmp_path: Path) -> None:
    clips = builtin_corpus(cache=tmp_path)
    by_name = {c.info.name: c for c in clips}
    assert set(by_name) == {"question", "command", "long", "pause"}
    long = by_name["long"].info
    assert 8000 <= long.speech_end_ms <= 10500, long.speech_end_ms
    pause = by_name["pause"]
    assert len(pause.info.pauses_ms) == 1
    at = round(pause.info.pauses_ms[0] * RATE / 1000)
    assert not pause.pcm[at: at + round(0.4 * RATE)].any()  # the planted pause is silent
    assert pause.pcm[at - RATE // 50: at].any() and pause.pcm[at + round(0.4 * RATE):].any()
    for clip in clips:
        assert 0 < clip.info.speech_end_ms <= clip.info.duration_ms
    assert len(os.listdir(tmp_path)) == 8  # a WAV and a JSON per clip
    again = builtin_corpus(["pause"], cache=tmp_path)[0]
    assert np.array_equal(again.pcm, pause.pcm) and again.info == pause.info

    asr = WhisperAsr(AsrSettings())
    try:
        for clip in clips:
            heard = await asr.transcribe(clip.pcm.tobytes(), RATE)
            assert clip.info.text is not None
            # One word (or 15 % of a long clip) may differ: a short clip has 6 words.
            allowed = max(1, round(0.15 * len(clip.info.text.split())))
            assert near_word_errors(clip.info.text, heard.text) <= allowed, (
                clip.info.text, heard.text)
    finally:
        await asr.aclose()
