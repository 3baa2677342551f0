"""``cascade stage llm``: an OpenAI-compatible chat-completions server over the engine.

Routes: ``POST /v1/chat/completions`` (``stream`` true -> SSE ``chat.completion.chunk``
events ending in ``data: [DONE]``, with ``stream_options.include_usage``; false -> one
``chat.completion``), ``GET /v1/models`` (each model with ``max_model_len``, its context
window, as vLLM reports it), plus /healthz, /readyz, /metrics.

Disconnects: Starlette cancels a streaming response's task when the client goes away;
the cancellation reaches the engine's async generator, whose ``finally`` raises the stop
flag, so the generation thread stops within a token (``cascade_llm_cancelled_total``
counts it). Non-streaming requests poll for a disconnect while they wait.

The request body is read by hand (not by a pydantic body parameter) so that the size
limit is enforced while reading (413) and malformed JSON gets a clear 400.
The first delta is awaited before the SSE response starts, so errors that happen before
any token (busy: 429, context too long: 400) are real HTTP statuses, as with vLLM.

Primers: a request with the header ``X-Cascade-Prefill-Only`` set to a true value (what
``OpenAICompatLlm`` sends for ``LlmRequest.prefill_only``), or with ``"prefill_only": true``
in the body, runs as a primer (engine docstring): it may end at once without running, and
its response carries no content, only the finish reason and usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.common import tracing
from stages.common.jsontext import strict_loads
from stages.common.load import StageLoad
from stages.common.metrics import REQUESTS_REJECTED
from stages.common.service import RETRY_AFTER_S, add_common_routes, error_body
from stages.llm.client import PREFILL_ONLY_HEADER
from stages.llm.engine import LlamaCppLlm
from stages.llm.settings import LlmSettings
from stages.llm.types import (
    ChatMessage,
    LlmBackend,
    LlmDelta,
    LlmError,
    LlmRequest,
    LlmUsage,
    ToolChoice,
    ToolSpec,
)

log = logging.getLogger(__name__)
STAGE = "llm"


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's request we honour; unknown fields are ignored like vLLM."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    prefill_only: bool = False  # a cascade extension; see also PREFILL_ONLY_HEADER


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _reject(exc: RequestError) -> JSONResponse:
    REQUESTS_REJECTED.labels(STAGE, exc.code).inc()
    # Busy (429) or not ready (503): retryable, here a moment later or on another replica.
    headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status in (429, 503) else None
    return JSONResponse(error_body(exc.message, exc.code, exc.param), status_code=exc.status,
                        headers=headers)


def _load(backend: LlmBackend | None, settings: LlmSettings) -> StageLoad:
    """Requests in progress, waiting for a slot, and busy slots of the embedded engine
    (another backend reports only readiness)."""
    if isinstance(backend, LlamaCppLlm):
        pending, busy = backend.pending, backend.busy_slots
        return StageLoad(stage=STAGE, ready=True, active=pending,
                         queued=max(0, pending - busy),
                         capacity=backend.parallel + backend.max_waiting,
                         busy=min(1.0, busy / backend.parallel))
    return StageLoad(stage=STAGE, ready=backend is not None, active=0, queued=0,
                     capacity=settings.parallel + settings.max_waiting, busy=0.0)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes exceeds {limit}",
                           "payload_too_large")
    buf = bytearray()
    async for piece in request.stream():
        buf += piece
        if len(buf) > limit:
            raise RequestError(413, f"request body exceeds {limit} bytes", "payload_too_large")
    return bytes(buf)


def _flatten_content(raw: Any) -> None:
    """Accept OpenAI's list-of-parts content when every part is text."""
    if not isinstance(raw, dict) or not isinstance(raw.get("messages"), list):
        return
    for i, msg in enumerate(raw["messages"]):
        if isinstance(msg, dict) and isinstance(msg.get("content"), list):
            parts = msg["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
                raise RequestError(400, "only text content parts are supported",
                                   "unsupported_content", f"messages.{i}.content")
            msg["content"] = "".join(str(p.get("text", "")) for p in parts)


def parse_request(body: bytes) -> ChatCompletionRequest:
    if not body.strip():
        raise RequestError(400, "request body is empty; expected a JSON object", "invalid_json")
    try:
        raw = strict_loads(body)
    except ValueError as exc:  # also too-deep nesting and lone surrogates
        raise RequestError(400, f"malformed JSON: {exc}", "invalid_json") from exc
    if not isinstance(raw, dict):
        raise RequestError(400, "request body must be a JSON object", "invalid_json")
    if "messages" not in raw:
        raise RequestError(400, "'messages' is required", "invalid_request", "messages")
    _flatten_content(raw)
    try:
        req = ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise RequestError(400, f"{loc}: {first['msg']}", "invalid_request", loc) from exc
    if req.n != 1:
        raise RequestError(400, "n > 1 is not supported", "unsupported", "n")
    for i, msg in enumerate(req.messages):
        if msg.role in ("system", "user", "tool") and msg.content is None:
            raise RequestError(400, f"messages.{i}.content is required for role {msg.role!r}",
                               "invalid_request", f"messages.{i}.content")
    return req


async def _aclose(gen: AsyncIterator[LlmDelta]) -> None:
    """Close the backend's generator now (stops generation) rather than at GC time."""
    close = getattr(gen, "aclose", None)
    if close is not None:
        await close()


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any],
           finish: str | None = None, with_usage: bool = False) -> bytes:
    obj: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if with_usage:
        obj["usage"] = None
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _usage_json(usage: LlmUsage | None) -> dict[str, int]:
    u = usage or LlmUsage(prompt_tokens=0, completion_tokens=0)
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


