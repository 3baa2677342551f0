"""The reply read off a received WebRTC track: first audio, sound and gaps on scripted
frames with exact clocks and timestamps."""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.v2v.received import (
    RTP_WRAP,
    TrackLog,
    level,
    reply_audio,
    zero_edges,
)

FRAME = 960  # 20 ms at 48 kHz
RATE = 48_000


def _frame(amplitude: int, lead: int = 0, trail: int = 0) -> np.ndarray[Any, Any]:
    """Interleaved stereo: ``amplitude`` in the middle, zeros at the edges."""
    mono = np.zeros(FRAME, np.int16)
    mono[lead:FRAME - trail] = amplitude
    return np.repeat(mono, 2).reshape(1, -1)


def _log(levels: list[int | None], start_pts: int = 0, t0: float = 10.0) -> TrackLog:
    """One frame per entry every 20 ms: an amplitude, or None for a frame that never came
    (its timestamp is skipped)."""
    log = TrackLog()
    for k, amp in enumerate(levels):
        if amp is not None:
            log.add(t0 + 0.02 * k, (start_pts + k * FRAME) % RTP_WRAP, FRAME, _frame(amp))
    return log


def test_level_and_zero_edges() -> None:
    rms, peak = level(_frame(-1000))
    assert (round(rms), peak) == (1000, 1000)
    assert level(np.zeros((1, 0), np.int16)) == (0.0, 0)
    assert zero_edges(_frame(500, lead=100, trail=7), FRAME) == (100, 7)
    assert zero_edges(_frame(0), FRAME) == (FRAME, FRAME)
    # A sample is sound when any channel is.
    stereo = np.zeros((1, 2 * FRAME), np.int16)
    stereo[0, 2 * 5 + 1] = 3
    assert zero_edges(stereo, FRAME) == (5, FRAME - 6)


def test_timestamps_unwrap_across_the_32_bit_edge() -> None:
    log = _log([1000, 1000, None, 1000], start_pts=RTP_WRAP - FRAME)
    assert [f.media for f in log.frames] == [0, FRAME, 3 * FRAME]
    # A frame without a timestamp follows the previous one.
    log.add(11.0, None, FRAME, _frame(5))
    assert log.frames[-1].media == 4 * FRAME


def test_first_audible_frame_after_the_reply_started() -> None:
    # Silence, quiet noise, then the reply; a loud frame before the reply started (the
    # previous reply's tail) does not count.
    log = _log([3000, 0, 0, 2, 0, 2000, 2000, 2000, 0, 0])
    audio = reply_audio(log.frames, start=10.03, end=99.0, threshold_s=0.02)
    assert audio.first_audio == 10.0 + 0.02 * 5
    assert audio.chunks == 3 and round(audio.audio_s, 3) == 0.06 and audio.gaps == []
    assert reply_audio(log.frames, 10.03, 10.09, 0.02).first_audio is None
    # The sound begins inside the frame: its leading zeros are not heard.
    late = TrackLog()
    late.add(5.0, 0, FRAME, _frame(2000, lead=480))
    assert reply_audio(late.frames, 0.0, 9.0, 0.02).first_audio == 5.0 + 480 / RATE


def test_gaps_are_digital_silence_or_missing_frames_inside_the_reply() -> None:
    # reply, 3 dry frames (server underrun), reply, one lost frame, reply, quiet (not
    # digital) pause, reply, then the track idles.
    log = _log([1500, 1500, 0, 0, 0, 1500, None, 1500, 3, 3, 1500, 0, 0, 0])
    audio = reply_audio(log.frames, 0.0, 99.0, threshold_s=0.02)
    assert [(round(at, 3), round(length, 3)) for at, length in audio.gaps] == [
        (10.04, 0.06), (10.12, 0.02)]
    # Sound from the first to the last non-dry frame, less the gaps: 11 frames - 4.
    assert round(audio.audio_s, 3) == round(0.02 * 7, 3) and audio.chunks == 7
    # Holes shorter than the threshold are not gaps (and count as audio).
    audio = reply_audio(log.frames, 0.0, 99.0, threshold_s=0.03)
    assert [round(length, 3) for _, length in audio.gaps] == [0.06]
    assert round(audio.audio_s, 3) == round(0.02 * 8, 3)


def test_holes_are_sample_exact_at_frame_edges() -> None:
    log = TrackLog()
    log.add(1.00, 0, FRAME, _frame(1500))
    log.add(1.02, FRAME, FRAME, _frame(1500, trail=240))  # sound ends 5 ms early
    log.add(1.04, 2 * FRAME, FRAME, _frame(0))
    log.add(1.06, 3 * FRAME, FRAME, _frame(1500, lead=96))  # and starts 2 ms late
    audio = reply_audio(log.frames, 0.0, 9.0, threshold_s=0.02)
    (at, length), = audio.gaps
    assert round(at, 4) == round(1.02 + 720 / RATE, 4)
    assert length == (240 + FRAME + 96) / RATE
    assert round(audio.audio_s, 6) == round((4 * FRAME - 240 - FRAME - 96) / RATE, 6)
