"""Reply audio out to the client: paced at real time plus a small lead, and an exact
record of what was sent, so a barge-in keeps only the words the listener heard.

``AudioOut`` is the session's audio-out port: the responder hands it TTS chunks and asks
it what has been played. Two transports implement it: ``Playout`` here (audio inside
WebSocket events; the client's playback position is modelled) and
``orchestrator.webrtc.media.TrackPlayout`` (audio on an RTP track whose frames are counted
as they leave, so the position is exact).

Pacing: audio is released in ``slice_ms`` slices, never more than ``lead_ms`` ahead of
the listener's playback. The listener is modelled as a client that starts playing a slice
as soon as it arrives and plays in real time: its playback clock advances only while it
has audio, so after a gap in synthesis (an underrun) it is behind wall time by the length
of the gap. ``played_ms()`` is that position: the audio sent minus what is still queued
at the client. A client thus holds at most ``lead_ms`` of unplayed audio, and an
interruption discards at most that.

Heard text: each sent chunk is recorded with its start on the playback timeline. Given a
playback position (our estimate at barge-in, or the client's own ``audio_end_ms`` from
``conversation.item.truncate``), :meth:`Playout.heard_text` returns the chunks' text up to
the last word that ended by then, using the TTS word timings; a chunk without timings
counts as heard only once fully played.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from orchestrator.protocol.server_events import ServerEventBase
from stages.tts.types import TtsChunk

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
Write = Callable[[bytes], Awaitable[None]]


class AudioOut(Protocol):
    """Where one response's audio goes, and what of it the listener has heard."""

    sample_rate: int
    sent_ms: float  # audio handed to the transport so far
    first_audio_at: float | None  # time.monotonic() when the first audio went out

    @property
    def started(self) -> bool: ...

    def queued_ms(self) -> float:
        """Audio sent but not yet played (what an interruption discards)."""
        ...

    def played_ms(self) -> float:
        """The listener's playback position in this response's audio."""
        ...

    def heard_text(self, position_ms: float | None = None) -> str: ...

    async def send(self, chunk: TtsChunk, write: Write) -> None:
        """One chunk out, paced; ``write`` carries audio inside events (WebSocket)."""
        ...

    def clear(self) -> None:
        """Interrupted: drop what is queued and not yet played (where the server holds it)."""
        ...

    def finish(self) -> None:
        """No more audio will come (the response is done)."""
        ...


class MediaPort(Protocol):
    """A transport that carries audio outside the events (a WebRTC call's RTP track):
    it gives each response its ``AudioOut`` and emits the transport's own audio events
    through ``emit``."""

    output_rate: int

    def playout(self, response_id: str, emit: Callable[[ServerEventBase], None]) -> AudioOut:
        ...

    def clear(self) -> bool:
        """Drop queued output audio (``output_audio_buffer.clear``); True if there was."""
        ...


@dataclass(frozen=True)
class _Sent:
    start_ms: float
    chunk: TtsChunk


class SentRecord(ABC):
    """The chunks sent, each at its start on the response's playback timeline; a
    transport says where playback is (``played_ms``)."""

    def __init__(self) -> None:
        self.sent_ms = 0.0
        self._sent: list[_Sent] = []

    def record(self, chunk: TtsChunk) -> None:
        self._sent.append(_Sent(self.sent_ms, chunk))

    @abstractmethod
    def played_ms(self) -> float:
        """The listener's playback position in this response's audio."""

    def heard_text(self, position_ms: float | None = None) -> str:
        """The reply text the listener heard by ``position_ms`` (default: now)."""
        pos = self.played_ms() if position_ms is None else min(position_ms, self.sent_ms)
        out: list[str] = []
        for sent in self._sent:
            chunk = sent.chunk
            if sent.start_ms + chunk.duration_ms <= pos:
                out.append(chunk.text)
                continue
            if sent.start_ms < pos and chunk.words:
                out.append(_prefix_heard(chunk, pos - sent.start_ms))
            break
        return "".join(out)


class Playout(SentRecord):
    """Audio inside WebSocket events: the client plays what it receives; its position is
    modelled from what was sent and when."""

    def __init__(self, sample_rate: int, *, lead_ms: float = 300.0, slice_ms: float = 100.0,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.lead_ms = lead_ms
        self._slice_bytes = max(2, int(sample_rate * slice_ms / 1000) * 2)
        self._clock = clock
        self._sleep = sleep
        self._t0: float | None = None  # when the first slice went out
        self._drained_at = 0.0  # clock time at which the client will have played it all
        self.first_audio_at: float | None = None

    @property
    def started(self) -> bool:
        return self._t0 is not None

    def queued_ms(self) -> float:
        """Audio sent but not yet played by the listener (what a barge-in discards)."""
        if self._t0 is None:
            return 0.0
        return max(0.0, (self._drained_at - self._clock()) * 1000.0)

    def played_ms(self) -> float:
        """Estimated playback position: the audio sent minus what the client still
        queues (its clock stood still through every underrun)."""
        return self.sent_ms - self.queued_ms()

    def clear(self) -> None:
        """The client holds the queued audio; it drops it itself (the SDKs do at a
        barge-in). Nothing is queued here."""

    def finish(self) -> None:
        pass

    async def send(self, chunk: TtsChunk, write: Write) -> None:
        """Send one chunk's audio in paced slices through ``write``."""
        if chunk.sample_rate != self.sample_rate:
            raise ValueError(f"chunk at {chunk.sample_rate} Hz on a {self.sample_rate} Hz playout")
        self.record(chunk)
        audio = memoryview(chunk.audio)
        for i in range(0, len(audio), self._slice_bytes):
            piece = audio[i:i + self._slice_bytes]
            ahead = self.queued_ms()
            if ahead > self.lead_ms:
                await self._sleep((ahead - self.lead_ms) / 1000.0)
            await write(bytes(piece))
            now = self._clock()
            if self._t0 is None:
                self._t0 = now
                self.first_audio_at = time.monotonic()
            ms = len(piece) / 2 / self.sample_rate * 1000.0
            self._drained_at = max(self._drained_at, now) + ms / 1000.0
            self.sent_ms += ms


def _prefix_heard(chunk: TtsChunk, pos_in_chunk_ms: float) -> str:
    """chunk.text up to the end of the last word that finished by pos_in_chunk_ms."""
    end = 0
    cursor = 0
    for word in chunk.words or ():
        found = chunk.text.find(word.text, cursor)
        if found < 0:
            break
        cursor = found + len(word.text)
        if word.end_ms <= pos_in_chunk_ms:
            end = cursor
        else:
            break
    return chunk.text[:end]
