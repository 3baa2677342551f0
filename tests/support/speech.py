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
