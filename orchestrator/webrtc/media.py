"""A call's media: the outbound RTP audio track (the session's audio-out port) and the
inbound track pump (its audio-in port).

Outbound: ``OutboundAudio`` is the track aiortc's sender pulls. ``recv()`` paces 48 kHz
mono 20 ms frames on the wall clock and sends silence when nothing is queued, so the
track owns playback time: a frame counts as played when it leaves ``recv()`` for the
encoder. Each response writes through its own ``TrackPlayout``, which keeps at most
``lead_ms`` queued ahead of the track; the played position is therefore exact (frames
counted, not modelled), and an interruption drops the queued audio at once
(``clear``), so what the item keeps is what went out. The WebRTC-only events
``output_audio_buffer.started/stopped/cleared`` are emitted here, where the facts are
known: the first frame of a response left, the queue drained after the response
finished, or it was cleared.

Inbound: ``pump_inbound`` drains the remote track (aiortc's receive queue is unbounded:
it must always be read), downmixes to mono and hands 48 kHz frames to the session's
audio-in port, which resamples once to the pipeline rate.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

import numpy as np
import numpy.typing as npt
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from orchestrator.playout import SentRecord, Sleep, Write
from orchestrator.protocol import (
    OutputAudioBufferClearedEvent,
    OutputAudioBufferStartedEvent,
    OutputAudioBufferStoppedEvent,
)
from orchestrator.protocol.server_events import ServerEventBase
from stages.tts.types import TtsChunk

log = logging.getLogger(__name__)

RATE = 48_000  # Opus's clock; TTS synthesizes straight to it (one resample)
FRAME_SAMPLES = RATE // 50  # 20 ms
FRAME_BYTES = FRAME_SAMPLES * 2
TIME_BASE = fractions.Fraction(1, RATE)

Emit = Callable[[ServerEventBase], None]
PushAudio = Callable[[npt.NDArray[np.int16], int], bool]


class OutboundAudio(MediaStreamTrack):
    """The call's outbound audio track: paced 20 ms frames, silence when idle."""

    kind = "audio"

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._queue: deque[tuple[TrackPlayout, bytes]] = deque()
        self._queued_bytes = 0
        self._start: float | None = None
        self._pts = 0
        self._buf = bytearray(FRAME_BYTES)
        self.frames = 0  # frames sent (silence included)
        self.audio_frames = 0  # frames that carried reply audio

    @property
    def queued_ms(self) -> float:
        return self._queued_bytes / 2 / RATE * 1000.0

    def enqueue(self, owner: TrackPlayout, pcm: bytes) -> None:
        self._queue.append((owner, pcm))
        self._queued_bytes += len(pcm)

    def clear(self, owner: TrackPlayout | None = None) -> int:
        """Drop queued audio (of ``owner`` only, when given); the bytes dropped."""
        kept: deque[tuple[TrackPlayout, bytes]] = deque()
        dropped = 0
        for seg in self._queue:
            if owner is None or seg[0] is owner:
                dropped += len(seg[1])
            else:
                kept.append(seg)
        self._queue = kept
        self._queued_bytes -= dropped
        return dropped

    def _next_frame(self) -> bytes:
        """The next 20 ms of queued audio (zero-padded), crediting each owner's position."""
        if not self._queue:
            return bytes(FRAME_BYTES)
        buf = self._buf
        filled = 0
        owners: list[TrackPlayout] = []
        while filled < FRAME_BYTES and self._queue:
            owner, pcm = self._queue[0]
            take = min(len(pcm), FRAME_BYTES - filled)
            buf[filled:filled + take] = pcm[:take]
            filled += take
            if take == len(pcm):
                self._queue.popleft()
            else:
                self._queue[0] = (owner, pcm[take:])
            owner.played(take)
            if not owners or owners[-1] is not owner:
                owners.append(owner)
        self._queued_bytes -= filled
        if filled < FRAME_BYTES:
            buf[filled:] = bytes(FRAME_BYTES - filled)
        self.audio_frames += 1
        for owner in owners:
            owner.maybe_stopped()
        return bytes(buf)

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = self._clock()
        if self._start is None:
            self._start = now
        else:
            self._pts += FRAME_SAMPLES
            wait = self._start + self._pts / RATE - now
            if wait > 0:
                await asyncio.sleep(wait)
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(self._next_frame())
        frame.pts = self._pts
        frame.sample_rate = RATE
        frame.time_base = TIME_BASE
        self.frames += 1
        return frame


