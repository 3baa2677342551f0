"""Hysteresis speech segmentation on top of per-frame VAD probabilities.

Two thresholds avoid flapping: a frame at or above ``threshold`` counts as speech, one
below ``neg_threshold`` as silence, anything between keeps the current state. Speech
starts only after ``min_speech_ms`` of it (a cough or click is dropped) and ends only
after ``min_silence_ms`` of silence (a pause between words does not end a turn).

Events carry the sample-exact position in the 16 kHz stream where speech began (the start
of its first speech frame) or ended (the start of its first silence frame), so they are
*reported* late (after the confirmation window) but *timestamped* precisely; the
orchestrator's turn logic uses ``sample`` to cut audio and ``reported_at`` to measure
its own latency.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from stages.vad.model import SAMPLE_RATE
from stages.vad.stream import VadFrame


@dataclass(frozen=True, slots=True)
class SpeechStart:
    sample: int  # first sample of speech
    reported_at: int  # end sample of the frame that confirmed it

    @property
    def time_s(self) -> float:
        return self.sample / SAMPLE_RATE


@dataclass(frozen=True, slots=True)
class SpeechEnd:
    sample: int  # first sample after speech
    reported_at: int

    @property
    def time_s(self) -> float:
        return self.sample / SAMPLE_RATE


VadEvent = SpeechStart | SpeechEnd


class VadSegmenter:
    """Turns ``VadFrame``s into ``SpeechStart`` / ``SpeechEnd`` events (one per stream)."""

    def __init__(
        self,
        threshold: float = 0.5,
        neg_threshold: float | None = None,
        min_speech_ms: float = 250.0,
        min_silence_ms: float = 300.0,
    ) -> None:
        neg = max(threshold - 0.15, 0.01) if neg_threshold is None else neg_threshold
        if not 0.0 < threshold <= 1.0 or not 0.0 <= neg <= threshold:
            raise ValueError("need 0 < neg_threshold <= threshold <= 1")
        if min_speech_ms < 0 or min_silence_ms < 0:
            raise ValueError("min_speech_ms and min_silence_ms must be >= 0")
        self.threshold = threshold
        self.neg_threshold = neg
        self._min_speech = int(min_speech_ms * SAMPLE_RATE / 1000)
        self._min_silence = int(min_silence_ms * SAMPLE_RATE / 1000)
        self.in_speech = False
        self._candidate: int | None = None  # start of unconfirmed speech
        self._silence_from: int | None = None  # start of unconfirmed silence
        self._last_end = 0

    def reset(self) -> None:
        self.in_speech = False
        self._candidate = None
        self._silence_from = None
        self._last_end = 0

    def process(self, frames: Iterable[VadFrame]) -> list[VadEvent]:
        events: list[VadEvent] = []
        for frame in frames:
            event = self._step(frame)
            if event is not None:
                events.append(event)
        return events

    def flush(self) -> list[VadEvent]:
        """End of audio: close an open segment (at the start of trailing silence, if any)."""
        self._candidate = None
        if not self.in_speech:
            return []
        end = self._silence_from if self._silence_from is not None else self._last_end
        self.in_speech = False
        self._silence_from = None
        return [SpeechEnd(end, self._last_end)]

    def _step(self, frame: VadFrame) -> VadEvent | None:
        p = frame.probability
        self._last_end = frame.end_sample
        if not self.in_speech:
            if p >= self.threshold:
                if self._candidate is None:
                    self._candidate = frame.start_sample
                if frame.end_sample - self._candidate >= self._min_speech:
                    start, self._candidate = self._candidate, None
                    self.in_speech = True
                    self._silence_from = None
                    return SpeechStart(start, frame.end_sample)
            elif p < self.neg_threshold:
                self._candidate = None
            return None
        if p >= self.threshold:
            self._silence_from = None
        elif p < self.neg_threshold:
            if self._silence_from is None:
                self._silence_from = frame.start_sample
            if frame.end_sample - self._silence_from >= self._min_silence:
                end, self._silence_from = self._silence_from, None
                self.in_speech = False
                return SpeechEnd(end, frame.end_sample)
        return None
