"""Network client of the ASR service; implements the same ``AsrBackend`` as the engine.

``AsrClient(base_url).open_stream()`` opens one WebSocket per stream: ``push`` sends binary
pcm16 frames (``websockets`` awaits while its write buffer is full, so server backpressure
reaches the caller), a reader task turns server events into partials (bounded queue,
oldest dropped if the caller lags — partials supersede each other) and the final.
``transcribe`` posts a WAV to the OpenAI-compatible endpoint.

Replicas: ``base_url`` may list several services (or a DNS name with many addresses; see
``stages.common.replicas``). Each stream opens on the least-loaded healthy one, trying the
next when one refuses (handshake 503) or cannot be reached. A stream whose replica breaks
before the final marks it down and moves to another one (``RemoteAsrStream``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlencode

import httpx
from pydantic import TypeAdapter, ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from stages.asr.types import AsrError, AsrEvent, AsrFinal, AsrPartial, AsrWord
from stages.common import tracing
from stages.common.access import StageAccess
from stages.common.audio import ASR_RATE, pcm16_from_bytes, wav_bytes
from stages.common.metrics import REPLICA_FAILOVERS
from stages.common.replicas import Replica, ReplicaRefused, ReplicaSet, ReplicaUnreachable

_EVENT = TypeAdapter(AsrEvent)
_MAX_FRAME = 256 * 1024  # bytes of audio per WebSocket message (well under server limits)
# Opening a stream on one replica; the whole open (all replicas) is bounded by the caller.
CONNECT_TIMEOUT_S = 2.0
RETRYABLE = (429, 503)
# A stream keeps this much audio to send again on another replica if its own breaks.
MAX_REPLAY_S = 60.0
MAX_FAILOVERS = 3


class AsrServiceError(RuntimeError):
    """The service refused a request or closed the stream; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RemoteAsrStream:
    """``AsrStream`` over a WebSocket to ``/v1/stream``.

    It keeps the audio (and end-of-speech hints) it sent, up to ``MAX_REPLAY_S``: when its
    replica breaks the connection before the final transcript, the stream reopens on
    another replica and sends it all again (and ``finalize`` if it was asked), so the turn
    is transcribed whole instead of cut at the failure. Partials then start over (a stable
    prefix may shrink for a moment; callers only act on growth). Longer streams, or no
    replica taking over, fail as before.
    """

    def __init__(self, owner: AsrClient, replica: Replica, ws: ClientConnection, path: str,
                 queue_size: int = 256, span: tracing.Span | None = None) -> None:
        self._owner = owner
        self._span = span  # the ``asr.stream`` trace span (None: tracing off)
        self._replica = replica
        self._ws = ws
        self._path = path
        self._closing = False
        self._finalizing = False
        self._send_lock = asyncio.Lock()
        # What was sent, in order: audio (bytes) and end-of-speech hints (int ms).
        self._sent: list[bytes | int] | None = []
        self._sent_bytes = 0
        self._max_replay_bytes = int(MAX_REPLAY_S * owner.sample_rate) * 2
        self.failovers = 0
        self._partials: asyncio.Queue[AsrPartial | None] = asyncio.Queue(max(2, queue_size))
        self._final: asyncio.Future[AsrFinal] = asyncio.get_running_loop().create_future()
        self.errors: list[AsrError] = []
        self._reader = asyncio.create_task(self._read())

    @property
    def replica(self) -> str:
        """The service (replica) this stream runs on now."""
        return self._replica.url

    async def _read(self) -> None:
        holding = True  # this stream counts on self._replica's load
        try:
            while True:
                await self._read_connection(self._ws)
                code = self._ws.close_code
                if self._final.done() or self._closing or code in _NOT_BROKEN:
                    break
                reason = f"stream broken (close code {code})"
                self._owner.replicas.finished(self._replica)
                self._owner.replicas.failed(self._replica, reason)
                holding = await self._fail_over(reason)
                if not holding:
                    break
        finally:
            if holding:
                self._owner.replicas.finished(self._replica)
            self._put(None)
            if not self._final.done():
                last = self.errors[-1] if self.errors else None
                self._final.set_exception(AsrServiceError(
                    last.code if last else "closed",
                    last.message if last else "stream closed before a final transcript"))

    async def _read_connection(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
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

    async def _fail_over(self, reason: str) -> bool:
        """Reopen on another replica and send everything again; False when it cannot."""
        if self._sent is None or self.failovers >= MAX_FAILOVERS:
            return False
        try:
            replica, ws = await self._owner._connect(self._path, self._span)
        except Exception as exc:
            self.errors.append(AsrError(code="asr_unavailable", message=(
                f"the ASR replica broke the stream ({reason}) and no other took it over: "
                f"{exc}")))
            return False
        async with self._send_lock:
            self._replica, self._ws = replica, ws
            self.failovers += 1
            REPLICA_FAILOVERS.labels("asr", "moved_mid_stream").inc()
            tracing.moved(self._span, replica.url, self.failovers)
            with contextlib.suppress(ConnectionClosed):
                for item in list(self._sent):
                    if isinstance(item, int):
                        await ws.send(_end_of_speech(item))
                    else:
                        await ws.send(item)
                if self._finalizing:
                    await ws.send(_FINALIZE)
        return True

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

    def _keep(self, item: bytes | int) -> None:
        if self._sent is None:
            return
        if isinstance(item, bytes):
            self._sent_bytes += len(item)
            if self._sent_bytes > self._max_replay_bytes:
                self._sent = None  # too long to send again: this stream cannot move
                return
        self._sent.append(item)

    async def _send(self, message: bytes | str) -> None:
        """Send on the current connection; a broken one is replaced by the reader, which
        sends again what was kept."""
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(message)

    async def push(self, pcm16: bytes) -> None:
        pcm16_from_bytes(pcm16)  # validates the byte count before anything is sent
        if self._final.done():
            raise AsrServiceError("closed", "stream is finalized or closed")
        async with self._send_lock:
            for i in range(0, len(pcm16), _MAX_FRAME):
                piece = bytes(pcm16[i : i + _MAX_FRAME])
                self._keep(piece)
                await self._send(piece)

    async def partials(self) -> AsyncIterator[AsrPartial]:
        while True:
            item = await self._partials.get()
            if item is None:
                return
            yield item

    async def end_of_speech(self, audio_ms: int) -> None:
        if not self._final.done():
            async with self._send_lock:
                self._keep(int(audio_ms))
                await self._send(_end_of_speech(int(audio_ms)))

    async def finalize(self) -> AsrFinal:
        if not self._final.done():
            async with self._send_lock:
                self._finalizing = True
                await self._send(_FINALIZE)
        return await asyncio.shield(self._final)

    async def aclose(self) -> None:
        self._closing = True
        tracing.end(self._span)
        if not self._final.done():
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send('{"type":"close"}')
        await self._ws.close()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._reader, timeout=5)
        self._sent = None
        if self._final.done() and not self._final.cancelled():
            self._final.exception()  # mark retrieved: no "never retrieved" warning