class TrackPlayout(SentRecord):
    """One response's audio on the call's track (the ``AudioOut`` of WebRTC calls)."""

    sample_rate = RATE

    def __init__(self, track: OutboundAudio, response_id: str, emit: Emit, *,
                 lead_ms: float = 300.0, slice_ms: float = 100.0,
                 sleep: Sleep = asyncio.sleep) -> None:
        super().__init__()
        self._track = track
        self.response_id = response_id
        self._emit = emit
        self.lead_ms = lead_ms
        self._slice_bytes = max(2, int(RATE * slice_ms / 1000) * 2)
        self._sleep = sleep
        self._played_bytes = 0
        self._sent_bytes = 0  # exact, where sent_ms (the record's timeline) is a float sum
        self.first_audio_at: float | None = None
        self._finished = False
        self._stopped = False  # stopped or cleared was announced

    @property
    def started(self) -> bool:
        return self.first_audio_at is not None

    def played_ms(self) -> float:
        return self._played_bytes / 2 / RATE * 1000.0

    def queued_ms(self) -> float:
        return (self._sent_bytes - self._played_bytes) / 2 / RATE * 1000.0

    async def send(self, chunk: TtsChunk, write: Write) -> None:
        """Queue one chunk on the track in slices, never more than ``lead_ms`` ahead of
        what has gone out (``write`` is unused: audio does not travel in events)."""
        if chunk.sample_rate != RATE:
            raise ValueError(f"chunk at {chunk.sample_rate} Hz on a {RATE} Hz track")
        if self._stopped:
            return
        self.record(chunk)
        audio = memoryview(chunk.audio)
        for i in range(0, len(audio), self._slice_bytes):
            piece = bytes(audio[i:i + self._slice_bytes])
            while self.queued_ms() > self.lead_ms:
                await self._sleep((self.queued_ms() - self.lead_ms) / 1000.0)
            if self._stopped:
                return
            self._track.enqueue(self, piece)
            self._sent_bytes += len(piece)
            self.sent_ms += len(piece) / 2 / RATE * 1000.0

    def played(self, nbytes: int) -> None:
        """The track sent ``nbytes`` of this response's audio."""
        self._played_bytes += nbytes
        if self.first_audio_at is None:
            self.first_audio_at = time.monotonic()
            self._emit(OutputAudioBufferStartedEvent(response_id=self.response_id))

    def maybe_stopped(self) -> None:
        if self._finished and not self._stopped and self._sent_bytes <= self._played_bytes:
            self._stopped = True
            if self.started:
                self._emit(OutputAudioBufferStoppedEvent(response_id=self.response_id))

    def finish(self) -> None:
        self._finished = True
        self.maybe_stopped()

    def clear(self) -> None:
        """Interrupted: drop the queued audio; the position stays where the track is."""
        if self._stopped:
            return
        self._stopped = True
        dropped = self._track.clear(self)
        self._sent_bytes -= dropped
        self.sent_ms = self._sent_bytes / 2 / RATE * 1000.0
        if self.started:
            self._emit(OutputAudioBufferClearedEvent(response_id=self.response_id))


class CallMedia:
    """The session's media port for one WebRTC call (``orchestrator.realtime.MediaPort``)."""

    output_rate = RATE

    def __init__(self, track: OutboundAudio, *, lead_ms: float = 300.0) -> None:
        self.track = track
        self._lead_ms = lead_ms
        self._current: TrackPlayout | None = None

    def playout(self, response_id: str, emit: Emit) -> TrackPlayout:
        if self._current is not None:
            self._current.clear()
        self._current = TrackPlayout(self.track, response_id, emit, lead_ms=self._lead_ms)
        return self._current

    def clear(self) -> bool:
        """``output_audio_buffer.clear``: drop what is queued; True when audio was."""
        current = self._current
        if current is None or current.queued_ms() <= 0:
            return False
        current.clear()
        return True


def downmix(frame: AudioFrame) -> npt.NDArray[np.int16]:
    """One decoded frame as mono s16 (aiortc's Opus decoder yields packed s16 stereo)."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.name != "s16":
        raise ValueError(f"unexpected decoded audio format {frame.format.name}")
    flat: npt.NDArray[np.int16] = data.reshape(-1).astype(np.int16, copy=False)
    if channels == 1:
        return flat
    mixed: npt.NDArray[np.int32] = flat.reshape(-1, channels).astype(np.int32).sum(axis=1)
    out: npt.NDArray[np.int16] = (mixed // channels).astype(np.int16)
    return out


async def audio_frames(track: MediaStreamTrack) -> AsyncIterator[AudioFrame]:
    """Every audio frame of a remote track until it ends. aiortc queues received frames
    without bound: whoever holds a remote track must read it through this, always."""
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        if isinstance(frame, AudioFrame):
            yield frame


async def pump_inbound(track: MediaStreamTrack, push: PushAudio) -> None:
    """Drain the remote audio track into ``push`` until the track ends. A frame the
    session cannot take (its inbox is full) is dropped, never queued without bound."""
    dropped = 0
    async for frame in audio_frames(track):
        if not push(downmix(frame), frame.sample_rate):
            dropped += 1
            if dropped in (1, 50) or dropped % 500 == 0:
                log.warning("inbound audio: %d frames dropped (session busy)", dropped)
