from __future__ import annotations

import pytest

from benchmarks.v2v.playback import PlaybackGaps


def test_audio_that_keeps_ahead_of_playback_has_no_gaps() -> None:
    p = PlaybackGaps()
    # 100 ms chunks arriving every 50 ms: the buffer only grows.
    for i in range(10):
        p.add(i * 0.05, 0.1)
    assert p.gaps == [] and p.chunks == 10
    assert p.audio_s == pytest.approx(1.0)
    assert p.played_until == pytest.approx(1.0)


def test_a_late_chunk_is_a_gap_of_exactly_the_dry_time() -> None:
    p = PlaybackGaps()
    p.add(0.0, 0.2)   # plays until 0.2
    p.add(0.1, 0.2)   # queued: plays until 0.4
    p.add(0.7, 0.2)   # the player ran dry at 0.4: 300 ms of silence
    p.add(0.75, 0.1)  # queued again
    assert p.gaps == [pytest.approx(0.3)] and p.gap_starts == [pytest.approx(0.4)]
    assert p.total_s == pytest.approx(0.3) and p.max_s == pytest.approx(0.3)
    assert p.played_until == pytest.approx(1.0)


def test_underruns_below_the_threshold_are_jitter_not_gaps() -> None:
    p = PlaybackGaps(threshold_s=0.02)
    p.add(0.0, 0.1)
    p.add(0.11, 0.1)  # 10 ms late: not counted, but the clock still moves on
    p.add(0.26, 0.1)  # 50 ms dry after 0.21
    assert p.gaps == [pytest.approx(0.05)]
    assert p.played_until == pytest.approx(0.36)


def test_no_audio_means_no_gaps() -> None:
    p = PlaybackGaps()
    assert (p.total_s, p.max_s, p.chunks) == (0.0, 0.0, 0)
