"""Spoken test clips from known sentences: piper (joe voice) and espeak-ng.

Made directly with the engines' libraries (piper through ``benchmarks.speech``), not
through the stages under test, and
cached per process so a test session synthesizes each sentence once.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile

import numpy as np

from benchmarks.speech import piper_speech
from stages.common.audio import Int16Array, float_to_pcm16, read_wav, resample
from stages.common.text import normalize, wer

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please turn on the lights in the kitchen.",
    "What time does the train to Boston leave tomorrow morning?",
    "I would like to book a table for four people at seven.",
)


@functools.cache
def piper_clip(text: str, rate: int = 16_000) -> Int16Array:
    """``text`` spoken by piper's joe voice, mono pcm16 at ``rate``. No sampling noise:
    the same sentence is the same audio in every run, so a failure is reproducible."""
    return piper_speech(text, rate)


@functools.cache
def espeak_clip(text: str, rate: int = 16_000) -> Int16Array:
    """``text`` spoken by espeak-ng (apt package), mono pcm16 at ``rate``."""
    fd, path = tempfile.mkstemp(suffix=".wav")
    os.close(fd)
    try:
        subprocess.run(["espeak-ng", "-s", "150", "-w", path, text], check=True,
                       capture_output=True, timeout=30)
        with open(path, "rb") as f:
            samples, src_rate = read_wav(f.read())
    finally:
        os.unlink(path)
    return float_to_pcm16(resample(samples, src_rate, rate))


def with_silence(samples: Int16Array, rate: int = 16_000, before_s: float = 0.3,
                 after_s: float = 0.7) -> Int16Array:
    pad_a = np.zeros(int(before_s * rate), dtype=np.int16)
    pad_b = np.zeros(int(after_s * rate), dtype=np.int16)
    return np.concatenate([pad_a, samples, pad_b])


# --- What a listener heard: tolerant comparison of model transcripts ---------------------
#
# A transcript is a model's output: Whisper's decoding (ctranslate2), the audio it decodes
# (piper on onnxruntime) and, in streaming, which windows get decoded all shift a little
# with the CPU's instruction set (AVX2 vs AVX-512), thread scheduling and load. A test
# that compares transcripts exactly fails on a loaded or different machine although
# nothing is wrong. Tests therefore bound the error with a stated tolerance instead.


def char_distance(a: str, b: str) -> float:
    """Edit distance between two words over the longer one's length (0 same, 1 unrelated)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1] / max(1, len(a), len(b))


def same_word(heard: str, said: str, tolerance: float = 0.4) -> bool:
    """``heard`` is ``said`` up to an ending: "jump", "jumped" for "jumps" (<= 40 % of the
    letters differ), not a different word ("over", "fox"). Both are normalized words."""
    return char_distance(heard, said) <= tolerance


def word_errors(reference: str, hypothesis: str) -> int:
    """Word substitutions + insertions + deletions between the normalized texts."""
    return round(wer(reference, hypothesis) * max(1, len(normalize(reference))))


def near_word_errors(reference: str, hypothesis: str) -> int:
    """Like ``word_errors``, but a word heard with another ending (``same_word``) counts
    as right: a cut, a sibilant lost at 8 kHz or a tense flip is not a different word."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (not same_word(h, r)))
            prev, d[j] = d[j], cur
    return d[len(hyp)]
