"""Silero VAD library: probabilities, chunking invariance, stream isolation, segmentation."""

from __future__ import annotations

import numpy as np
import pytest

from stages.common.audio import AudioFormatError
from stages.vad import SileroVadModel, SpeechEnd, SpeechStart, VadFrame, VadSegmenter, VadStream
from tests.support.speech import SENTENCES, piper_clip, with_silence

RATE = 16_000


@pytest.fixture(scope="module")
def model() -> SileroVadModel:
    return SileroVadModel()


def _voiced_extent(clip: np.ndarray) -> tuple[int, int]:
    loud = np.nonzero(np.abs(clip.astype(np.int32)) > 500)[0]
    return int(loud[0]), int(loud[-1])


def test_probability_high_in_speech_low_in_silence(model: SileroVadModel) -> None:
    speech = piper_clip(SENTENCES[1], RATE)
    clip = with_silence(speech, RATE, before_s=1.0, after_s=1.0)
    frames = VadStream(model).process(clip)
    assert len(frames) == len(clip) // 512
    assert all(f.end_sample - f.start_sample == 512 for f in frames)
    lo, hi = _voiced_extent(clip)
    silent = [f.probability for f in frames
              if f.end_sample < lo - 1600 or f.start_sample > hi + 3200]
    voiced = [f.probability for f in frames if f.start_sample >= lo and f.end_sample <= hi]
    assert len(silent) > 30 and len(voiced) > 30
    assert max(silent) < 0.2
    assert float(np.median(voiced)) > 0.8
    assert sum(p > 0.5 for p in voiced) / len(voiced) > 0.8


def test_random_chunking_gives_identical_probabilities(model: SileroVadModel) -> None:
    clip = with_silence(piper_clip(SENTENCES[0], RATE), RATE)
    whole = VadStream(model).process(clip)
    rng = np.random.default_rng(7)
    stream = VadStream(model)
    chunked: list[VadFrame] = []
    pos = 0
    while pos < len(clip):
        n = int(rng.integers(1, 2000))
        piece = clip[pos : pos + n]
        # mix the accepted encodings: int16 arrays, raw pcm16 bytes, float32
        kind = pos % 3
        if kind == 0:
            chunked += stream.process(piece)
        elif kind == 1:
            chunked += stream.process(piece.tobytes())
        else:
            chunked += stream.process(piece.astype(np.float32) / 32768.0)
        pos += n
    assert chunked == whole
    assert stream.samples_received == len(clip)


def test_interleaved_streams_do_not_disturb_each_other(model: SileroVadModel) -> None:
    a = with_silence(piper_clip(SENTENCES[2], RATE), RATE)
    b = np.zeros(len(a), dtype=np.int16)  # silence: a leaked state would show up here
    ref_a = VadStream(model).process(a)
    ref_b = VadStream(model).process(b)
    sa, sb = VadStream(model), VadStream(model)
    out_a: list[VadFrame] = []
    out_b: list[VadFrame] = []
    for pos in range(0, len(a), 700):
        out_a += sa.process(a[pos : pos + 700])
        out_b += sb.process(b[pos : pos + 700])
    assert out_a == ref_a
    assert out_b == ref_b
    assert max(f.probability for f in out_b) < 0.2


def _segments(model: SileroVadModel, clip: np.ndarray) -> list[tuple[int, int]]:
    seg = VadSegmenter(threshold=0.5, min_speech_ms=250, min_silence_ms=300)
    stream = VadStream(model)
    events = []
    for pos in range(0, len(clip), 1000):
        events += seg.process(stream.process(clip[pos : pos + 1000]))
    events += seg.flush()
    # events alternate start/end, starting with a start
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd] * (len(events) // 2)
    for e in events:
        assert e.sample <= e.reported_at
    return [(events[i].sample, events[i + 1].sample) for i in range(0, len(events), 2)]


def test_segmenter_finds_one_segment_covering_padded_clip(model: SileroVadModel) -> None:
    clip = with_silence(piper_clip(SENTENCES[0], RATE), RATE, before_s=0.5, after_s=1.0)
    lo, hi = _voiced_extent(clip)
    segs = _segments(model, clip)
    assert len(segs) == 1
    start, end = segs[0]
    assert lo - 0.25 * RATE <= start <= lo + 0.1 * RATE
    assert hi - 0.1 * RATE <= end <= hi + 0.4 * RATE


def test_segmenter_splits_on_600ms_pause(model: SileroVadModel) -> None:
    first = piper_clip(SENTENCES[1], RATE)
    second = piper_clip(SENTENCES[3], RATE)
    pause = np.zeros(int(0.6 * RATE), dtype=np.int16)
    clip = with_silence(np.concatenate([first, pause, second]), RATE, 0.5, 1.0)
    segs = _segments(model, clip)
    assert len(segs) == 2
    boundary = int(0.5 * RATE) + len(first) + len(pause) // 2
    assert segs[0][1] < boundary < segs[1][0]


def test_segmenter_ignores_short_blips() -> None:
    seg = VadSegmenter(threshold=0.5, min_speech_ms=250, min_silence_ms=300)
    probs = [0.0] * 5 + [0.9] * 3 + [0.0] * 10 + [0.9] * 10 + [0.4] * 3 + [0.9] * 2 + [0.0] * 12
    frames = [VadFrame(i * 512, (i + 1) * 512, p) for i, p in enumerate(probs)]
    events = seg.process(frames)
    # the 3-frame (96 ms) blip is dropped; the 0.4 dip sits between the thresholds
    assert events == [SpeechStart(18 * 512, 26 * 512), SpeechEnd(33 * 512, 43 * 512)]


def test_bad_audio_is_rejected(model: SileroVadModel) -> None:
    stream = VadStream(model)
    with pytest.raises(AudioFormatError):
        stream.process(b"\x00\x01\x02")  # odd byte count
    with pytest.raises(AudioFormatError):
        stream.process(np.zeros((2, 512), dtype=np.float32))
    with pytest.raises(AudioFormatError):
        stream.process(np.zeros(512, dtype=np.float64))  # type: ignore[arg-type]
    with pytest.raises(AudioFormatError):
        VadStream(model, sample_rate=8000)
    assert stream.samples_received == 0
    with pytest.raises(ValueError):
        VadSegmenter(threshold=0.3, neg_threshold=0.6)
