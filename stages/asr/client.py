"""Network client of the ASR service; implements the same ``AsrBackend`` as the engine.

``AsrClient(base_url).open_stream()`` opens one WebSocket per stream: ``push`` sends binary
pcm16 frames (``websockets`` awaits while its write buffer is full, so server backpressure
reaches the caller), a reader task turns server events into partials (bounded queue,
oldest dropped if the caller lags — partials supersede each other) and the final.
``transcribe`` posts a WAV to the OpenAI-compatible endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from urllib.parse import urlencode

import httpx
from pydantic import TypeAdapter, ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from stages.asr.types import AsrError, AsrEvent, AsrFinal, AsrPartial, AsrWord
from stages.common.audio import ASR_RATE, pcm16_from_bytes, wav_bytes

_EVENT = TypeAdapter(AsrEvent)
_MAX_FRAME = 256 * 1024  # bytes of audio per WebSocket message (well under server limits)


class AsrServiceError(RuntimeError):
    """The service refused a request or closed the stream; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RemoteAsrStream:
    """``AsrStream`` over one WebSocket to ``/v1/stream``."""

    def __init__(self, ws: ClientConnection, queue_size: int = 256) -> None:
        self._ws = ws
        self._partials: asyncio.Queue[AsrPartial | None] = asyncio.Queue(max(2, queue_size))
        self._final: asyncio.Future[AsrFinal] = asyncio.get_running_loop().create_future()
        self.errors: list[AsrError] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                if isinstance(raw, bytes):
                    continue
                try:
                    event = _EVENT.validate_json(raw)
                except ValidationError:
                    continue
                if isinstance(event, AsrPartial):
                    self._put(event)
                elif isinstance(event, AsrFinal):
                    if not self._final.done():
                        self._final.set_result(event)
                else:
                    self.errors.append(event)
        except ConnectionClosed:
            pass
        finally:
            self._put(None)
            if not self._final.done():
                last = self.errors[-1] if self.errors else None
                self._final.set_exception(AsrServiceError(
                    last.code if last else "closed",
                    last.message if last else "stream closed before a final transcript"))

    @property
    def done(self) -> bool:
        return self._reader.done()

    def _put(self, item: AsrPartial | None) -> None:
        while True:
            try:
                self._partials.put_nowait(item)
                return
            except asyncio.QueueFull:
                self._partials.get_nowait()

    async def push(self, pcm16: bytes) -> None:
        pcm16_from_bytes(pcm16)  # validates the byte count before anything is sent
        if self._final.done():
            raise AsrServiceError("closed", "stream is finalized or closed")
        view = memoryview(pcm16)
        for i in range(0, len(view), _MAX_FRAME):
            await self._ws.send(view[i : i + _MAX_FRAME])

    async def partials(self) -> AsyncIterator[AsrPartial]:
        while True:
            item = await self._partials.get()
            if item is None:
                return
            yield item

    async def end_of_speech(self, audio_ms: int) -> None:
        if not self._final.done():
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(f'{{"type":"end_of_speech","audio_ms":{int(audio_ms)}}}')

    async def finalize(self) -> AsrFinal:
        if not self._final.done():
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send('{"type":"finalize"}')
        return await asyncio.shield(self._final)

    async def aclose(self) -> None:
        if not self._final.done():
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send('{"type":"close"}')
        await self._ws.close()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._reader, timeout=5)
        if self._final.done() and not self._final.cancelled():
            self._final.exception()  # mark retrieved: no "never retrieved" warning


class AsrClient:
    """``AsrBackend`` talking to a running ``cascade stage asr`` service."""

    def __init__(self, base_url: str, *, timeout: float = 60.0, sample_rate: int = ASR_RATE,
                 model: str = "whisper-1") -> None:
        self.base_url = base_url.rstrip("/")
        self.sample_rate = sample_rate
        self.model = model
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)
        self._streams: set[RemoteAsrStream] = set()

    async def open_stream(self, *, language: str | None = None,
                          prompt: str | None = None) -> RemoteAsrStream:
        query: dict[str, str | int] = {"sample_rate": self.sample_rate}
        if language:
            query["language"] = language
        if prompt:
            query["prompt"] = prompt
        ws_base = "ws" + self.base_url[len("http"):]
        ws = await connect(f"{ws_base}/v1/stream?{urlencode(query)}", max_size=2**24)
        stream = RemoteAsrStream(ws)
        self._streams = {s for s in self._streams if not s.done}
        self._streams.add(stream)
        return stream

    async def transcribe(self, pcm16: bytes, sample_rate: int = ASR_RATE) -> AsrFinal:
        wav = wav_bytes(pcm16_from_bytes(pcm16), sample_rate)
        t0 = time.perf_counter()
        resp = await self._http.post(
            "/v1/audio/transcriptions",
            files={"file": ("audio.wav", wav, "audio/wav")},
            data={"model": self.model, "response_format": "verbose_json",
                  "timestamp_granularities[]": "word"},
        )
        if resp.status_code != 200:
            err = resp.json().get("error", {})
            raise AsrServiceError(str(err.get("code", resp.status_code)),
                                  str(err.get("message", resp.text)))
        body = resp.json()
        words = [AsrWord(word=" " + w["word"], start=w["start"], end=w["end"],
                         probability=w.get("probability", 0.0)) for w in body.get("words", [])]
        return AsrFinal(text=body["text"], words=words,
                        audio_ms=round(float(body.get("duration", 0.0)) * 1000),
                        finalize_ms=(time.perf_counter() - t0) * 1000.0)

    async def aclose(self) -> None:
        for stream in list(self._streams):
            with contextlib.suppress(Exception):
                await stream.aclose()
        self._streams.clear()
        await self._http.aclose()
