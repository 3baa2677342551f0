"""Turn-taking for one session: VAD + streaming ASR in, speech/transcript/reply events out.

Implements the steps of ``policy.py`` (read that first). Time is the *audio clock*: the
position in the session's 16 kHz input stream, in samples. The client streams audio in
real time, so it tracks wall time, and tests with simulated audio are exact.

The controller owns the ASR of the current turn (``asr_turn.AsrTurn``) and the reply runs
it starts; the session (transport side) streams a released run to the client and tells
the controller when a reply is playing (for barge-in) via
:meth:`TurnController.set_reply_playing`.

Every event carries its ``turn`` number (1, 2, ... per connection). A turn's end
(finalize, release or restart of its reply) runs as a background task so that the next
frames' VAD and barge-in never wait on the ASR stage; its events can therefore follow
the next turn's ``SpeechStarted``, and the session matches them by ``turn``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from orchestrator import tracing
from orchestrator.asr_turn import AsrTurn
from orchestrator.policy import (
    OverlapPolicy,
    SemanticRule,
    StageDeadlines,
    speculation_still_valid,
)
from orchestrator.reply import ReplyRun
from stages.asr.types import AsrBackend, AsrPartial
from stages.vad.stream import VadFrame

log = logging.getLogger(__name__)
RATE = 16_000


class VadLike(Protocol):
    """A session's VAD stream (``stages.vad.stream.VadStream``, or its batched variant whose
    frames run together with every other session's)."""

    async def process_async(self, audio: bytes) -> list[VadFrame]: ...


class EndOfTurnModel(Protocol):
    """semantic_vad's judge (``stages.vad.smart_turn.SmartTurn``): the probability that the
    speaker has finished, from the turn's last seconds of 16 kHz audio."""

    async def predict(self, audio: npt.NDArray[np.float32]) -> float: ...


TURN_MODEL_SECONDS = 8  # what Smart Turn listens to


@dataclass(frozen=True)
class SpeechStarted:
    turn: int
    audio_start_ms: int


@dataclass(frozen=True)
class SpeechStopped:
    turn: int
    audio_end_ms: int
    # Why the turn ended: "silence" (server_vad, or semantic_vad's longest wait),
    # "semantic" (the end-of-turn model said finished, with its ``probability``),
    # "max_turn" (the turn reached max_turn_ms).
    reason: str = "silence"
    probability: float | None = None


@dataclass(frozen=True)
class TranscriptDelta:
    turn: int
    text: str


@dataclass(frozen=True)
class TranscriptDone:
    turn: int
    text: str
    error: str | None = None  # set when the ASR stage failed and ``text`` is its last guess


@dataclass(frozen=True)
class ReplyReleased:
    """The end of turn is confirmed: stream this run to the client."""

    turn: int
    run: ReplyRun
    revision: int
    speculative_hit: bool


@dataclass(frozen=True)
class ReplyCancelled:
    """A speculative reply was thrown away, with the work it had done."""

    turn: int
    revision: int
    reason: str  # "user_resumed" | "transcript_changed" | "empty_turn" | ...
    llm_tokens: int = 0
    tts_ms: float = 0.0


@dataclass(frozen=True)
class BargeIn:
    turn: int  # the turn whose speech interrupted the reply
    audio_start_ms: int


TurnEvent = (SpeechStarted | SpeechStopped | TranscriptDelta | TranscriptDone | ReplyReleased
             | ReplyCancelled | BargeIn)
Emit = Callable[[TurnEvent], Awaitable[None]]
MakeReply = Callable[[int, str], ReplyRun]  # (turn, the user's words) -> a reply run
# (turn, the user's stable words so far): let the LLM read the reply's prompt up to them
Prime = Callable[[int, str], None]


@dataclass
class _Speculation:
    turn: int
    revision: int
    text: str
    run: ReplyRun


