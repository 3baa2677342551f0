"""Playout: real-time pacing with a bounded lead, and the text a listener heard."""

from __future__ import annotations

import pytest

from orchestrator.playout import Playout
from stages.tts.types import TtsChunk, TtsWord

RATE = 24_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def chunk(index: int, text: str, duration_ms: float, words: list[tuple[str, float, float]]
          | None) -> TtsChunk:
    samples = int(duration_ms * RATE / 1000)
    return TtsChunk(index=index, text=text, text_offset=0, audio=bytes(2 * samples),
                    sample_rate=RATE, duration_ms=duration_ms,
                    words=None if words is None else
                    [TtsWord(text=w, start_ms=s, end_ms=e) for w, s, e in words])


FIRST = chunk(0, "Hello there. ", 1000, [("Hello", 0, 400), ("there.", 450, 900)])
SECOND = chunk(1, "It is sunny today. ", 2000, [("It", 0, 200), ("is", 250, 400),
                                                  ("sunny", 450, 1000), ("today.", 1050, 1800)])


async def test_audio_is_paced_at_real_time_with_a_bounded_lead() -> None:
    clock = FakeClock()
    out = Playout(RATE, lead_ms=300, slice_ms=100, clock=clock, sleep=clock.sleep)
    writes: list[tuple[float, float]] = []  # (sent_ms before the write, elapsed ms)
    start = clock.now

    async def write(piece: bytes) -> None:
        writes.append((out.sent_ms, (clock.now - start) * 1000))

    await out.send(FIRST, write)
    await out.send(SECOND, write)
    assert sum(1 for _ in writes) == 30  # 3 s in 100 ms slices
    assert out.sent_ms == 3000
    for sent, elapsed in writes:
        assert sent - elapsed <= 300 + 1e-6  # never more than the lead ahead
    # The whole reply took real time minus the lead, not zero (a burst) and not more.
    assert abs((clock.now - start) * 1000 - (3000 - 100 - 300)) < 1e-6


async def test_heard_text_stops_at_the_last_finished_word() -> None:
    clock = FakeClock()
    out = Playout(RATE, clock=clock, sleep=clock.sleep)

    async def write(piece: bytes) -> None:
        return None

    await out.send(FIRST, write)
    await out.send(SECOND, write)
    assert out.heard_text(0) == ""
    assert out.heard_text(420) == "Hello"
    assert out.heard_text(999) == "Hello there."
    assert out.heard_text(1000) == "Hello there. "
    assert out.heard_text(1000 + 1100) == "Hello there. It is sunny"
    assert out.heard_text(10_000) == "Hello there. It is sunny today. "  # clamped to sent


async def test_played_position_is_capped_by_audio_sent() -> None:
    clock = FakeClock()
    out = Playout(RATE, lead_ms=300, clock=clock, sleep=clock.sleep)

    async def write(piece: bytes) -> None:
        return None

    assert out.played_ms() == 0
    await out.send(FIRST, write)
    clock.now += 5  # long after the audio ran out
    assert out.played_ms() == 1000
    assert out.heard_text() == "Hello there. "


async def test_chunk_without_word_timings_counts_only_when_fully_played() -> None:
    clock = FakeClock()
    out = Playout(RATE, clock=clock, sleep=clock.sleep)

    async def write(piece: bytes) -> None:
        return None

    await out.send(chunk(0, "No timings here. ", 1000, None), write)
    assert out.heard_text(999) == ""
    assert out.heard_text(1000) == "No timings here. "


async def test_after_a_gap_in_synthesis_the_listener_is_behind_wall_time() -> None:
    """The client starts each slice when it arrives; through an underrun its playback
    clock stands still, so the heard position is the audio sent minus what it still
    queues, not the wall time since the first slice."""
    clock = FakeClock()
    out = Playout(RATE, lead_ms=300, slice_ms=100, clock=clock, sleep=clock.sleep)

    async def write(piece: bytes) -> None:
        return None

    await out.send(FIRST, write)  # 1 s of audio; the client plays it by t0 + 1 s
    clock.now += 3.0  # synthesis of the next phrase took 3 s: the client sat silent
    await out.send(SECOND, write)  # 2 s of audio, sent with a 300 ms lead
    # The last slice went out with the lead (300 ms) plus itself (100 ms) still queued:
    # wall time since the first slice is ~5.2 s, but the listener heard 1 s + 1.6 s.
    assert out.queued_ms() == pytest.approx(400, abs=1e-6)
    assert out.played_ms() == pytest.approx(2600, abs=1e-6)
    # A barge-in now keeps only the words of SECOND that ended by 1.6 s into it.
    assert out.heard_text() == "Hello there. It is sunny"
    clock.now += 0.2
    assert out.played_ms() == pytest.approx(2800, abs=1e-6)
