"""Network client of the ASR service; implements the same ``AsrBackend`` as the engine.

``AsrClient(base_url).open_stream()`` opens one WebSocket per stream: ``push`` sends binary
pcm16 frames (``websockets`` awaits while its write buffer is full, so server backpressure
reaches the caller), a reader task turns server events into partials (bounded queue,
oldest dropped if the caller lags — partials supersede each other) and the final.
``transcribe`` posts a WAV to the OpenAI-compatible endpoint.

Replicas: ``base_url`` may list several services (or a DNS name with many addresses; see
``stages.common.replicas``). Each stream opens on the least-loaded healthy one, trying the
next when one refuses (handshake 503) or cannot be reached; a stream whose replica breaks
before the final marks it down, so the next turn goes elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from urllib.parse import urlencode

import httpx
from pydantic import TypeAdapter, ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from stages.asr.types import AsrError, AsrEvent, AsrFinal, AsrPartial, AsrWord
from stages.common.audio import ASR_RATE, pcm16_from_bytes, wav_bytes
from stages.common.replicas import Replica, ReplicaRefused, ReplicaSet, ReplicaUnreachable

_EVENT = TypeAdapter(AsrEvent)
_MAX_FRAME = 256 * 1024  # bytes of audio per WebSocket message (well under server limits)
# Opening a stream on one replica; the whole open (all replicas) is bounded by the caller.
CONNECT_TIMEOUT_S = 2.0
RETRYABLE = (429, 503)


class AsrServiceError(RuntimeError):
    """The service refused a request or closed the stream; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RemoteAsrStream:
    """``AsrStream`` over one WebSocket to ``/v1/stream``."""

    def __init__(self, ws: ClientConnection, queue_size: int = 256,
                 on_end: Callable[[str | None], None] | None = None) -> None:
        self._ws = ws
        self._on_end = on_end  # told once: None, or why the replica broke the stream
        self._closing = False
        self.replica = ""  # the service (replica) this stream runs on
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
            broken = None
            if not self._final.done() and not self._closing and self._ws.close_code != 1000:
                broken = f"stream broken (close code {self._ws.close_code})"
            if self._on_end is not None:
                self._on_end(broken)
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
        self._closing = True
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

    def __init__(self, base_url: str | Sequence[str] | ReplicaSet, *, timeout: float = 60.0,
                 sample_rate: int = ASR_RATE, model: str = "whisper-1") -> None:
        self.replicas = (base_url if isinstance(base_url, ReplicaSet)
                         else ReplicaSet("asr", base_url))
        self.base_url = self.replicas.specs[0]
        self.sample_rate = sample_rate
        self.model = model
        self._timeout = timeout
        self._http = httpx.AsyncClient(timeout=timeout)
        self._streams: set[RemoteAsrStream] = set()

    async def open_stream(self, *, language: str | None = None,
                          prompt: str | None = None) -> RemoteAsrStream:
        query: dict[str, str | int] = {"sample_rate": self.sample_rate}
        if language:
            query["language"] = language
        if prompt:
            query["prompt"] = prompt
        path = f"/v1/stream?{urlencode(query)}"

        async def open_on(replica: Replica) -> RemoteAsrStream:
            try:
                ws = await connect("ws" + replica.url[len("http"):] + path, max_size=2**24,
                                   open_timeout=CONNECT_TIMEOUT_S)
            except InvalidStatus as exc:
                status = exc.response.status_code
                code, message = _error_of(bytes(exc.response.body or b""), str(status))
                if status in RETRYABLE:
                    raise ReplicaRefused(f"{code}: {message}") from exc
                raise AsrServiceError(code, message) from exc
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                raise ReplicaUnreachable(f"{type(exc).__name__}: {exc}") from exc

            def ended(broken: str | None) -> None:
                self.replicas.finished(replica)
                if broken is not None:
                    self.replicas.failed(replica, broken)

            stream = RemoteAsrStream(ws, on_end=ended)
            stream.replica = replica.url
            return stream

        stream = await self.replicas.attempt(open_on, deadline_s=self._timeout)
        self._streams = {s for s in self._streams if not s.done}
        self._streams.add(stream)
        return stream

    async def transcribe(self, pcm16: bytes, sample_rate: int = ASR_RATE) -> AsrFinal:
        wav = wav_bytes(pcm16_from_bytes(pcm16), sample_rate)
        t0 = time.perf_counter()

        async def post_to(replica: Replica) -> httpx.Response:
            try:
                resp = await self._http.post(
                    f"{replica.url}/v1/audio/transcriptions",
                    files={"file": ("audio.wav", wav, "audio/wav")},
                    data={"model": self.model, "response_format": "verbose_json",
                          "timestamp_granularities[]": "word"},
                )
            except httpx.TransportError as exc:
                raise ReplicaUnreachable(f"{type(exc).__name__}: {exc}") from exc
            if resp.status_code in RETRYABLE:
                raise ReplicaRefused(" ".join(_error_of(resp.content, str(resp.status_code))))
            self.replicas.finished(replica)  # one request: done once answered
            return resp

        resp = await self.replicas.attempt(post_to, deadline_s=self._timeout)
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
        await self.replicas.aclose()


def _error_of(body: bytes, fallback: str) -> tuple[str, str]:
    """(code, message) of an OpenAI-style JSON error body; the raw text otherwise."""
    try:
        err = json.loads(body).get("error") or {}
        return str(err.get("code") or fallback), str(err.get("message") or "")
    except (ValueError, AttributeError):
        return fallback, body.decode("utf-8", "replace")[:300]
