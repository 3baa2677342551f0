"""Deterministic fake stages with exact timings, for the orchestrator's timing logic.

They implement the same protocols as the real engines (LlmBackend, TtsBackend). The real
models are tested elsewhere; these make turn-taking and cancellation tests exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from stages.asr.types import AsrFinal, AsrPartial, AsrWord
from stages.llm.types import LlmDelta, LlmRequest, LlmUsage
from stages.tts.types import TtsChunk, TtsWord
from stages.vad.stream import VadFrame


class FakeLlm:
    """Streams ``tokens`` one every ``interval_s`` after ``first_token_s``."""

    def __init__(self, tokens: list[str], *, first_token_s: float = 0.01,
                 interval_s: float = 0.005, window: int | None = None) -> None:
        self.tokens = tokens
        self.window = window  # context window in tokens (None: unknown)
        self.first_token_s = first_token_s
        self.interval_s = interval_s
        self.requests: list[LlmRequest] = []
        self.emitted = 0  # tokens yielded over all requests
        self.closed_early = 0  # streams stopped before their end

    @property
    def replies(self) -> list[LlmRequest]:
        """The requests for replies: all but the primers."""
        return [r for r in self.requests if not r.prefill_only]

    @property
    def primers(self) -> list[LlmRequest]:
        """Prefill-only requests: the session's instructions, a turn's words so far."""
        return [r for r in self.requests if r.prefill_only]

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmDelta]:
        self.requests.append(request)
        if request.prefill_only:  # as the engine: read the prompt, no text
            await asyncio.sleep(self.first_token_s)
            yield LlmDelta(finish_reason="length",
                           usage=LlmUsage(prompt_tokens=5, completion_tokens=0))
            return
        finished = False
        try:
            await asyncio.sleep(self.first_token_s)
            for i, token in enumerate(self.tokens[:request.max_tokens or None]):
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

    async def context_window(self) -> int | None:
        return self.window

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
        audio = (tone(int(duration), self.sample_rate)[:2 * samples] if self.owner.loud
                 else bytes(2 * samples))
        await self._queue.put(TtsChunk(index=self._index, text=phrase, text_offset=self._offset,
                                       audio=audio, sample_rate=self.sample_rate,
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
    def __init__(self, *, synth_s: float = 0.005, ms_per_char: float = 60.0,
                 loud: bool = False) -> None:
        self.loud = loud  # a tone instead of silence (for tests that listen to the audio)
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


# ---------------------------------------------------------------- VAD and ASR fakes

FRAME = 512


class FakeVad:
    """Energy VAD: a 512-sample frame is speech (p=1) when any |sample| > 1000."""

    def __init__(self) -> None:
        self._pending = b""
        self._pos = 0

    def process(self, audio: bytes) -> list[VadFrame]:
        data = self._pending + audio
        frames = []
        whole = len(data) // (2 * FRAME) * 2 * FRAME
        samples = np.frombuffer(data[:whole], dtype="<i2").reshape(-1, FRAME)
        for row in samples:
            voiced = bool(np.abs(row.astype(np.int32)).max() > 1000)
            frames.append(VadFrame(self._pos, self._pos + FRAME, 1.0 if voiced else 0.0))
            self._pos += FRAME
        self._pending = data[whole:]
        return frames

    async def process_async(self, audio: bytes) -> list[VadFrame]:
        return self.process(audio)


class FakeAsrStream:
    """Each voiced burst of the audio it receives is one word: words[0], words[1], ...
    A partial follows every push that adds audio; finalize returns every word heard
    (plus ``final_suffix``, to simulate a final that differs from the last partial)."""

    def __init__(self, owner: FakeAsr) -> None:
        self.owner = owner
        self._received = 0
        self._bursts = 0
        self._in_burst = False
        self._queue: asyncio.Queue[AsrPartial | None] = asyncio.Queue()
        self._revision = 0

    def _text(self, n: int) -> str:
        return " ".join(self.owner.words[:n])

    async def push(self, pcm16: bytes) -> None:
        samples = np.frombuffer(pcm16, dtype="<i2")
        for i in range(0, len(samples), 160):
            voiced = bool(np.abs(samples[i:i + 160].astype(np.int32)).max(initial=0) > 1000)
            if voiced and not self._in_burst:
                self._bursts += 1
            self._in_burst = voiced
        self._received += len(samples)
        if samples.size:
            self._revision += 1
            n = min(self._bursts, len(self.owner.words))
            await self._queue.put(AsrPartial(stable=self._text(max(0, n - 1)),
                                             unstable=(" " if n > 1 else "")
                                             + (self.owner.words[n - 1] if n else ""),
                                             audio_ms=self._received * 1000 // 16000,
                                             revision=self._revision))

    async def partials(self) -> AsyncIterator[AsrPartial]:
        while (partial := await self._queue.get()) is not None:
            yield partial

    async def end_of_speech(self, audio_ms: int) -> None:
        self.owner.speech_ends.append(audio_ms)

    async def finalize(self) -> AsrFinal:
        self.owner.finalized += 1
        text = self._text(self._bursts) + self.owner.final_suffix
        await self._queue.put(None)
        return AsrFinal(text=text, words=[AsrWord(word=w, start=0, end=0, probability=1)
                                          for w in text.split()],
                        audio_ms=self._received * 1000 // 16000, finalize_ms=0.0)

    async def aclose(self) -> None:
        await self._queue.put(None)


class FakeAsr:
    def __init__(self, words: list[str], final_suffix: str = "") -> None:
        self.words = words
        self.final_suffix = final_suffix
        self.finalized = 0
        self.speech_ends: list[int] = []  # end_of_speech hints received (stream ms)
        self.streams: list[FakeAsrStream] = []

    async def open_stream(self, *, language: str | None = None,
                          prompt: str | None = None) -> FakeAsrStream:
        stream = FakeAsrStream(self)
        self.streams.append(stream)
        return stream

    async def transcribe(self, pcm16: bytes, sample_rate: int = 16000) -> AsrFinal:
        stream = await self.open_stream()
        await stream.push(pcm16)
        return await stream.finalize()

    async def aclose(self) -> None:
        return None


def tone(ms: int, rate: int = 16000) -> bytes:
    t = np.arange(rate * ms // 1000) / rate
    return (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes()


def silence(ms: int, rate: int = 16000) -> bytes:
    return bytes(2 * (rate * ms // 1000))


# ---------------------------------------------------------------- failing stages


class HangingAsr(FakeAsr):
    """An ASR stage that hears the audio (partials as usual) but whose ``finalize`` never
    answers (``hang_finalize``), or that refuses to open streams (``refuse``), or whose
    ``push`` blocks forever after ``push_limit`` pushes (a stage that stopped reading)."""

    def __init__(self, words: list[str], *, hang_finalize: bool = False,
                 refuse: bool = False, push_limit: int | None = None) -> None:
        super().__init__(words)
        self.hang_finalize = hang_finalize
        self.refuse = refuse
        self.push_limit = push_limit

    async def open_stream(self, *, language: str | None = None,
                          prompt: str | None = None) -> FakeAsrStream:
        if self.refuse:
            raise ConnectionError("ASR stage unreachable")
        stream = _HangingAsrStream(self)
        self.streams.append(stream)
        return stream


class _HangingAsrStream(FakeAsrStream):
    owner: HangingAsr

    def __init__(self, owner: HangingAsr) -> None:
        super().__init__(owner)
        self.pushes = 0

    async def push(self, pcm16: bytes) -> None:
        self.pushes += 1
        if self.owner.push_limit is not None and self.pushes > self.owner.push_limit:
            await asyncio.Event().wait()
        await super().push(pcm16)

    async def finalize(self) -> AsrFinal:
        if self.owner.hang_finalize:
            await asyncio.Event().wait()
        return await super().finalize()


class StallingLlm(FakeLlm):
    """Streams ``before_stall`` tokens, then never another one (a hung LLM stage)."""

    def __init__(self, tokens: list[str], *, before_stall: int = 0) -> None:
        super().__init__(tokens, first_token_s=0.0, interval_s=0.0)
        self.before_stall = before_stall

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmDelta]:
        self.requests.append(request)
        for token in self.tokens[:self.before_stall]:
            self.emitted += 1
            yield LlmDelta(text=token)
        await asyncio.Event().wait()
        yield LlmDelta(finish_reason="stop")  # pragma: no cover - never reached


class SilentTts(FakeTts):
    """A TTS stage that accepts text and never produces audio."""

    async def open_stream(self, *, voice: str | None = None,
                          sample_rate: int = 24000) -> FakeTtsStream:
        stream = _SilentTtsStream(self, sample_rate)
        self.streams.append(stream)
        return stream


class _SilentTtsStream(FakeTtsStream):
    async def _emit(self, phrase: str) -> None:
        self._pending = self._pending[len(phrase):]
        await asyncio.Event().wait()

    async def flush(self) -> None:
        await asyncio.Event().wait()