async def _sse(gen: AsyncIterator[LlmDelta], first: LlmDelta | None, model: str,
               include_usage: bool) -> AsyncIterator[bytes]:
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    usage: LlmUsage | None = None
    try:
        yield _chunk(cid, created, model, {"role": "assistant", "content": ""}, None,
                     include_usage)
        item = first
        while item is not None:
            delta: dict[str, Any] = {}
            if item.text:
                delta["content"] = item.text
            if item.tool_calls:
                delta["tool_calls"] = [c.model_dump(exclude_none=True) for c in item.tool_calls]
            if delta or item.finish_reason:
                yield _chunk(cid, created, model, delta, item.finish_reason, include_usage)
            usage = item.usage or usage
            item = await anext(gen, None)
        if include_usage:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created,
                   "model": model, "choices": [], "usage": _usage_json(usage)}
            yield b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    except LlmError as exc:
        yield b"data: " + json.dumps(error_body(str(exc), exc.code)).encode() + b"\n\n"
    finally:
        await _aclose(gen)
    yield b"data: [DONE]\n\n"


async def _collect(gen: AsyncIterator[LlmDelta]) -> tuple[str, list[dict[str, Any]],
                                                          str | None, LlmUsage | None]:
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish: str | None = None
    usage: LlmUsage | None = None
    async for d in gen:
        text.append(d.text)
        for c in d.tool_calls or []:
            call = calls.setdefault(c.index, {"id": c.id or f"call_{uuid.uuid4().hex[:12]}",
                                              "type": "function",
                                              "function": {"name": "", "arguments": ""}})
            if c.function is not None:
                call["function"]["name"] += c.function.name or ""
                call["function"]["arguments"] += c.function.arguments or ""
        finish = d.finish_reason or finish
        usage = d.usage or usage
    return "".join(text), [calls[i] for i in sorted(calls)], finish, usage


def create_app(settings: LlmSettings, engine: LlmBackend | None = None) -> FastAPI:
    """The LLM service; ``engine`` overrides the llama.cpp default (tests, benchmarks)."""
    state: dict[str, LlmBackend] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            state["engine"] = engine
        else:
            def load() -> LlamaCppLlm:
                llm = LlamaCppLlm.from_settings(settings)
                llm.warmup()
                return llm

            state["engine"] = await asyncio.to_thread(load)
            log.info("LLM ready: %s", settings.resolved_model_path())
        try:
            yield
        finally:
            backend = state.pop("engine")
            await backend.aclose()

    app = FastAPI(title="cascade llm", lifespan=lifespan)
    drain = add_common_routes(app, STAGE, lambda: "engine" in state,
                              lambda: _load(state.get("engine"), settings),
                              settings.drain_timeout_s, api_key=settings.stage_api_key)
    model_name = settings.served_model_name

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model: dict[str, Any] = {"id": model_name, "object": "model", "created": 0,
                                 "owned_by": "cascade"}
        backend = state.get("engine")
        window = await backend.context_window() if backend is not None else None
        if window is not None:
            model["max_model_len"] = window  # vLLM's name for the context window
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        backend = state.get("engine")
        if backend is None:
            return _reject(RequestError(503, "model is loading", "unavailable"))
        if drain.draining:
            return _reject(RequestError(503, "this replica is shutting down", "draining"))
        try:
            req = parse_request(await _read_body(request, settings.max_message_bytes))
        except RequestError as exc:
            return _reject(exc)
        llm_req = LlmRequest(
            messages=req.messages, tools=req.tools, tool_choice=req.tool_choice,
            temperature=req.temperature, max_tokens=req.max_completion_tokens or req.max_tokens,
            stop=req.stop,
            prefill_only=req.prefill_only or _flag(request.headers.get(PREFILL_ONLY_HEADER)),
        )
        gen = tracing.server_stream(  # the generation in the caller's trace, when tracing
            "llm.generate", request.headers, backend.stream(llm_req),
            {"cascade.llm.prefill_only": llm_req.prefill_only, "cascade.llm.stream": req.stream})
        if req.stream:
            try:
                first = await anext(gen, None)
            except LlmError as exc:
                await _aclose(gen)
                return _reject(RequestError(exc.status, str(exc), exc.code))
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _sse(gen, first, model_name, include), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        task = asyncio.create_task(_collect(gen))
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return Response(status_code=499)
        try:
            text, calls, finish, usage = task.result()
        except LlmError as exc:
            return _reject(RequestError(exc.status, str(exc), exc.code))
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            message["tool_calls"] = calls
        elif not text:
            message["content"] = ""
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish or "stop"}],
            "usage": _usage_json(usage),
        })

    return app
