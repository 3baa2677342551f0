"""Network client of the TTS service, implementing the same ``TtsBackend`` as the engine.

Streams go over the ``/v1/stream`` WebSocket (one connection per stream); the server's
``ready`` event is awaited in ``open_stream`` so bad parameters raise ``TtsError`` there,
exactly like the engine. ``speech`` is a thin helper for ``/v1/audio/speech``.

Replicas: ``base_url`` may list several services (or a DNS name with many addresses; see
``stages.common.replicas``): each stream opens on the least-loaded healthy one and stays
there; a refusal (handshake 503) or an unreachable replica moves the open to the next. A
stream whose replica breaks mid-way moves to another one and goes on (``TtsClientStream``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from stages.common import tracing
from stages.common.access import StageAccess
from stages.common.metrics import REPLICA_FAILOVERS
from stages.common.replicas import Replica, ReplicaRefused, ReplicaSet, ReplicaUnreachable
from stages.tts.types import ChunkEvent, TtsChunk, TtsError

# Opening a stream on one replica (connect + the server's ready event).
CONNECT_TIMEOUT_S = 2.0
# A stream moves to another replica at most this often (a flapping fleet fails it instead).
MAX_FAILOVERS = 3

if TYPE_CHECKING:
    from stages.tts.types import TtsBackend, TtsStream


class TtsClientStream:
    """One remote stream; implements ``TtsStream``.

    It keeps the text it was given that has not come back as audio yet (whole phrases come
    back, so the voiced part is dropped as chunks arrive: memory is bounded by what is in
    flight). When its replica breaks the connection mid-stream, the stream reopens on
    another replica and sends that text again (and the pending flush): the caller sees the
    same chunk sequence, indexes and text offsets going on after a short gap, not an error.
    It fails only when no replica takes it over.
    """

    def __init__(self, owner: TtsClient, replica: Replica, ws: ClientConnection,
                 path: str, span: tracing.Span | None = None) -> None:
        self._owner = owner
        self._span = span  # the ``tts.stream`` trace span (None: tracing off)
        self._path = path
        self._ws = ws
        self._replica = replica
        self._closed = False
        self._send_lock = asyncio.Lock()
        self._unvoiced = ""  # text sent and not yet voiced, from ``_voiced`` on
        self._voiced = 0  # chars of the whole stream's text voiced so far
        self._ws_origin = 0  # where the current connection's text begins in the stream's
        self._flush_at: int | None = None  # end of the flushed text awaiting "done"
        self._next_index = 0
        self.failovers = 0

    @property
    def replica(self) -> str:
        """The service (replica) this stream runs on now."""
        return self._replica.url

    async def _send(self, message: dict[str, str]) -> None:
        """Send on the current connection; a broken one is left for ``chunks`` to replace
        (the text is kept and sent again there)."""
        try:
            await self._ws.send(json.dumps(message))
        except ConnectionClosed:
            pass

    async def push_text(self, text: str) -> None:
        if self._closed:
            raise TtsError("stream is closed", "stream_closed")
        if text:
            async with self._send_lock:
                self._unvoiced += text
                await self._send({"type": "text", "text": text})

    async def flush(self) -> None:
        if not self._closed:
            async with self._send_lock:
                self._flush_at = self._voiced + len(self._unvoiced)
                await self._send({"type": "flush"})

    async def chunks(self) -> AsyncIterator[TtsChunk]:
        while True:
            try:
                async for chunk in self._chunks_of_connection():
                    yield chunk
                return
            except ConnectionClosed:
                if self._closed:
                    return
                await self._fail_over()

    async def _chunks_of_connection(self) -> AsyncIterator[TtsChunk]:
        ws = self._ws
        while True:
            raw = await ws.recv()
            if isinstance(raw, bytes):
                raise TtsError("protocol error: audio without a chunk header", "protocol")
            event = json.loads(raw)
            kind = event.get("type")
            if kind == "chunk":
                header = ChunkEvent.model_validate(event)
                audio = await ws.recv()
                if not isinstance(audio, bytes):
                    raise TtsError("protocol error: expected binary audio", "protocol")
                offset = self._ws_origin + header.text_offset
                end = max(self._voiced, offset + len(header.text))
                self._unvoiced = self._unvoiced[end - self._voiced:]
                self._voiced = end
                index, self._next_index = self._next_index, self._next_index + 1
                yield TtsChunk(index=index, text=header.text, text_offset=offset,
                               audio=audio, sample_rate=header.sample_rate,
                               duration_ms=header.duration_ms, words=header.words)
            elif kind in ("done", "cancelled"):
                if kind == "done":
                    self._flush_at = None
                return
            elif kind == "error":
                raise TtsError(event.get("message", "error"), event.get("code", "error"))

    async def _fail_over(self) -> None:
        """The replica broke the stream: mark it down, open on another one, send again
        what was not voiced (and the pending flush). Raises ``TtsError`` when none can."""
        broken = self._replica
        reason = f"stream broken (close code {self._ws.close_code})"
        self._owner.replicas.finished(broken)
        self._owner.replicas.failed(broken, reason)
        try:
            if self.failovers >= MAX_FAILOVERS:
                raise TtsError(f"moved {self.failovers} times already", "tts_unavailable")
            replica, ws = await self._owner._connect(self._path, self._span)
        except Exception as exc:
            self._closed = True
            tracing.end(self._span, exc)
            self._owner._streams.discard(self)
            raise TtsError(f"the TTS replica broke the stream ({reason}) and no other took "
                           f"it over: {exc}", "tts_unavailable") from exc
        async with self._send_lock:
            self._replica, self._ws, self._ws_origin = replica, ws, self._voiced
            self.failovers += 1
            REPLICA_FAILOVERS.labels("tts", "moved_mid_stream").inc()
            tracing.moved(self._span, replica.url, self.failovers)
            flush_at = self._flush_at
            if flush_at is not None and flush_at >= self._voiced:
                cut = flush_at - self._voiced
                head, tail = self._unvoiced[:cut], self._unvoiced[cut:]
                if head:
                    await self._send({"type": "text", "text": head})
                await self._send({"type": "flush"})
                if tail:
                    await self._send({"type": "text", "text": tail})
            elif self._unvoiced:
                await self._send({"type": "text", "text": self._unvoiced})

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        tracing.end(self._span)
        self._owner.replicas.finished(self._replica)
        try:
            await self._ws.send(json.dumps({"type": "cancel"}))
        except ConnectionClosed:
            pass
        await self._ws.close()
        self._owner._streams.discard(self)


class TtsClient:
    """``TtsBackend`` over the network: ``TtsClient("http://127.0.0.1:8003")``."""

    def __init__(self, base_url: str | Sequence[str] | ReplicaSet, *, timeout: float = 30.0,
                 max_message_bytes: int = 16 * 1024 * 1024,
                 access: StageAccess | None = None) -> None:
        # The stage key and TLS trust (default: CASCADE_STAGE_API_KEY, CASCADE_STAGE_CA_FILE).
        self.access = access if access is not None else StageAccess.from_env()
        self.replicas = (base_url if isinstance(base_url, ReplicaSet)
                         else ReplicaSet("tts", base_url, headers=self.access.headers(),
                                         verify=self.access.verify()))
        self.base_url = self.replicas.specs[0]
        self._timeout = timeout
        self._max_size = max_message_bytes
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout,
                                       headers=self.access.headers(),
                                       verify=self.access.verify())
        self._streams: set[TtsClientStream] = set()

    async def open_stream(self, *, voice: str | None = None,
                          sample_rate: int = 24000) -> TtsClientStream:
        query: dict[str, str | int] = {"sample_rate": sample_rate}
        if voice is not None:
            query["voice"] = voice
        path = f"/v1/stream?{urlencode(query)}"
        span = tracing.start_client("tts.stream", "tts")  # None: tracing off
        with tracing.failing(span):
            replica, ws = await self._connect(path, span)
        tracing.set_replica(span, replica.url)
        stream = TtsClientStream(self, replica, ws, path, span)
        self._streams.add(stream)
        return stream

    async def _connect(self, path: str, span: tracing.Span | None = None
                       ) -> tuple[Replica, ClientConnection]:
        """A ready stream connection on the best replica that takes it (the handshake
        carries ``span``'s trace context)."""

        async def open_on(replica: Replica) -> tuple[Replica, ClientConnection]:
            try:
                url = "ws" + replica.url.removeprefix("http") + path
                ws = await connect(url, max_size=self._max_size, open_timeout=CONNECT_TIMEOUT_S,
                                   ssl=self.access.ws_ssl(url),
                                   additional_headers=tracing.with_headers(
                                       self.access.headers(), span))
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (429, 503):
                    raise ReplicaRefused(f"HTTP {status}") from exc
                raise TtsError(f"TTS service refused the stream: HTTP {status}",
                               "protocol") from exc
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                raise ReplicaUnreachable(f"{type(exc).__name__}: {exc}") from exc
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    first = json.loads(await ws.recv())
            except (ConnectionClosed, TimeoutError) as exc:
                await ws.close()
                raise ReplicaUnreachable(f"closed before ready: {exc!r}") from exc
            except ValueError as exc:
                await ws.close()
                raise TtsError(f"TTS service sent no ready event: {exc}", "protocol") from exc
            if first.get("type") != "ready":
                await ws.close()
                raise TtsError(first.get("message", "stream refused"),
                               first.get("code", "error"))
            return replica, ws

        return await self.replicas.attempt(open_on, deadline_s=self._timeout)

    async def synthesize(self, text: str, *, voice: str | None = None,
                         sample_rate: int = 24000) -> list[TtsChunk]:
        if not text.strip():
            raise TtsError("input text is empty", "empty_text")
        stream = await self.open_stream(voice=voice, sample_rate=sample_rate)
        try:
            await stream.push_text(text)
            await stream.flush()
            return [chunk async for chunk in stream.chunks()]
        finally:
            await stream.aclose()

    async def speech(self, text: str, *, voice: str = "joe", response_format: str = "wav",
                     speed: float = 1.0) -> bytes:
        """POST /v1/audio/speech; raises TtsError with the server's message on 4xx."""
        resp = await self._http.post("/v1/audio/speech", json={
            "model": "piper", "input": text, "voice": voice,
            "response_format": response_format, "speed": speed})
        if resp.status_code >= 400:
            err = resp.json().get("error", {})
            raise TtsError(err.get("message", resp.text), err.get("code", "error"))
        return resp.content

    async def aclose(self) -> None:
        for stream in list(self._streams):
            await stream.aclose()
        await self._http.aclose()
        await self.replicas.aclose()


if TYPE_CHECKING:
    def _implements(client: TtsClient, stream: TtsClientStream) -> tuple[TtsBackend, TtsStream]:
        return client, stream  # mypy checks the client against the Protocols
