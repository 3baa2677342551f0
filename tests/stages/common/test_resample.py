"""The stream resamplers: int16 in and out gives what the float path gives."""

from __future__ import annotations

import numpy as np

from stages.common.audio import (
    Pcm16StreamResampler,
    StreamResampler,
    float_to_pcm16,
    pcm16_to_float,
)


def test_pcm16_stream_matches_the_float_stream_within_one_step() -> None:
    t = np.arange(24_000) / 24_000
    pcm = (np.sin(2 * np.pi * 440 * t) * 12_000).astype(np.int16)
    f = StreamResampler(24_000, 16_000)
    i = Pcm16StreamResampler(24_000, 16_000)
    via_float = [float_to_pcm16(f.process(pcm16_to_float(pcm[k:k + 480])))
                 for k in range(0, pcm.size, 480)]
    direct = [i.process(pcm[k:k + 480]) for k in range(0, pcm.size, 480)]
    a, b = np.concatenate(via_float), np.concatenate(direct)
    assert b.dtype == np.int16 and a.size == b.size > 15_000
    assert int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max()) <= 2


def test_same_rate_passes_through() -> None:
    pcm = np.arange(480, dtype=np.int16)
    assert Pcm16StreamResampler(16_000, 16_000).process(pcm) is pcm
