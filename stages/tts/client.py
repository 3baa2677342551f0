"""Network client of the TTS service, implementing the same ``TtsBackend`` as the engine.

Streams go over the ``/v1/stream`` WebSocket (one connection per stream); the server's
``ready`` event is awaited in ``open_stream`` so bad parameters raise ``TtsError`` there,
exactly like the engine. ``speech`` is a thin helper for ``/v1/audio/speech``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from stages.tts.types import ChunkEvent, TtsChunk, TtsError

if TYPE_CHECKING:
    from stages.tts.types import TtsBackend, TtsStream


class TtsClientStream:
    """One remote stream; implements ``TtsStream``."""

    def __init__(self, ws: ClientConnection, owner: TtsClient) -> None:
        self._ws = ws
        self._owner = owner
        self._closed = False

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
                raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._ws.send(json.dumps({"type": "cancel"}))
        except ConnectionClosed:
            pass
        await self._ws.close()
        self._owner._streams.discard(self)


class TtsClient:
    """``TtsBackend`` over the network: ``TtsClient("http://127.0.0.1:8003")``."""

    def __init__(self, base_url: str, *, timeout: float = 30.0,
                 max_message_bytes: int = 16 * 1024 * 1024) -> None:
        self.base_url = base_url.rstrip("/")
        self._ws_base = "ws" + self.base_url.removeprefix("http")
        self._timeout = timeout
        self._max_size = max_message_bytes
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)
        self._streams: set[TtsClientStream] = set()

    async def open_stream(self, *, voice: str | None = None,
                          sample_rate: int = 24000) -> TtsClientStream:
        query: dict[str, str | int] = {"sample_rate": sample_rate}
        if voice is not None:
            query["voice"] = voice
        ws = await connect(f"{self._ws_base}/v1/stream?{urlencode(query)}",
                           max_size=self._max_size, open_timeout=self._timeout)
        try:
            first = json.loads(await ws.recv())
        except (ConnectionClosed, ValueError) as exc:
            await ws.close()
            raise TtsError(f"TTS service closed the stream at open: {exc}", "protocol") from exc
        if first.get("type") != "ready":
            await ws.close()
            raise TtsError(first.get("message", "stream refused"), first.get("code", "error"))
        stream = TtsClientStream(ws, self)
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


if TYPE_CHECKING:
    def _implements(client: TtsClient, stream: TtsClientStream) -> tuple[TtsBackend, TtsStream]:
        return client, stream  # mypy checks the client against the Protocols