def _end_of_speech(audio_ms: int) -> str:
    return f'{{"type":"end_of_speech","audio_ms":{audio_ms}}}'


_FINALIZE = '{"type":"finalize"}'
# Closes that are the request's own fault or a normal end: never moved to another replica.
_NOT_BROKEN = (1000, 1008, 1009)


class AsrClient:
    """``AsrBackend`` talking to a running ``cascade stage asr`` service."""

    def __init__(self, base_url: str | Sequence[str] | ReplicaSet, *, timeout: float = 60.0,
                 sample_rate: int = ASR_RATE, model: str = "whisper-1",
                 access: StageAccess | None = None) -> None:
        # The stage key and TLS trust (default: CASCADE_STAGE_API_KEY, CASCADE_STAGE_CA_FILE).
        self.access = access if access is not None else StageAccess.from_env()
        self.replicas = (base_url if isinstance(base_url, ReplicaSet)
                         else ReplicaSet("asr", base_url, headers=self.access.headers(),
                                         verify=self.access.verify()))
        self.base_url = self.replicas.specs[0]
        self.sample_rate = sample_rate
        self.model = model
        self._timeout = timeout
        self._http = httpx.AsyncClient(timeout=timeout, headers=self.access.headers(),
                                       verify=self.access.verify())
        self._streams: set[RemoteAsrStream] = set()

    async def open_stream(self, *, language: str | None = None,
                          prompt: str | None = None) -> RemoteAsrStream:
        query: dict[str, str | int] = {"sample_rate": self.sample_rate}
        if language:
            query["language"] = language
        if prompt:
            query["prompt"] = prompt
        path = f"/v1/stream?{urlencode(query)}"
        span = tracing.start_client("asr.stream", "asr")  # None: tracing off
        with tracing.failing(span):
            replica, ws = await self._connect(path, span)
        tracing.set_replica(span, replica.url)
        stream = RemoteAsrStream(self, replica, ws, path, span=span)
        self._streams = {s for s in self._streams if not s.done}
        self._streams.add(stream)
        return stream

    async def _connect(self, path: str, span: tracing.Span | None = None
                       ) -> tuple[Replica, ClientConnection]:
        """A stream connection on the best replica that takes it (the handshake carries
        ``span``'s trace context)."""

        async def open_on(replica: Replica) -> tuple[Replica, ClientConnection]:
            try:
                url = "ws" + replica.url[len("http"):] + path
                ws = await connect(url, max_size=2**24, open_timeout=CONNECT_TIMEOUT_S,
                                   ssl=self.access.ws_ssl(url),
                                   additional_headers=tracing.with_headers(
                                       self.access.headers(), span))
            except InvalidStatus as exc:
                status = exc.response.status_code
                code, message = _error_of(bytes(exc.response.body or b""), str(status))
                if status in RETRYABLE:
                    raise ReplicaRefused(f"{code}: {message}") from exc
                raise AsrServiceError(code, message) from exc
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                raise ReplicaUnreachable(f"{type(exc).__name__}: {exc}") from exc
            return replica, ws

        return await self.replicas.attempt(open_on, deadline_s=self._timeout)

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
