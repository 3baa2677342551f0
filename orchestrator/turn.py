"""Turn-taking for one session: VAD + streaming ASR in, speech/transcript/reply events out.

Implements the steps of ``policy.py`` (read that first). Time is the *audio clock*: the
position in the session's 16 kHz input stream, in samples. The client streams audio in
real time, so it tracks wall time, and tests with simulated audio are exact.

The controller owns the ASR stream of the current turn and the reply runs it starts; the
session (transport side) streams a released run to the client and tells the controller
when a reply is playing (for barge-in) via :meth:`TurnController.set_reply_playing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from orchestrator.policy import OverlapPolicy, speculation_still_valid
from orchestrator.reply import ReplyRun
from stages.asr.types import AsrBackend, AsrPartial, AsrStream
from stages.vad.stream import VadFrame

log = logging.getLogger(__name__)
RATE = 16_000


class VadLike(Protocol):
    def process(self, audio: bytes) -> list[VadFrame]: ...


@dataclass(frozen=True)
class SpeechStarted:
    audio_start_ms: int


@dataclass(frozen=True)
class SpeechStopped:
    audio_end_ms: int


@dataclass(frozen=True)
class TranscriptDelta:
    text: str


@dataclass(frozen=True)
class TranscriptDone:
    text: str


@dataclass(frozen=True)
class ReplyReleased:
    """The end of turn is confirmed: stream this run to the client."""

    run: ReplyRun
    revision: int
    speculative_hit: bool


@dataclass(frozen=True)
class ReplyCancelled:
    revision: int
    reason: str  # "user_resumed" | "transcript_changed" | "barge_in" | "empty_turn"


@dataclass(frozen=True)
class BargeIn:
    audio_start_ms: int


TurnEvent = (SpeechStarted | SpeechStopped | TranscriptDelta | TranscriptDone | ReplyReleased
             | ReplyCancelled | BargeIn)
Emit = Callable[[TurnEvent], Awaitable[None]]
MakeReply = Callable[[str], ReplyRun]


class TurnController:
    def __init__(self, *, vad: VadLike, asr: AsrBackend, make_reply: MakeReply, emit: Emit,
                 policy: OverlapPolicy | None = None, auto_turns: bool = True) -> None:
        self.policy = policy or OverlapPolicy()
        self.auto_turns = auto_turns  # False: manual turns (turn_detection null)
        self._vad = vad
        self._asr = asr
        self._make_reply = make_reply
        self._emit = emit
        self._lock = asyncio.Lock()  # one push/commit at a time
        # audio clock and VAD state
        self.samples = 0
        self._in_speech = False
        self._voiced_run = 0  # consecutive voiced samples (start / barge-in detection)
        self._voiced_run_start = 0
        self._silence_run = 0  # consecutive unvoiced samples inside a turn
        self._last_voiced_end = 0
        # Recent input (bounded), so ASR gets prefix_padding_ms of audio before the first
        # voiced frame even when that frame sits in the middle of a large append.
        self._pad_samples = self.policy.prefix_padding_ms * RATE // 1000
        self._history_max = 2 * (self._pad_samples + 5 * RATE)  # bytes
        self._history = bytearray()
        # ASR of the current turn
        self._stream: AsrStream | None = None
        self._partials: asyncio.Task[None] | None = None
        self._latest: AsrPartial | None = None
        self._sent_stable = ""
        # replies
        self.revision = 0
        self._speculative: tuple[int, str, ReplyRun] | None = None
        self._reply_playing: ReplyRun | None = None
        self.speculative_hits = 0
        self.speculative_misses = 0

    # ------------------------------------------------------------------ inputs
    async def push_audio(self, pcm16: bytes) -> None:
        """16 kHz mono pcm16 from the client, in arrival order."""
        async with self._lock:
            frames = self._vad.process(pcm16)
            self.samples += len(pcm16) // 2
            self._history += pcm16
            if len(self._history) > self._history_max:
                del self._history[:len(self._history) - self._history_max]
            if self._stream is not None:
                await self._stream.push(pcm16)
            elif not self.auto_turns:
                await self._open_turn(with_padding=True)
            for frame in frames:
                await self._on_frame(frame)

    async def commit(self) -> str:
        """Manual end of turn (input_audio_buffer.commit): the final transcript."""
        async with self._lock:
            return await self._finish_turn(auto=False)

    def set_reply_playing(self, run: ReplyRun | None) -> None:
        self._reply_playing = run

    async def cancel_speculation(self, reason: str) -> None:
        if self._speculative is not None:
            revision, _text, run = self._speculative
            self._speculative = None
            log.debug("speculation r%d cancelled: %s", revision, reason)
            await run.cancel()
            await self._emit(ReplyCancelled(revision, reason))

    async def aclose(self) -> None:
        await self.cancel_speculation("closed")
        await self._close_stream()

    # ------------------------------------------------------------------ VAD steps
    async def _on_frame(self, frame: VadFrame) -> None:
        if not self.auto_turns:
            return  # manual turns: no VAD events, the client commits
        p = self.policy
        n = frame.end_sample - frame.start_sample
        if frame.probability >= p.threshold:
            if self._voiced_run == 0:
                self._voiced_run_start = frame.start_sample
            self._voiced_run += n
            self._silence_run = 0
            self._last_voiced_end = frame.end_sample
            if not self._in_speech and self._voiced_run >= p.min_speech_ms * RATE // 1000:
                await self._speech_started()
            elif self._in_speech and self._speculative is not None:
                await self.cancel_speculation("user_resumed")  # step 3
            await self._maybe_barge_in()
            return
        self._voiced_run = 0
        if not self._in_speech:
            return
        self._silence_run += n
        if self._silence_run >= p.silence_duration_ms * RATE // 1000:
            await self._endpoint()  # step 4
        elif self._silence_run >= p.speculative_pause_ms * RATE // 1000:
            await self._maybe_speculate()  # step 2

    async def _speech_started(self) -> None:
        self._in_speech = True
        start_ms = self._voiced_run_start * 1000 // RATE
        if self._stream is None:
            await self._open_turn(with_padding=True)
        await self._emit(SpeechStarted(audio_start_ms=start_ms))

    async def _maybe_barge_in(self) -> None:
        run = self._reply_playing
        p = self.policy
        if (run is None or not p.interrupt_response
                or self._voiced_run < p.barge_in_min_ms * RATE // 1000):
            return
        self._reply_playing = None
        await run.cancel()  # step 6: LLM + TTS stop at this VAD decision
        await self._emit(BargeIn(audio_start_ms=self._voiced_run_start * 1000 // RATE))

    async def _maybe_speculate(self) -> None:
        if self._speculative is not None or not self.policy.speculation_enabled:
            return
        latest = self._latest
        if latest is None or latest.audio_ms * RATE // 1000 < self._last_voiced_end:
            return  # the hypothesis does not cover the speech yet: wait for the next one
        text = (latest.stable + latest.unstable).strip()
        if not text:
            return
        self.revision += 1
        run = self._make_reply(text)
        run.start()
        self._speculative = (self.revision, text, run)
        log.debug("speculative reply r%d on %r", self.revision, text)

    async def _endpoint(self) -> None:
        self._in_speech = False
        await self._emit(SpeechStopped(audio_end_ms=self._last_voiced_end * 1000 // RATE))
        await self._finish_turn(auto=True)

    # ------------------------------------------------------------------ turn end
    async def _finish_turn(self, *, auto: bool) -> str:
        self._in_speech = False
        self._silence_run = 0
        text = await self._finalize()
        await self._emit(TranscriptDone(text))
        if not auto or not self.policy.create_response:
            await self.cancel_speculation("no_auto_response")
            return text
        if not text.strip():
            await self.cancel_speculation("empty_turn")
            return text
        spec = self._speculative
        self._speculative = None
        if spec is not None and speculation_still_valid(spec[1], text):
            self.speculative_hits += 1
            spec[2].release()
            await self._emit(ReplyReleased(spec[2], spec[0], speculative_hit=True))
            return text
        if spec is not None:
            log.debug("speculation r%d missed: %r != final %r", spec[0], spec[1], text)
            self.speculative_misses += 1
            await spec[2].cancel()
            await self._emit(ReplyCancelled(spec[0], "transcript_changed"))
        self.revision += 1
        run = self._make_reply(text)
        run.start()
        run.release()
        await self._emit(ReplyReleased(run, self.revision, speculative_hit=False))
        return text

    # ------------------------------------------------------------------ ASR stream
    async def _open_turn(self, *, with_padding: bool) -> None:
        self._stream = await self._asr.open_stream()
        self._latest = None
        self._sent_stable = ""
        if with_padding and self._history:
            # From prefix_padding_ms before the speech start up to the newest sample.
            start = self._voiced_run_start - self._pad_samples if self._in_speech else 0
            keep = (self.samples - max(0, start)) * 2
            await self._stream.push(bytes(self._history[-keep:]) if keep > 0 else b"")
        self._partials = asyncio.create_task(self._watch_partials(self._stream))

    async def _watch_partials(self, stream: AsrStream) -> None:
        async for partial in stream.partials():
            self._latest = partial
            stable = partial.stable
            if len(stable) > len(self._sent_stable) and stable.startswith(self._sent_stable):
                delta, self._sent_stable = stable[len(self._sent_stable):], stable
                await self._emit(TranscriptDelta(delta))
            if self._in_speech and self._silence_run >= (
                    self.policy.speculative_pause_ms * RATE // 1000):
                await self._maybe_speculate()

    async def _finalize(self) -> str:
        stream = self._stream
        if stream is None:
            return ""
        final = await stream.finalize()
        await self._close_stream()
        if len(final.text) > len(self._sent_stable) and final.text.startswith(self._sent_stable):
            await self._emit(TranscriptDelta(final.text[len(self._sent_stable):]))
        return final.text.strip()

    async def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        task, self._partials = self._partials, None
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.aclose()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
