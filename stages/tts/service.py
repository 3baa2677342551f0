"""TTS service: streaming WebSocket ``/v1/stream`` and OpenAI-compatible ``/v1/audio/speech``.

Design decisions:
- The model loads once in the lifespan (in a thread); shutdown closes open streams.
- A WebSocket connection may run several rounds (text... flush -> done); chunk indexes
  and text offsets keep counting over the whole connection. Each round's sender task
  waits for the previous round's, so chunks always go out in order.
- A chunk is sent as a JSON header and its binary audio under one lock, so error events
  from the receive loop can never slip between the two messages.
- Bad input gets an ``error`` event; the socket stays open unless the stream cannot
  continue (bad query at connect -> 1008, message over max_message_bytes -> 1009).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, TypeAdapter, ValidationError

from stages.common import tracing
from stages.common.audio import REALTIME_RATE, wav_bytes
from stages.common.jsontext import strict_loads
from stages.common.load import StageLoad
from stages.common.metrics import REQUESTS_REJECTED
from stages.common.service import add_common_routes, busy_response, error_body, refuse_stream
from stages.tts.engine import PiperTts, PiperTtsStream
from stages.tts.settings import TtsSettings
from stages.tts.types import (
    CancelEvent,
    CancelledEvent,
    ChunkEvent,
    ClientEvent,
    DoneEvent,
    ErrorEvent,
    FlushEvent,
    ReadyEvent,
    TextEvent,
    TtsError,
)

log = logging.getLogger(__name__)
STAGE = "tts"
SPEECH_FORMATS = ("wav", "pcm")
_CLIENT_EVENT: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)
_KNOWN_TYPES = ("text", "flush", "cancel")


class SpeechRequest(BaseModel):
    """OpenAI ``/v1/audio/speech`` body (extra fields such as ``instructions`` ignored)."""

    model: str = "tts-1"
    input: str
    voice: str | None = None
    response_format: str = "wav"
    speed: float = 1.0
    stream_format: str | None = None


class _Session:
    """State of one WebSocket connection."""

    def __init__(self, ws: WebSocket, engine: PiperTts, sample_rate: int) -> None:
        self.ws = ws
        self.engine = engine
        self.sample_rate = sample_rate
        self.lock = asyncio.Lock()
        self.stream: PiperTtsStream | None = None  # the round receiving text
        self.round_offset = 0  # text offset where the current round starts
        self.pushed = 0  # chars received over the connection
        self.next_index = 0
        self.rounds: list[tuple[PiperTtsStream, asyncio.Task[None]]] = []

    async def send(self, event: BaseModel) -> None:
        async with self.lock:
            await self.ws.send_text(event.model_dump_json())

    async def error(self, code: str, message: str) -> None:
        REQUESTS_REJECTED.labels(STAGE, code).inc()
        await self.send(ErrorEvent(code=code, message=message))

    async def push(self, text: str) -> None:
        if self.stream is None:
            self.stream = await self.engine.open_stream(sample_rate=self.sample_rate)
            self.round_offset = self.pushed
            prev = self.rounds[-1][1] if self.rounds else None
            task = asyncio.create_task(self._send_round(self.stream, self.round_offset, prev))
            self.rounds.append((self.stream, task))
        self.pushed += len(text)
        await self.stream.push_text(text)

    async def flush(self) -> None:
        if self.stream is None:  # nothing pushed: an empty round answers "done" in order
            await self.push("")
        assert self.stream is not None
        stream, self.stream = self.stream, None
        await stream.flush()

    async def cancel(self) -> None:
        self.stream = None
        rounds, self.rounds = self.rounds, []
        for stream, task in rounds:
            task.cancel()
            await stream.aclose()
        for _stream, task in rounds:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _send_pair(self, header: ChunkEvent, audio: bytes) -> None:
        async with self.lock:
            await self.ws.send_text(header.model_dump_json())
            await self.ws.send_bytes(audio)
            self.next_index += 1

    async def _send_round(self, stream: PiperTtsStream, base_offset: int,
                          prev: asyncio.Task[None] | None) -> None:
        if prev is not None:
            with contextlib.suppress(Exception):
                await prev
        try:
            async for chunk in stream.chunks():
                header = ChunkEvent(
                    index=self.next_index, text=chunk.text,
                    text_offset=base_offset + chunk.text_offset,
                    sample_rate=chunk.sample_rate, duration_ms=chunk.duration_ms,
                    words=chunk.words, audio_bytes=len(chunk.audio))
                # shielded: a cancel must never split a header from its audio
                await asyncio.shield(self._send_pair(header, chunk.audio))
            await self.send(DoneEvent())
        except TtsError as exc:
            await self.error(exc.code, str(exc))
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # client went away: the receive loop cleans up
        finally:
            await stream.aclose()


def _parse_query(ws: WebSocket, engine: PiperTts, default_rate: int) -> int:
    raw = ws.query_params.get("sample_rate")
    try:
        rate = int(raw) if raw is not None else default_rate
    except ValueError:
        raise TtsError(f"sample_rate must be an integer, got {raw!r}",
                       "unsupported_sample_rate") from None
    engine.check_rate(rate)
    encoding = ws.query_params.get("encoding", "pcm16")
    if encoding != "pcm16":
        raise TtsError(f"unsupported encoding {encoding!r}; only pcm16", "unsupported_encoding")
    engine.resolve_voice(ws.query_params.get("voice"))
    return rate


def create_app(settings: TtsSettings) -> FastAPI:
    holder: dict[str, PiperTts] = {}
    sessions: set[_Session] = set()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        holder["engine"] = await asyncio.to_thread(PiperTts, settings)
        log.info("piper voice loaded (device=%s)", settings.device)
        yield
        for session in list(sessions):
            await session.cancel()
            with contextlib.suppress(Exception):
                await session.ws.close(1001)
        await holder.pop("engine").aclose()

    app = FastAPI(title="cascade tts", lifespan=lifespan)
    def load() -> StageLoad:
        engine = holder.get("engine")
        return StageLoad(stage=STAGE, ready=engine is not None, active=len(sessions),
                         queued=engine.meter.queued if engine is not None else 0,
                         capacity=settings.max_streams,
                         busy=engine.meter.busy() if engine is not None else 0.0)

    drain = add_common_routes(app, STAGE, lambda: "engine" in holder, load,
                              settings.drain_timeout_s, api_key=settings.stage_api_key)

    def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
        REQUESTS_REJECTED.labels(STAGE, code).inc()
        return JSONResponse(error_body(message, code, param), status_code=status)

    @app.middleware("http")
    async def limit_body(request: Request,
                         call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_message_bytes:
            return _error(413, f"request body too large ({length} bytes; max "
                          f"{settings.max_message_bytes})", "payload_too_large")
        return await call_next(request)

    @app.post("/v1/audio/speech", response_model=None)
    async def speech(req: SpeechRequest) -> Response:
        engine = holder["engine"]
        if drain.draining:
            return busy_response(STAGE, "this replica is shutting down", "draining")
        fmt = req.response_format
        if fmt not in SPEECH_FORMATS:
            return _error(400, f"unsupported response_format {fmt!r}; supported: "
                          f"{', '.join(SPEECH_FORMATS)}", "unsupported_response_format",
                          "response_format")
        if req.stream_format not in (None, "audio"):
            return _error(400, f"unsupported stream_format {req.stream_format!r}; "
                          "supported: audio", "unsupported_stream_format", "stream_format")
        try:
            engine.check_text(req.input)
            engine.resolve_voice(req.voice)
            stream = await engine.open_stream(sample_rate=REALTIME_RATE, speed=req.speed)
        except TtsError as exc:
            param = {"unknown_voice": "voice", "invalid_speed": "speed"}.get(exc.code, "input")
            return _error(400, str(exc), exc.code, param)
        await stream.push_text(req.input)
        await stream.flush()
        if fmt == "pcm":
            async def body() -> AsyncIterator[bytes]:
                try:
                    async for chunk in stream.chunks():
                        yield chunk.audio
                finally:
                    await stream.aclose()

            return StreamingResponse(body(), media_type="audio/pcm")
        try:
            audio = b"".join([c.audio async for c in stream.chunks()])
        finally:
            await stream.aclose()
        samples = np.frombuffer(audio, dtype="<i2")
        return Response(wav_bytes(samples, REALTIME_RATE), media_type="audio/wav")

    @app.websocket("/v1/stream")
    @tracing.server_session("tts.session")  # the stream in the caller's trace, when tracing
    async def ws_stream(ws: WebSocket) -> None:
        engine = holder.get("engine")
        # Not ready or full: refused in the handshake (503 + Retry-After), so a client
        # tries another replica at once.
        if engine is None:
            await refuse_stream(ws, STAGE, "voice is not loaded yet", "not_ready")
            return
        if drain.draining:
            await refuse_stream(ws, STAGE, "this replica is shutting down", "draining")
            return
        if len(sessions) >= settings.max_streams:
            await refuse_stream(ws, STAGE, f"server is at its limit of {settings.max_streams} "
                                "streams", "too_many_streams")
            return
        try:
            rate = _parse_query(ws, engine, settings.sample_rate)
        except TtsError as exc:
            await ws.accept()
            REQUESTS_REJECTED.labels(STAGE, exc.code).inc()
            await ws.send_text(ErrorEvent(code=exc.code, message=str(exc)).model_dump_json())
            await ws.close(1008, exc.code)
            return
        session = _Session(ws, engine, rate)
        sessions.add(session)  # counted before the accept's await: no race past the limit
        try:
            await ws.accept()
        except BaseException:
            sessions.discard(session)
            raise
        try:
            await session.send(ReadyEvent(sample_rate=rate, voice=settings.voice_name))
            await _receive_loop(session, settings)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            sessions.discard(session)
            await session.cancel()

    return app


async def _receive_loop(session: _Session, settings: TtsSettings) -> None:
    ws = session.ws
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return
        raw: str | None = msg.get("text")
        if raw is None:
            await session.error("binary_not_supported",
                                "send JSON text messages; binary input is not accepted")
            continue
        if len(raw) > settings.max_message_bytes:
            await session.error("message_too_large", f"message of {len(raw)} chars exceeds "
                                f"max_message_bytes={settings.max_message_bytes}")
            await ws.close(1009, "message_too_large")
            return
        try:
            data = strict_loads(raw)
        except ValueError as exc:  # also too-deep nesting and lone surrogates
            await session.error("malformed_json", f"message is not valid JSON: {exc}")
            continue
        kind = data.get("type") if isinstance(data, dict) else None
        if kind not in _KNOWN_TYPES:
            await session.error("unknown_type", f"unknown message type {kind!r}; expected "
                                f"one of {', '.join(_KNOWN_TYPES)}")
            continue
        try:
            event = _CLIENT_EVENT.validate_python(data)
        except ValidationError as exc:
            await session.error("invalid_event", f"invalid {kind!r} message: "
                                f"{exc.errors()[0].get('msg')}")
            continue
        try:
            if isinstance(event, TextEvent):
                if len(event.text) > settings.max_text_chars:
                    await session.error("text_too_long", f"text of {len(event.text)} chars "
                                        f"exceeds max_text_chars={settings.max_text_chars}")
                    continue
                await session.push(event.text)
            elif isinstance(event, FlushEvent):
                await session.flush()
            elif isinstance(event, CancelEvent):
                await session.cancel()
                await session.send(CancelledEvent())
        except TtsError as exc:
            await session.error(exc.code, str(exc))