class TurnController:
    def __init__(self, *, vad: VadLike, asr: AsrBackend, make_reply: MakeReply, emit: Emit,
                 policy: OverlapPolicy | None = None, auto_turns: bool = True,
                 deadlines: StageDeadlines | None = None,
                 turn_model: EndOfTurnModel | None = None,
                 prime: Prime | None = None) -> None:
        self.policy = policy or OverlapPolicy()
        self.auto_turns = auto_turns  # False: manual turns (turn_detection null)
        self.deadlines = deadlines or StageDeadlines()
        self._vad = vad
        self._asr = asr
        self._make_reply = make_reply
        self._emit = emit
        self._turn_model = turn_model
        self._prime = prime
        self._lock = asyncio.Lock()  # one push/commit at a time; never held across a stage
        # audio clock and VAD state
        self.samples = 0
        self._in_speech = False
        self._voiced_run = 0  # consecutive voiced samples (start / barge-in detection)
        self._voiced_run_start = 0
        self._silence_run = 0  # consecutive unvoiced samples inside a turn
        self._last_voiced_end = 0
        self._turn_boundary = 0  # where the last turn ended: padding never reaches before it
        # Recent input (bounded), so ASR gets prefix_padding_ms of audio before the first
        # voiced frame even when that frame sits in the middle of a large append.
        self._history_max = 2 * (self._pad_samples() + TURN_MODEL_SECONDS * RATE)  # bytes
        self._history = bytearray()
        # the current turn
        self.turns = 0  # turns opened so far; the current one's number
        self._turn: AsrTurn | None = None
        self._ending: set[asyncio.Task[None]] = set()  # turns finalizing in the background
        # replies
        self.revision = 0
        self._speculative: _Speculation | None = None
        self._reply_playing: ReplyRun | None = None
        self.speculative_hits = 0
        self.speculative_misses = 0
        # the current pause
        self._hinted = False  # the ASR was told about this pause
        self._next_check_ms = 0  # semantic_vad: silence at which to ask the model next
        self._check: asyncio.Task[None] | None = None
        self.last_turn_probability: float | None = None

    def _pad_samples(self) -> int:
        return self.policy.prefix_padding_ms * RATE // 1000

    # ------------------------------------------------------------------ inputs
    async def push_audio(self, pcm16: bytes) -> None:
        """16 kHz mono pcm16 from the client, in arrival order. Never waits on a stage."""
        async with self._lock:
            frames = await self._vad.process_async(pcm16)
            self.samples += len(pcm16) // 2
            self._history += pcm16
            if len(self._history) > self._history_max:
                del self._history[:len(self._history) - self._history_max]
            if self._turn is not None:
                self._turn.feed(pcm16)
            elif not self.auto_turns:
                self._open_turn(self.samples - len(pcm16) // 2)
            for frame in frames:
                await self._on_frame(frame)
            turn = self._turn
            if (self.auto_turns and turn is not None and self._in_speech
                    and turn.samples >= self.policy.max_turn_ms * RATE // 1000):
                log.info("turn %d reached %d ms: ending it", turn.turn, self.policy.max_turn_ms)
                await self._endpoint("max_turn")

    async def commit(self) -> int | None:
        """Manual end of turn (input_audio_buffer.commit). Returns the turn's number; its
        ``TranscriptDone`` follows from the background (None: no audio was pushed)."""
        async with self._lock:
            if self._turn is None:
                return None
            return self._end_turn(auto=False)

    @property
    def turn_audio_ms(self) -> float:
        """Audio in the open turn (what the input buffer holds)."""
        return 0.0 if self._turn is None else self._turn.samples * 1000.0 / RATE

    @property
    def busy(self) -> bool:
        """A user turn is being spoken, or an ended one is still being finished
        (transcribed, judged, speculated on)."""
        return self._in_speech or bool(self._ending) or self._speculative is not None

    def set_reply_playing(self, run: ReplyRun | None) -> None:
        self._reply_playing = run

    @property
    def reply_playing(self) -> ReplyRun | None:
        return self._reply_playing

    async def cancel_speculation(self, reason: str) -> None:
        spec, self._speculative = self._speculative, None
        if spec is not None:
            await self._drop_speculation(spec, reason)

    async def _drop_speculation(self, spec: _Speculation, reason: str) -> None:
        log.debug("speculation r%d cancelled: %s", spec.revision, reason)
        await spec.run.cancel()
        await self._emit(ReplyCancelled(spec.turn, spec.revision, reason,
                                        llm_tokens=spec.run.tokens, tts_ms=spec.run.audio_ms))

    async def wait_idle(self) -> None:
        """Wait until every ended turn has finished in the background (tests, shutdown)."""
        while self._ending:
            await asyncio.wait(set(self._ending))

    async def clear(self) -> None:
        """input_audio_buffer.clear: drop the open turn's audio (and its speculation);
        turns already ended keep finishing in the background."""
        async with self._lock:
            await self.cancel_speculation("cleared")
            turn, self._turn = self._turn, None
            if turn is not None:
                turn.close()
                tracing.turn_ended(self, turn.turn, "cancelled")
            self._in_speech = False
            self._silence_run = 0
            self._voiced_run = 0
            self._turn_boundary = self.samples

    async def aclose(self) -> None:
        check, self._check = self._check, None
        if check is not None:
            check.cancel()
        await self.cancel_speculation("closed")
        for task in list(self._ending):
            task.cancel()
        await asyncio.gather(*self._ending, return_exceptions=True)
        turn, self._turn = self._turn, None
        if turn is not None:
            turn.close()
        tracing.close_turns(self)

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
            self._hinted = False
            self._next_check_ms = 0
            self.last_turn_probability = None
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
        silence_ms = self._silence_run * 1000 // RATE
        turn = self._turn
        if not self._hinted and turn is not None and silence_ms >= p.asr_pause_hint_ms:
            self._hinted = True
            turn.end_of_speech(self._last_voiced_end)  # step 2: decode the tail now
        if p.semantic is None or self._turn_model is None:
            if silence_ms >= p.silence_duration_ms:
                await self._endpoint("silence")  # step 4
                return
        elif silence_ms >= p.semantic.max_wait_ms:
            await self._endpoint("silence", self.last_turn_probability)
            return
        elif silence_ms >= max(self._next_check_ms, p.semantic.first_check_ms):
            self._ask_turn_model(p.semantic)
        if silence_ms >= p.speculative_pause_ms:
            self._maybe_speculate()  # step 2

    async def _speech_started(self) -> None:
        self._in_speech = True
        start_ms = self._voiced_run_start * 1000 // RATE
        if self._turn is None:
            # From prefix_padding_ms before the speech start (never before the last turn's
            # end) up to the newest sample.
            start = max(self._voiced_run_start - self._pad_samples(), self._turn_boundary,
                        self.samples - len(self._history) // 2)
            self._open_turn(start)
        assert self._turn is not None
        await self._emit(SpeechStarted(self._turn.turn, audio_start_ms=start_ms))

    async def _maybe_barge_in(self) -> None:
        run = self._reply_playing
        p = self.policy
        if (run is None or not p.interrupt_response
                or self._voiced_run < p.barge_in_min_ms * RATE // 1000):
            return
        self._reply_playing = None
        await run.cancel()  # step 6: LLM + TTS stop at this VAD decision
        await self._emit(BargeIn(self.turns, audio_start_ms=self._voiced_run_start * 1000 // RATE))

    def _maybe_speculate(self) -> None:
        turn = self._turn
        if (not self.policy.speculation_enabled or turn is None or not self._in_speech
                or turn.latest is None):
            return
        uncovered = self._last_voiced_end - turn.covered_until()
        if uncovered > self.policy.speculative_uncovered_ms * RATE // 1000:
            return  # the hypothesis misses too much of the speech: wait for the next one
        text = turn.hypothesis()
        if not text:
            return
        spec = self._speculative
        if spec is not None:
            if speculation_still_valid(spec.text, text):
                return
            # A newer hypothesis says other words: replace the speculative reply.
            self._speculative = None
            self._spawn_drop(spec, "transcript_changed")
        self.revision += 1
        run = self._make_reply(turn.turn, text)
        tracing.start_reply(self, turn.turn, run)  # run.start(), in the turn's trace
        self._speculative = _Speculation(turn.turn, self.revision, text, run)
        log.debug("turn %d: speculative reply r%d on %r", turn.turn, self.revision, text)

    def _spawn_drop(self, spec: _Speculation, reason: str) -> None:
        task = asyncio.create_task(self._drop_speculation(spec, reason),
                                   name=f"speculation-drop-{spec.revision}")
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    # ------------------------------------------------------------------ semantic_vad
    def _ask_turn_model(self, rule: SemanticRule) -> None:
        """Ask the end-of-turn model about the audio so far (one question at a time); its
        answer may end the turn (:meth:`_judge`)."""
        if self._check is not None or self._turn is None or self._turn_model is None:
            return
        silence_ms = self._silence_run * 1000 // RATE
        self._next_check_ms = silence_ms + rule.recheck_ms
        keep = min(len(self._history) // 2, TURN_MODEL_SECONDS * RATE,
                   self.samples - self._turn.origin)
        audio = (np.frombuffer(self._history, dtype="<i2")[-keep:].astype(np.float32)
                 / np.float32(32768.0))
        self._check = asyncio.create_task(
            self._judge(self._turn, self._last_voiced_end, audio, rule), name="turn-check")

    async def _judge(self, turn: AsrTurn, voiced_end: int, audio: npt.NDArray[np.float32],
                     rule: SemanticRule) -> None:
        try:
            assert self._turn_model is not None
            probability = await self._turn_model.predict(audio)
        except asyncio.CancelledError:
            raise
        except Exception:  # the model failed: the max wait still ends the turn
            log.exception("end-of-turn model failed")
            return
        finally:
            self._check = None
        async with self._lock:
            still_paused = (self._turn is turn and self._in_speech
                            and self._last_voiced_end == voiced_end)
            if still_paused:
                self.last_turn_probability = probability
            if still_paused and probability >= rule.threshold:
                log.debug("turn %d: end of turn, p=%.2f after %d ms of silence", turn.turn,
                          probability, self._silence_run * 1000 // RATE)
                await self._endpoint("semantic", probability)

    async def _endpoint(self, reason: str, probability: float | None = None) -> None:
        self._in_speech = False
        self._next_check_ms = 0
        turn = self._turn
        assert turn is not None
        end_ms = self._last_voiced_end * 1000 // RATE
        await self._emit(SpeechStopped(turn.turn, audio_end_ms=end_ms, reason=reason,
                                       probability=probability))
        self._end_turn(auto=True)

    # ------------------------------------------------------------------ turn end
    def _end_turn(self, *, auto: bool) -> int:
        """Detach the turn (the next audio opens a new one) and finish it in the background."""
        turn, self._turn = self._turn, None
        assert turn is not None
        spec, self._speculative = self._speculative, None
        self._in_speech = False
        self._silence_run = 0
        self._turn_boundary = self.samples
        task = asyncio.create_task(self._finish_turn(turn, spec, auto=auto),
                                   name=f"turn-end-{turn.turn}")
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)
        return turn.turn

    async def _finish_turn(self, turn: AsrTurn, spec: _Speculation | None, *,
                           auto: bool) -> None:
        try:
            result = await turn.finish(self.deadlines.asr_finalize_s)
            text = result.text
            if len(text) > len(turn.sent_stable) and text.startswith(turn.sent_stable):
                await self._emit(TranscriptDelta(turn.turn, text[len(turn.sent_stable):]))
            await self._emit(TranscriptDone(turn.turn, text, result.error))
            await self._reply_to(turn.turn, text, spec, auto=auto)
        except asyncio.CancelledError:
            if spec is not None:
                await spec.run.cancel()
            raise
        except Exception:  # a bug, not a stage failure: keep the session alive
            log.exception("turn %d: ending failed", turn.turn)
            if spec is not None:
                await spec.run.cancel()

    async def _reply_to(self, turn: int, text: str, spec: _Speculation | None, *,
                        auto: bool) -> None:
        if not auto or not self.policy.create_response:
            if spec is not None:
                await self._drop_speculation(spec, "no_auto_response")
            return
        if not text:
            if spec is not None:
                await self._drop_speculation(spec, "empty_turn")
            return
        if spec is not None and speculation_still_valid(spec.text, text):
            self.speculative_hits += 1
            spec.run.release()
            await self._emit(ReplyReleased(turn, spec.run, spec.revision, speculative_hit=True))
            return
        if spec is not None:
            log.debug("speculation r%d missed: %r != final %r", spec.revision, spec.text, text)
            self.speculative_misses += 1
            await self._drop_speculation(spec, "transcript_changed")
        self.revision += 1
        run = self._make_reply(turn, text)
        tracing.start_reply(self, turn, run)  # run.start(), in the turn's trace
        run.release()
        await self._emit(ReplyReleased(turn, run, self.revision, speculative_hit=False))

    # ------------------------------------------------------------------ ASR stream
    def _open_turn(self, start: int) -> None:
        """A new turn whose ASR hears the session's audio from sample ``start`` on."""
        self.turns += 1
        d = self.deadlines
        with tracing.turn_scope(self, self.turns):  # the turn's trace holds its ASR stream
            turn = AsrTurn(self._asr, turn=self.turns, origin=start,
                           on_partial=self._on_partial, open_timeout_s=d.asr_open_s,
                           max_pending_ms=d.asr_max_backlog_ms)
        keep = (self.samples - start) * 2
        if keep > 0:
            turn.feed(bytes(self._history[-keep:]))
        self._turn = turn

    async def _on_partial(self, turn: AsrTurn, partial: AsrPartial) -> None:
        stable = partial.stable
        if len(stable) > len(turn.sent_stable) and stable.startswith(turn.sent_stable):
            delta, turn.sent_stable = stable[len(turn.sent_stable):], stable
            await self._emit(TranscriptDelta(turn.turn, delta))
            if (self._prime is not None and turn is self._turn and self._in_speech
                    and self._speculative is None and self.policy.priming_enabled):
                self._prime(turn.turn, stable.strip())  # policy step 1
        if (turn is self._turn and self._in_speech
                and self._silence_run >= self.policy.speculative_pause_ms * RATE // 1000):
            self._maybe_speculate()
