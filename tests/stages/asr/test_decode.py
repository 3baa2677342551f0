"""Short-context decoding: context buckets, the restart guard, and the real model's words."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pytest
from faster_whisper import WhisperModel

from stages.asr.decode import context_seconds, cut_restart, decode_windows
from stages.asr.engine import load_model
from stages.asr.settings import AsrSettings
from stages.common.audio import ASR_RATE, pcm16_to_float
from stages.common.text import wer
from tests.support.speech import SENTENCES, piper_clip


def test_context_buckets() -> None:
    assert context_seconds(2 * ASR_RATE, 10.0) == 10.0
    assert context_seconds(9 * ASR_RATE, 10.0) == 10.0  # 9 s + 1 s of silence fits
    assert context_seconds(int(9.5 * ASR_RATE), 10.0) == 15.0
    assert context_seconds(3 * ASR_RATE, 5.0) == 5.0
    assert context_seconds(4 * ASR_RATE + 1, 5.0) == 10.0
    assert context_seconds(29 * ASR_RATE, 10.0) == 30.0  # never beyond what Whisper hears
    assert context_seconds(ASR_RATE, 30.0) == 30.0  # 30: faster-whisper's own behaviour


@pytest.mark.parametrize(("words", "keep"), [
    (["Yes", "yes", "yes", "yes"], 1),
    (["Set", "a", "timer.", "Set", "a", "timer.", "Set"], 3),
    (["Play", "some", "jazz", "please.", "Place", "some", "jazz"], 7),  # not a restart
    (["Play", "some", "jazz", "please.", "Play", "some", "jazz", "music"], 4),
    (["I", "said", "very", "very", "good."], 5),  # a repeated word inside is speech
    (["No,", "no."], 1),
    (["What", "is", "it?", "What", "time", "is", "it?"], 7),  # one shared word: speech
    ([], 0),
])
def test_cut_restart(words: list[str], keep: int) -> None:
    assert cut_restart(words) == keep


@pytest.fixture(scope="module")
def model() -> Iterator[WhisperModel]:
    yield load_model(AsrSettings())


def test_short_context_hears_what_the_full_context_hears(model: WhisperModel) -> None:
    clips = [pcm16_to_float(piper_clip(t)) for t in SENTENCES]
    short = decode_windows(model, [(c, None) for c in clips], "en", 1, 10.0)
    full = decode_windows(model, [(c, None) for c in clips], "en", 1, 30.0)
    for text, s, f in zip(SENTENCES, short, full, strict=True):
        heard = "".join(w.word for w in s)
        assert wer(text, heard) <= 0.15, heard
        assert wer(text, "".join(w.word for w in f)) <= 0.15
        # No restart survives: every word is heard once, inside the audio.
        assert len(s) <= len(text.split()) + 1, heard
    for clip, words in zip(clips, short, strict=True):
        duration = clip.size / ASR_RATE
        assert words and all(0.0 <= w.start <= w.end <= duration + 0.1 for w in words)
        assert all(a.start <= b.start for a, b in itertools.pairwise(words))


def test_prompt_and_batch_of_unequal_windows(model: WhisperModel) -> None:
    one = pcm16_to_float(piper_clip(SENTENCES[1]))
    # A long window and a short one share a batch: the batch takes the longer bucket.
    long = np.concatenate([pcm16_to_float(piper_clip(t)) for t in SENTENCES[:3]])
    prompt = "We were talking about the house."  # text before the window
    out = decode_windows(model, [(one, prompt), (long, None), (np.zeros(ASR_RATE,
                         dtype=np.float32), None)], "en", 1, 10.0)
    assert wer(SENTENCES[1], "".join(w.word for w in out[0])) <= 0.15
    assert wer(" ".join(SENTENCES[:3]), "".join(w.word for w in out[1])) <= 0.2
    assert out[2] == [] or all(w.probability < 0.5 for w in out[2])  # silence: no words
