"""One assistant reply: LLM tokens stream into TTS phrase by phrase, behind a gate.

A ``ReplyRun`` may start before the end of the user's turn is confirmed (a speculative
start, see ``policy.py``). Until :meth:`ReplyRun.release` nothing it produced reaches the
caller: events wait in a bounded queue, and when the queue is full the run simply stops
pulling tokens (backpressure), so a speculative run costs at most that much work.
:meth:`ReplyRun.cancel` stops the LLM request and the TTS stream at once (barge-in, or
a speculation the user invalidated by speaking on).

Events, in production order: ``ReplyText`` (LLM text as it streams, for transcripts),
``ReplyToolCall`` (function-call deltas), ``ReplyAudio`` (one synthesized phrase with its
exact text span and word timings), and one final ``ReplyDone``.

With ``serial=True`` the run is the benchmark's baseline instead: the whole LLM reply is
generated, then synthesized as a whole, and only then is anything emitted.

Deadlines (``StageDeadlines``): while the run waits on the LLM for its first token (or
between tokens), or while TTS owes audio for text it was given, one ``asyncio.timeout``
is armed for the earliest of those waits; time spent waiting on our own consumer (a
paced playout, an unreleased speculative run) never counts. A stage that misses its
deadline ends the run with ``ReplyDone(error=..., code="llm_timeout"|"tts_timeout")``;
a stage that fails ends it with the stage's error code.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from orchestrator.policy import StageDeadlines
from stages.common.aiter import closing
from stages.llm.types import LlmBackend, LlmDelta, LlmRequest, LlmUsage, ToolCallDelta
from stages.tts.types import TtsBackend, TtsChunk, TtsStream


@dataclass(frozen=True)
class ReplyText:
    text: str


@dataclass(frozen=True)
class ReplyToolCall:
    deltas: list[ToolCallDelta]


@dataclass(frozen=True)
class ReplyAudio:
    chunk: TtsChunk


@dataclass(frozen=True)
class ReplyDone:
    finish_reason: str | None = None
    usage: LlmUsage | None = None
    error: str | None = None
    code: str | None = None  # machine-readable, with ``error``


ReplyEvent = ReplyText | ReplyToolCall | ReplyAudio | ReplyDone


@dataclass
class ReplyTimings:
    """time.monotonic() stamps of the run's milestones (None until reached)."""

    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    first_audio: float | None = None
    released: float | None = None
    done: float | None = None


