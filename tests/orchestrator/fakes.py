"""Deterministic fake stages with exact timings, for the orchestrator's timing logic.

They implement the same protocols as the real engines (LlmBackend, TtsBackend). The real
models are tested elsewhere; these make turn-taking and cancellation tests exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from stages.llm.types import LlmDelta, LlmRequest, LlmUsage
from stages.tts.types import TtsChunk, TtsWord


class FakeLlm:
    """Streams ``tokens`` one every ``interval_s`` after ``first_token_s``."""

    def __init__(self, tokens: list[str], *, first_token_s: float = 0.01,
                 interval_s: float = 0.005) -> None:
        self.tokens = tokens
        self.first_token_s = first_token_s
        self.interval_s = interval_s
        self.requests: list[LlmRequest] = []
        self.emitted = 0  # tokens yielded over all requests
        self.closed_early = 0  # streams stopped before their end

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmDelta]:
        self.requests.append(request)
        finished = False
        try:
            await asyncio.sleep(self.first_token_s)
            for i, token in enumerate(self.tokens):
                if i:
                    await asyncio.sleep(self.interval_s)
                self.emitted += 1
                yield LlmDelta(text=token)
            finished = True
            yield LlmDelta(finish_reason="stop",
                           usage=LlmUsage(prompt_tokens=5, completion_tokens=len(self.tokens)))
        finally:
            if not finished:
                self.closed_early += 1

    async def aclose(self) -> None:
        return None


class FakeTtsStream:
    """Cuts at sentence ends; each phrase becomes silence of ``ms_per_char`` per char,
    with words spread evenly, after ``synth_s``."""

    def __init__(self, owner: FakeTts, sample_rate: int) -> None:
        self.owner = owner
        self.sample_rate = sample_rate
        self._pending = ""
        self._offset = 0
        self._index = 0
        self._queue: asyncio.Queue[TtsChunk | None] = asyncio.Queue()
        self.closed = False

    async def push_text(self, text: str) -> None:
        self._pending += text
        while True:
            cut = min((i for i in (self._pending.find(". "), self._pending.find("? "),
                                   self._pending.find("! ")) if i >= 0), default=-1)
            if cut < 0:
                return
            await self._emit(self._pending[:cut + 2])

    async def flush(self) -> None:
        if self._pending:
            await self._emit(self._pending)
        await self._queue.put(None)

    async def _emit(self, phrase: str) -> None:
        self._pending = self._pending[len(phrase):]
        await asyncio.sleep(self.owner.synth_s)
        duration = len(phrase) * self.owner.ms_per_char
        words, t = [], 0.0
        tokens = phrase.split()
        for token in tokens:
            span = duration * len(token) / max(1, sum(map(len, tokens)))
            words.append(TtsWord(text=token, start_ms=t, end_ms=t + span))
            t += span
        samples = int(duration * self.sample_rate / 1000)
        await self._queue.put(TtsChunk(index=self._index, text=phrase, text_offset=self._offset,
                                       audio=bytes(2 * samples), sample_rate=self.sample_rate,
                                       duration_ms=samples * 1000 / self.sample_rate,
                                       words=words))
        self._index += 1
        self._offset += len(phrase)

    async def chunks(self) -> AsyncIterator[TtsChunk]:
        while (chunk := await self._queue.get()) is not None:
            yield chunk

    async def aclose(self) -> None:
        self.closed = True


class FakeTts:
    def __init__(self, *, synth_s: float = 0.005, ms_per_char: float = 60.0) -> None:
        self.synth_s = synth_s
        self.ms_per_char = ms_per_char
        self.streams: list[FakeTtsStream] = []

    async def open_stream(self, *, voice: str | None = None,
                          sample_rate: int = 24000) -> FakeTtsStream:
        stream = FakeTtsStream(self, sample_rate)
        self.streams.append(stream)
        return stream

    async def synthesize(self, text: str, *, voice: str | None = None,
                         sample_rate: int = 24000) -> list[TtsChunk]:
        stream = await self.open_stream(sample_rate=sample_rate)
        await stream.push_text(text)
        await stream.flush()
        return [c async for c in stream.chunks()]

    async def aclose(self) -> None:
        return None
