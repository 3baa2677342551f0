"""Would a real-time player have run dry? Gaps in a reply's audio as a listener hears them.

The simulated client starts playing the first chunk the moment it arrives and then plays
continuously at real time. Whenever the next chunk arrives after everything received so
far has been played, the listener hears silence: a gap. A reply that starts fast and then
stutters is not fast, so gaps are reported next to the first-audio latency.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PlaybackGaps:
    """Feed ``(arrival time, chunk duration)`` pairs in arrival order; read the gaps."""

    threshold_s: float = 0.02  # underruns shorter than this are jitter, not gaps
    played_until: float | None = None  # when the audio received so far finishes playing
    audio_s: float = 0.0
    chunks: int = 0
    gaps: list[float] = field(default_factory=list)
    gap_starts: list[float] = field(default_factory=list)  # when each gap began

    def add(self, arrival: float, duration: float) -> None:
        self.chunks += 1
        self.audio_s += duration
        if self.played_until is None:
            self.played_until = arrival + duration
            return
        dry = arrival - self.played_until
        if dry > 0:
            if dry >= self.threshold_s:
                self.gaps.append(dry)
                self.gap_starts.append(self.played_until)
            self.played_until = arrival + duration
        else:
            self.played_until += duration

    @property
    def total_s(self) -> float:
        return sum(self.gaps)

    @property
    def max_s(self) -> float:
        return max(self.gaps, default=0.0)
