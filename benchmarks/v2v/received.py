"""The reply as a WebRTC listener hears it: read off the received audio track.

Over WebRTC the reply is RTP audio, not events with audio in them, and the server's track
never stops: whenever it has nothing to play it sends silence frames. So the reply is
found in the decoded frames by their level:

- **first audio** is the first frame whose level is audible (``AUDIBLE_RMS``, about
  -50 dBFS) among the frames that arrived after the reply started (its
  ``response.created``): its arrival plus its leading zero samples, when the listener
  hears the sound begin. Over the WebSocket it is the first audio delta's arrival; a TTS
  voice's leading near-silence (piper: about one 20 ms frame) is counted there, not here.
- **dry frames** are digital silence (every sample zero): what the server's track sends
  when its buffer is empty. Opus decodes digital silence to exact zeros, while a voice's
  own pauses (breaths, sentence gaps) keep a little noise, so a pause in the speech is
  audio and an empty buffer is not.
- **gaps** are holes in the reply's media timeline between its first audible frame and
  its last non-dry frame: runs of zero samples (dry frames plus the zeros at the edges of
  the frames around them, so a hole is sample-exact, not rounded to 20 ms frames, but
  for the codec: decoded Opus rings on for up to ~30 ms after a hard cut, which shortens
  a hole by as much) and frames that never came (RTP timestamps jump when
  a sender uses DTX or a packet is lost). They are counted on the RTP timeline, not by
  arrival times, because a receiver's jitter buffer absorbs arrival jitter; a gap is
  silence the listener hears, the same thing the WebSocket client's simulated player
  reports as a gap (``playback.py``). The reply's audio is its span on that timeline,
  first sound to last, less its gaps.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.v2v.events import ReplyAudio

AUDIBLE_RMS = 100.0  # int16 RMS of a frame with audible sound (about -50 dBFS)
RTP_WRAP = 2**32  # RTP timestamps are 32-bit and start anywhere


@dataclass(frozen=True)
class ReceivedFrame:
    """One decoded frame of the received track."""

    arrival: float  # perf_counter when the track handed it over
    media: int  # position on the sender's timeline, in samples (unwrapped RTP timestamp)
    samples: int  # samples per channel
    rms: float
    peak: int
    lead: int = 0  # zero samples before the first non-zero one (all of them: dry)
    trail: int = 0  # zero samples after the last non-zero one

    @property
    def dry(self) -> bool:
        """Digital silence: the sender had nothing to play."""
        return self.peak == 0

    @property
    def sound_start(self) -> int:
        """Media position of the first non-zero sample."""
        return self.media + self.lead

    @property
    def sound_end(self) -> int:
        """Media position just after the last non-zero sample."""
        return self.media + self.samples - self.trail

    @property
    def audible(self) -> bool:
        return self.rms >= AUDIBLE_RMS


def level(pcm: np.ndarray[Any, Any]) -> tuple[float, int]:
    """(RMS, peak) of int16 samples, any shape (interleaved channels are fine)."""
    if pcm.size == 0:
        return 0.0, 0
    wide = pcm.astype(np.float64)
    return float(np.sqrt(np.mean(wide * wide))), int(np.abs(pcm.astype(np.int32)).max())


def zero_edges(pcm: np.ndarray[Any, Any], samples: int) -> tuple[int, int]:
    """(leading, trailing) zero samples of a frame of ``samples`` samples per channel,
    channels interleaved (a sample is zero when every channel is)."""
    if samples <= 0 or pcm.size % samples:
        return 0, 0
    sound = np.flatnonzero(np.any(pcm.reshape(samples, -1) != 0, axis=1))
    if not sound.size:
        return samples, samples
    return int(sound[0]), samples - 1 - int(sound[-1])


@dataclass
class TrackLog:
    """Every frame of a received track, in arrival order, with its unwrapped timestamp.

    A frame without a timestamp is placed right after the previous one."""

    rate: int = 48_000
    frames: list[ReceivedFrame] = field(default_factory=list)
    _last_pts: int | None = None

    def add(self, arrival: float, pts: int | None, samples: int,
            pcm: np.ndarray[Any, Any]) -> ReceivedFrame:
        if not self.frames:
            media = 0
        else:
            prev = self.frames[-1]
            step = prev.samples
            if pts is not None and self._last_pts is not None:
                step = (pts - self._last_pts) % RTP_WRAP
                if step >= RTP_WRAP // 2:  # reordered or restarted: keep the order we saw
                    step = prev.samples
            media = prev.media + step
        if pts is not None:
            self._last_pts = pts
        rms, peak = level(pcm)
        lead, trail = zero_edges(pcm, samples)
        frame = ReceivedFrame(arrival=arrival, media=media, samples=samples, rms=rms,
                              peak=peak, lead=lead, trail=trail)
        self.frames.append(frame)
        return frame

    def last_sound(self) -> float | None:
        """Arrival of the newest frame that was not digital silence."""
        return next((f.arrival for f in reversed(self.frames) if not f.dry), None)


def reply_audio(frames: Sequence[ReceivedFrame], start: float, end: float,
                threshold_s: float, rate: int = 48_000) -> ReplyAudio:
    """The reply among ``frames`` that arrived in [start, end]: when its first audible
    frame's sound began, its sound up to the last non-dry frame, and the holes in between
    that last at least ``threshold_s`` (their wall-clock start: when the sound before them
    ran out)."""
    window = [f for f in frames if start <= f.arrival <= end]
    first = next((i for i, f in enumerate(window) if f.audible), None)
    if first is None:
        return ReplyAudio(first_audio=None, chunks=0, audio_s=0.0)
    sound = [f for f in window[first:] if not f.dry]
    gaps: list[tuple[float, float]] = []
    for before, after in itertools.pairwise(sound):
        hole = (after.sound_start - before.sound_end) / rate
        if hole > 0 and hole >= threshold_s:
            gaps.append((before.arrival + (before.samples - before.trail) / rate, hole))
    span = (sound[-1].sound_end - sound[0].sound_start) / rate
    heard = sound[0]
    return ReplyAudio(first_audio=heard.arrival + heard.lead / rate, chunks=len(sound),
                      audio_s=max(0.0, span - sum(length for _, length in gaps)), gaps=gaps)
