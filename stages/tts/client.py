"""Network client of the TTS service, implementing the same ``TtsBackend`` as the engine.

Streams go over the ``/v1/stream`` WebSocket (one connection per stream); the server's
``ready`` event is awaited in ``open_stream`` so bad parameters raise ``TtsError`` there,
exactly like the engine. ``speech`` is a thin helper for ``/v1/audio/speech``.

Replicas: ``base_url`` may list several services (or a DNS name with many addresses; see
``stages.common.replicas``): each stream opens on the least-loaded healthy one and stays
there; a refusal (handshake 503) or an unreachable replica moves the open to the next; a
stream broken mid-way marks its replica down for later streams.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from stages.common.replicas import Replica, ReplicaRefused, ReplicaSet, ReplicaUnreachable
from stages.tts.types import ChunkEvent, TtsChunk, TtsError

# Opening a stream on one replica (connect + the server's ready event).
CONNECT_TIMEOUT_S = 2.0

if TYPE_CHECKING:
    from stages.tts.types import TtsBackend, TtsStream


class TtsClientStream:
    """One remote stream; implements ``TtsStream``."""

    def __init__(self, ws: ClientConnection, owner: TtsClient,
                 on_end: Callable[[str | None], None] | None = None) -> None:
        self._ws = ws
        self._owner = owner
        self._closed = False
        self._on_end = on_end  # told once: None, or why the replica broke the stream
        self.replica = ""  # the service (replica) this stream runs on

    def _ended(self, broken: str | None) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(broken)

    async def push_text(self, text: str) -> None:
        if self._closed:
            raise TtsError("stream is closed", "stream_closed")
        if text:
            await self._ws.send(json.dumps({"type": "text", "text": text}))

    async def flush(self) -> None:
        if not self._closed:
            await self._ws.send(json.dumps({"type": "flush"}))

    async def chunks(self) -> AsyncIterator[TtsChunk]:
        try:
            while True:
                raw = await self._ws.recv()
                if isinstance(raw, bytes):
                    raise TtsError("protocol error: audio without a chunk header", "protocol")
                event = json.loads(raw)
                kind = event.get("type")
                if kind == "chunk":
                    header = ChunkEvent.model_validate(event)
                    audio = await self._ws.recv()
                    if not isinstance(audio, bytes):
                        raise TtsError("protocol error: expected binary audio", "protocol")
                    yield TtsChunk(index=header.index, text=header.text,
                                   text_offset=header.text_offset, audio=audio,
                                   sample_rate=header.sample_rate,
                                   duration_ms=header.duration_ms, words=header.words)
                elif kind in ("done", "cancelled"):
                    return
                elif kind == "error":
                    raise TtsError(event.get("message", "error"), event.get("code", "error"))
        except ConnectionClosed:
            if not self._closed:
                self._ended(f"stream broken (close code {self._ws.close_code})")
                raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ended(None)
        try:
            await self._ws.send(json.dumps({"type": "cancel"}))
        except ConnectionClosed:
            pass
        await self._ws.close()
        self._owner._streams.discard(self)


class TtsClient:
    """``TtsBackend`` over the network: ``TtsClient("http://127.0.0.1:8003")``."""

    def __init__(self, base_url: str | Sequence[str] | ReplicaSet, *, timeout: float = 30.0,
                 max_message_bytes: int = 16 * 1024 * 1024) -> None:
        self.replicas = (base_url if isinstance(base_url, ReplicaSet)
                         else ReplicaSet("tts", base_url))
        self.base_url = self.replicas.specs[0]
        self._timeout = timeout
        self._max_size = max_message_bytes
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)
        self._streams: set[TtsClientStream] = set()

    async def open_stream(self, *, voice: str | None = None,
                          sample_rate: int = 24000) -> TtsClientStream:
        query: dict[str, str | int] = {"sample_rate": sample_rate}
        if voice is not None:
            query["voice"] = voice
        path = f"/v1/stream?{urlencode(query)}"

        async def open_on(replica: Replica) -> TtsClientStream:
            try:
                ws = await connect("ws" + replica.url.removeprefix("http") + path,
                                   max_size=self._max_size, open_timeout=CONNECT_TIMEOUT_S)
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

            def ended(broken: str | None) -> None:
                self.replicas.finished(replica)
                if broken is not None:
                    self.replicas.failed(replica, broken)

            stream = TtsClientStream(ws, self, on_end=ended)
            stream.replica = replica.url
            return stream

        stream = await self.replicas.attempt(open_on, deadline_s=self._timeout)
        self._streams.add(stream)
        return stream

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
