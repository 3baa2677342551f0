"""HTTP/WebSocket service of the ASR stage (``cascade stage asr``).

* ``WS /v1/stream?sample_rate=16000&language=en[&prompt=...]`` — binary frames: pcm16 mono
  at ``sample_rate`` (8000/16000/24000/48000, resampled to 16 kHz with a per-stream soxr
  stream). Text frames: ``{"type":"finalize"}`` (answered by the ``final`` event, then the
  server closes with 1000) or ``{"type":"close"}``. Server events: ``partial``, ``final``,
  ``error`` (JSON). Refusals that leave the stream usable (odd byte count, malformed JSON,
  unknown type) are error events; unusable streams are closed with 1008 (bad sample rate,
  too many streams) or 1009 (oversized message).
* ``POST /v1/audio/transcriptions`` — OpenAI-compatible (multipart: file = pcm16 WAV, model,
  language, prompt, response_format json|text|verbose_json, timestamp_granularities[]).
* ``/healthz``, ``/readyz``, ``/metrics`` from ``stages.common.service``.

The model is loaded once in the lifespan, in a thread; decoding never runs on the loop.
Backpressure: a stream's ``push`` awaits when its window is full, so the receive loop
stops reading and TCP flow control slows the sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from stages.asr.engine import SUPPORTED_RATES, WhisperAsr
from stages.asr.settings import AsrSettings
from stages.asr.types import (
    AsrError,
    AsrFinal,
    CloseMessage,
    ControlMessage,
    EndOfSpeechMessage,
    FinalizeMessage,
)
from stages.common import tracing
from stages.common.audio import (
    ASR_RATE,
    AudioFormatError,
    StreamResampler,
    pcm16_from_bytes,
    pcm16_to_float,
    read_wav,
)
from stages.common.jsontext import strict_loads
from stages.common.load import StageLoad
from stages.common.metrics import REQUESTS_REJECTED
from stages.common.service import add_common_routes, busy_response, error_body, refuse_stream

log = logging.getLogger(__name__)

STAGE = "asr"
_CONTROL = TypeAdapter(ControlMessage)
_FORMATS = ("json", "text", "verbose_json")
WS_POLICY = 1008
WS_TOO_BIG = 1009
WS_TRY_LATER = 1013


class _State:
    def __init__(self) -> None:
        self.asr: WhisperAsr | None = None
        self.sockets: set[WebSocket] = set()
        # Streams past the capacity check whose engine stream is not open yet.
        self.opening = 0

    def active(self) -> int:
        return (self.asr.active_streams if self.asr is not None else 0) + self.opening


def create_app(settings: AsrSettings) -> FastAPI:
    state = _State()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.asr = await WhisperAsr.load(settings)
        log.info("asr ready: model=%s device=%s compute=%s", settings.model_path(),
                 settings.resolved_device(), settings.resolved_compute_type())
        try:
            yield
        finally:
            asr, state.asr = state.asr, None
            for ws in list(state.sockets):
                with contextlib.suppress(Exception):
                    await ws.close(code=1001)
            await asr.aclose()

    app = FastAPI(title="cascade asr", lifespan=lifespan)
    def load() -> StageLoad:
        asr = state.asr
        return StageLoad(stage=STAGE, ready=asr is not None, active=state.active(),
                         queued=asr.queued if asr is not None else 0,
                         capacity=settings.max_streams,
                         busy=asr.meter.busy() if asr is not None else 0.0)

    drain = add_common_routes(app, STAGE, lambda: state.asr is not None, load,
                              settings.drain_timeout_s, api_key=settings.stage_api_key)

    @app.websocket("/v1/stream")
    @tracing.server_session("asr.session")  # the stream in the caller's trace, when tracing
    async def stream(ws: WebSocket, sample_rate: str = str(ASR_RATE),
                     language: str | None = None, prompt: str | None = None) -> None:
        # Not ready or full: refused in the handshake (503 + Retry-After), so a client
        # tries another replica at once.
        if state.asr is None:
            await refuse_stream(ws, STAGE, "model is not loaded yet", "not_ready")
            return
        if drain.draining:
            await refuse_stream(ws, STAGE, "this replica is shutting down", "draining")
            return
        if state.active() >= settings.max_streams:
            await refuse_stream(ws, STAGE, f"server is at its limit of {settings.max_streams} "
                                "streams", "too_many_streams")
            return
        state.opening += 1
        try:
            await ws.accept()
        except BaseException:
            state.opening -= 1
            raise
        send_lock = asyncio.Lock()

        async def send(event: str) -> None:
            async with send_lock:
                await ws.send_text(event)

        async def refuse(code: str, message: str, close: int | None = None) -> None:
            REQUESTS_REJECTED.labels(STAGE, code).inc()
            with contextlib.suppress(Exception):
                await send(AsrError(code=code, message=message).model_dump_json())
                if close is not None:
                    await ws.close(code=close, reason=code)

        asr = state.asr
        rate = int(sample_rate) if sample_rate.isdigit() else -1
        if asr is None or rate not in SUPPORTED_RATES:
            state.opening -= 1
            if asr is None:
                await refuse("not_ready", "service is shutting down", WS_TRY_LATER)
            else:
                await refuse("unsupported_sample_rate",
                             f"sample_rate={sample_rate} is not supported; use one of "
                             f"{list(SUPPORTED_RATES)} (pcm16 mono)", WS_POLICY)
            return
        try:
            session = await asr.open_stream(language=language, prompt=prompt)
        finally:
            state.opening -= 1
        resampler = StreamResampler(rate, ASR_RATE)
        state.sockets.add(ws)

        async def forward_partials() -> None:
            async for partial in session.partials():
                await send(partial.model_dump_json())

        sender = asyncio.create_task(forward_partials())
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                data: bytes | None = msg.get("bytes")
                text: str | None = msg.get("text")
                size = len(data) if data is not None else len((text or "").encode())
                if size > settings.max_message_bytes:
                    await refuse("message_too_large",
                                 f"message of {size} bytes exceeds max_message_bytes="
                                 f"{settings.max_message_bytes}", WS_TOO_BIG)
                    break
                if data is not None:
                    try:
                        samples = pcm16_from_bytes(data)
                    except AudioFormatError as exc:
                        await refuse("invalid_audio", str(exc))
                        continue
                    if resampler.src_rate == ASR_RATE:
                        await session.push_samples(samples)
                    else:
                        await session.push_samples(resampler.process(pcm16_to_float(samples)))
                    continue
                try:
                    control = _CONTROL.validate_python(strict_loads(text or ""))
                except ValidationError:
                    await refuse("unknown_message_type",
                                 "expected {\"type\": \"finalize\"}, {\"type\": \"close\"} "
                                 "or {\"type\": \"end_of_speech\", \"audio_ms\": N}")
                    continue
                except ValueError as exc:  # also too-deep nesting and lone surrogates
                    await refuse("malformed_json", f"control message is not JSON: {exc}")
                    continue
                if isinstance(control, EndOfSpeechMessage):
                    await session.end_of_speech(control.audio_ms)
                    continue
                if isinstance(control, FinalizeMessage):
                    if resampler.src_rate != ASR_RATE:
                        await session.push_samples(resampler.flush())
                    try:
                        final: AsrFinal = await session.finalize()
                    except Exception as exc:
                        log.exception("finalize failed")
                        await refuse("decode_failed", f"transcription failed: {exc}", 1011)
                        break
                    await sender  # every partial is out before the final
                    await send(final.model_dump_json())
                    await ws.close(code=1000)
                    break
                if isinstance(control, CloseMessage):
                    await ws.close(code=1000)
                    break
        except (WebSocketDisconnect, RuntimeError) as exc:
            # The client vanished mid-stream (or the socket closed under us): clean up.
            log.info("asr stream ended early: %s", exc)
        finally:
            state.sockets.discard(ws)
            await session.aclose()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(sender, timeout=5)

    @app.post("/v1/audio/transcriptions", response_model=None)
    async def transcriptions(request: Request) -> Response:
        asr = state.asr
        if asr is None:
            return busy_response(STAGE, "model is not loaded yet", "not_ready")
        if drain.draining:
            return busy_response(STAGE, "this replica is shutting down", "draining")
        limit = settings.max_message_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _bad(f"request body of {declared} bytes exceeds {limit}", "too_large",
                        "file", 413)
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                return _bad(f"request body exceeds {limit} bytes", "too_large", "file", 413)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return _bad("expected a multipart/form-data body", "invalid_request", None)
        try:
            form = await _parse_form(request, bytes(body), limit)
        except MultiPartException as exc:
            return _bad(f"malformed multipart body: {exc.message}", "invalid_request", None)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            return _bad("multipart field 'file' (a pcm16 WAV) is required", "missing_file",
                        "file")

        def field(name: str) -> str | None:
            value = form.get(name)
            return value if isinstance(value, str) else None

        response_format = field("response_format") or "json"
        if response_format not in _FORMATS:
            return _bad(f"response_format must be one of {list(_FORMATS)}",
                        "unsupported_response_format", "response_format")
        try:
            samples, rate = read_wav(await upload.read())
        except AudioFormatError as exc:
            return _bad(str(exc), "invalid_audio", "file")
        if rate not in SUPPORTED_RATES:
            return _bad(f"WAV sample rate {rate} is not supported; use one of "
                        f"{list(SUPPORTED_RATES)}", "unsupported_sample_rate", "file")
        if samples.size == 0:
            return _bad("the WAV file holds no audio", "empty_audio", "file")
        language = field("language") or settings.language
        result = await asr.transcribe(samples.tobytes(), rate, language=language,
                                      prompt=field("prompt"))
        if response_format == "text":
            return PlainTextResponse(result.text + "\n")
        if response_format == "json":
            return JSONResponse({"text": result.text})
        granularities = [g for g in form.getlist("timestamp_granularities[]")
                         if isinstance(g, str)]
        body_out: dict[str, object] = {
            "task": "transcribe",
            "language": language,
            "duration": result.audio_ms / 1000.0,
            "text": result.text,
            "segments": [],
        }
        if not granularities or "word" in granularities:
            body_out["words"] = [
                {"word": w.word.strip(), "start": w.start, "end": w.end,
                 "probability": w.probability}
                for w in result.words
            ]
        return JSONResponse(body_out)

    return app


async def _parse_form(request: Request, body: bytes, limit: int) -> FormData:
    """Parse an already size-bounded body with python-multipart (via Starlette)."""

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(request.headers, chunks(), max_files=1, max_fields=16,
                             max_part_size=limit)
    return await parser.parse()


def _bad(message: str, code: str, param: str | None, status: int = 400) -> JSONResponse:
    REQUESTS_REJECTED.labels(STAGE, code).inc()
    return JSONResponse(error_body(message, code, param), status_code=status)