class ReplyRun:
    def __init__(self, llm: LlmBackend, tts: TtsBackend | None, request: LlmRequest, *,
                 sample_rate: int = 24_000, voice: str | None = None,
                 max_buffered: int = 256, serial: bool = False,
                 deadlines: StageDeadlines | None = None,
                 failure: tuple[str, str] | None = None) -> None:
        self._llm = llm
        self._tts = tts
        self.request = request
        self._sample_rate = sample_rate
        self._voice = voice
        self._out: asyncio.Queue[ReplyEvent] = asyncio.Queue(maxsize=max_buffered)
        self._released = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.timings = ReplyTimings()
        self.text = ""  # everything the LLM said so far
        self.tokens = 0  # LLM deltas received (the work a cancelled speculation wasted)
        self.audio_ms = 0.0  # audio synthesized so far
        self.serial = serial
        self.deadlines = deadlines or StageDeadlines()
        self._failure = failure  # (code, message): the reply cannot run (e.g. context)
        # Deadline bookkeeping (time.monotonic): when the current wait on a stage began.
        self._deadline: asyncio.Timeout | None = None
        self._llm_wait_since: float | None = None
        self._tts_owed_since: float | None = None
        self._tts_call_since: float | None = None
        self._voiced_chars = 0
        self._tts_flushed = False
        self._tts_blocked = False
        self._held: list[ReplyEvent] = []  # serial mode: everything, sent at the end

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        if self._task is None:
            self.timings.started = time.monotonic()
            self._task = asyncio.create_task(self._run(), name="reply-run")

    @property
    def started(self) -> bool:
        return self._task is not None

    @property
    def released(self) -> bool:
        return self._released.is_set()

    def release(self) -> None:
        """The end of the turn is confirmed: output may flow to the client."""
        if not self._released.is_set():
            self.timings.released = time.monotonic()
            self._released.set()

    async def cancel(self) -> None:
        """Stop generation and synthesis now; pending output is dropped."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._released.set()
        while not self._out.empty():
            self._out.get_nowait()
        self._out.put_nowait(ReplyDone(finish_reason="cancelled"))

    async def events(self) -> AsyncIterator[ReplyEvent]:
        """The run's output, once released; ends after ``ReplyDone``."""
        await self._released.wait()
        while True:
            event = await self._out.get()
            yield event
            if isinstance(event, ReplyDone):
                return

    # ------------------------------------------------------------------ deadlines
    def _rearm(self) -> None:
        """Arm the timeout for the earliest wait on a stage (or disarm it)."""
        if self._deadline is None or self._deadline.expired():
            return
        d = self.deadlines
        due: list[float] = []
        if self._llm_wait_since is not None:
            limit = d.llm_first_token_s if self.timings.first_token is None else d.llm_stall_s
            due.append(self._llm_wait_since + limit)
        if self._tts_call_since is not None:
            due.append(self._tts_call_since + d.tts_s)
        if self._tts_owed_since is not None:
            due.append(self._tts_owed_since + d.tts_s)
        loop_now, now = asyncio.get_running_loop().time(), time.monotonic()
        self._deadline.reschedule(None if not due else loop_now + (min(due) - now))

    def _waiting_llm(self, waiting: bool) -> None:
        self._llm_wait_since = time.monotonic() if waiting else None
        self._rearm()

    @contextlib.asynccontextmanager
    async def _tts_call(self) -> AsyncIterator[None]:
        """Time an awaited call into TTS (open, push, flush, a whole synthesis)."""
        self._tts_call_since = time.monotonic()
        self._rearm()
        try:
            yield
        finally:
            self._tts_call_since = None
            self._rearm()

    def _tts_progress(self, voiced: int = 0, *, flushed: bool = False,
                      blocked: bool | None = None) -> None:
        """TTS voiced ``voiced`` chars / was given its last text (``flushed``).

        TTS owes audio once it has all the text (after the flush): before that its phrase
        cutter may rightly hold text until a phrase is certain. From then on each chunk
        restarts the clock, and it stands still while the audio pump waits on our own
        consumer (``blocked``), not on TTS."""
        if blocked is not None:
            self._tts_blocked = blocked
        self._tts_flushed = self._tts_flushed or flushed
        self._voiced_chars += voiced
        owed = (self._tts_flushed and not self._tts_blocked
                and len(self.text.rstrip()) > self._voiced_chars)
        if not owed:
            self._tts_owed_since = None
        elif voiced or flushed or self._tts_owed_since is None:
            self._tts_owed_since = time.monotonic()
        self._rearm()

    def _timeout_error(self) -> ReplyDone:
        d = self.deadlines
        if self._llm_wait_since is not None:
            if self.timings.first_token is None:
                return ReplyDone(finish_reason="error", code="llm_timeout",
                                 error=f"the LLM stage sent no first token within "
                                       f"{d.llm_first_token_s:g} s")
            return ReplyDone(finish_reason="error", code="llm_timeout",
                             error=f"the LLM stage stalled for {d.llm_stall_s:g} s mid-reply")
        return ReplyDone(finish_reason="error", code="tts_timeout",
                         error=f"the TTS stage produced no audio for {d.tts_s:g} s")

    # ------------------------------------------------------------------ work
    async def _run(self) -> None:
        done: ReplyDone
        if self._failure is not None:
            code, message = self._failure
            await self._out.put(ReplyDone(finish_reason="error", error=message, code=code))
            return
        try:
            async with asyncio.timeout(None) as self._deadline:
                done = await (self._work_serial() if self.serial else self._work_streaming())
        except TimeoutError:
            done = self._timeout_error()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a stage failed: the reply ends with an error
            named = getattr(exc, "code", None)  # a stage error's name (not a close code)
            done = ReplyDone(finish_reason="error", error=f"{type(exc).__name__}: {exc}",
                             code=named if isinstance(named, str) and named else "stage_error")
        finally:
            self._deadline = None
        self.timings.done = time.monotonic()
        if self.serial and done.error is not None:
            self._held.clear()  # the baseline sends all or nothing
        for event in self._held:
            await self._out.put(event)
        self._held.clear()
        await self._out.put(done)

    async def _llm_deltas(self) -> AsyncIterator[LlmDelta]:
        """The LLM's deltas, with the text collected, the first token stamped and the LLM's
        deadline running only while we wait on it (not while the caller handles a delta)."""
        self._waiting_llm(True)
        # aclosing: a reply cancelled while it handles a delta (barge-in) leaves the LLM
        # stream suspended at a yield; closed only when collected, its HTTP connection
        # stayed checked out of the client's pool (the soak filled the pool of 100 so).
        async with closing(self._llm.stream(self.request)) as deltas:
            async for delta in deltas:
                self._waiting_llm(False)
                if (delta.text or delta.tool_calls) and self.timings.first_token is None:
                    self.timings.first_token = time.monotonic()
                self.text += delta.text
                self.tokens += 1
                yield delta
                self._waiting_llm(True)
        self._waiting_llm(False)

    async def _work_streaming(self) -> ReplyDone:
        tts: TtsStream | None = None
        pump: asyncio.Task[None] | None = None
        finish: str | None = None
        usage: LlmUsage | None = None
        try:
            if self._tts is not None:
                async with self._tts_call():
                    tts = await self._tts.open_stream(voice=self._voice,
                                                      sample_rate=self._sample_rate)
                pump = asyncio.create_task(self._pump_audio(tts), name="reply-audio")
            async with closing(self._llm_deltas()) as deltas:
                async for delta in deltas:
                    if delta.text:
                        await self._out.put(ReplyText(delta.text))
                        if tts is not None:
                            async with self._tts_call():
                                await tts.push_text(delta.text)
                    if delta.tool_calls:
                        await self._out.put(ReplyToolCall(list(delta.tool_calls)))
                    finish = delta.finish_reason or finish
                    usage = delta.usage or usage
            if tts is not None and pump is not None:
                if self.text.strip():
                    async with self._tts_call():
                        await tts.flush()
                    self._tts_progress(flushed=True)
                    await pump
                else:  # a tool call only: nothing to speak
                    pump.cancel()
            self._tts_owed_since = None
            return ReplyDone(finish_reason=finish, usage=usage)
        finally:
            if pump is not None:
                if not pump.done():
                    pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pump  # also retrieves the failure of a pump that ended on its own
            if tts is not None:
                _close_later(tts)

    async def _work_serial(self) -> ReplyDone:
        """Baseline: full reply, then full synthesis, then everything at once."""
        held = self._held
        finish: str | None = None
        usage: LlmUsage | None = None
        async with closing(self._llm_deltas()) as deltas:
            async for delta in deltas:
                if delta.text:
                    held.append(ReplyText(delta.text))
                if delta.tool_calls:
                    held.append(ReplyToolCall(list(delta.tool_calls)))
                finish = delta.finish_reason or finish
                usage = delta.usage or usage
        if self._tts is not None and self.text.strip():
            async with self._tts_call():
                chunks = await self._tts.synthesize(self.text, voice=self._voice,
                                                    sample_rate=self._sample_rate)
            self.timings.first_audio = time.monotonic()
            self.audio_ms += sum(chunk.duration_ms for chunk in chunks)
            held.extend(ReplyAudio(chunk) for chunk in chunks)
        return ReplyDone(finish_reason=finish, usage=usage)

    async def _pump_audio(self, tts: TtsStream) -> None:
        async for chunk in tts.chunks():
            if self.timings.first_audio is None:
                self.timings.first_audio = time.monotonic()
            self.audio_ms += chunk.duration_ms
            self._tts_progress(voiced=len(chunk.text), blocked=True)
            await self._out.put(ReplyAudio(chunk))
            self._tts_progress(blocked=False)


_CLOSING: set[asyncio.Task[None]] = set()


def _close_later(tts: TtsStream, timeout_s: float = 5.0) -> None:
    """Close a TTS stream in the background: a hung stage must not hold up a cancel."""

    async def close() -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout_s):
                await tts.aclose()

    task = asyncio.get_running_loop().create_task(close(), name="tts-close")
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)
