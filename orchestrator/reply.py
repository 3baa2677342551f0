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
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from stages.llm.types import LlmBackend, LlmRequest, LlmUsage, ToolCallDelta
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
                 max_buffered: int = 256, serial: bool = False) -> None:
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
        self.serial = serial

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

    # ------------------------------------------------------------------ work
    async def _run(self) -> None:
        if self.serial:
            await self._run_serial()
            return
        tts: TtsStream | None = None
        pump: asyncio.Task[None] | None = None
        finish: str | None = None
        usage: LlmUsage | None = None
        try:
            if self._tts is not None:
                tts = await self._tts.open_stream(voice=self._voice,
                                                  sample_rate=self._sample_rate)
                pump = asyncio.create_task(self._pump_audio(tts), name="reply-audio")
            async for delta in self._llm.stream(self.request):
                if delta.text:
                    if self.timings.first_token is None:
                        self.timings.first_token = time.monotonic()
                    self.text += delta.text
                    await self._out.put(ReplyText(delta.text))
                    if tts is not None:
                        await tts.push_text(delta.text)
                if delta.tool_calls:
                    await self._out.put(ReplyToolCall(list(delta.tool_calls)))
                finish = delta.finish_reason or finish
                usage = delta.usage or usage
            if tts is not None and pump is not None:
                if self.text.strip():
                    await tts.flush()
                    await pump
                else:  # a tool call only: nothing to speak
                    pump.cancel()
            self.timings.done = time.monotonic()
            await self._out.put(ReplyDone(finish_reason=finish, usage=usage))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a stage failed: the reply ends with an error
            self.timings.done = time.monotonic()
            await self._out.put(ReplyDone(finish_reason="error", usage=usage,
                                          error=f"{type(exc).__name__}: {exc}"))
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pump
            if tts is not None:
                with contextlib.suppress(Exception):
                    await tts.aclose()

    async def _run_serial(self) -> None:
        """Baseline: full reply, then full synthesis, then everything at once."""
        held: list[ReplyEvent] = []
        finish: str | None = None
        usage: LlmUsage | None = None
        try:
            async for delta in self._llm.stream(self.request):
                if delta.text:
                    if self.timings.first_token is None:
                        self.timings.first_token = time.monotonic()
                    self.text += delta.text
                    held.append(ReplyText(delta.text))
                if delta.tool_calls:
                    held.append(ReplyToolCall(list(delta.tool_calls)))
                finish = delta.finish_reason or finish
                usage = delta.usage or usage
            if self._tts is not None and self.text.strip():
                chunks = await self._tts.synthesize(self.text, voice=self._voice,
                                                    sample_rate=self._sample_rate)
                self.timings.first_audio = time.monotonic()
                held.extend(ReplyAudio(chunk) for chunk in chunks)
            self.timings.done = time.monotonic()
            held.append(ReplyDone(finish_reason=finish, usage=usage))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.timings.done = time.monotonic()
            held.append(ReplyDone(finish_reason="error", usage=usage,
                                  error=f"{type(exc).__name__}: {exc}"))
        for event in held:
            await self._out.put(event)

    async def _pump_audio(self, tts: TtsStream) -> None:
        async for chunk in tts.chunks():
            if self.timings.first_audio is None:
                self.timings.first_audio = time.monotonic()
            await self._out.put(ReplyAudio(chunk))
