"""Pieces every stage service shares: health, readiness, metrics, JSON errors, serving."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stages.common.load import StageLoad
from stages.common.metrics import (
    REQUESTS_REJECTED,
    STAGE_ACTIVE,
    STAGE_BUSY,
    STAGE_CAPACITY,
    STAGE_LOAD,
    STAGE_QUEUED,
)

log = logging.getLogger(__name__)


def error_body(message: str, code: str, param: str | None = None) -> dict[str, object]:
    """OpenAI-style error body: {"error": {"message", "type", "code", "param"}}."""
    return {
        "error": {"message": message, "type": "invalid_request_error", "code": code, "param": param}
    }


RETRY_AFTER_S = 1


def busy_response(stage: str, message: str, code: str = "at_capacity") -> JSONResponse:
    """503 + Retry-After: this replica is full or not ready; another one (or a retry a
    moment later) will take the request. The orchestrator's replica routing moves on."""
    REQUESTS_REJECTED.labels(stage, code).inc()
    return JSONResponse(error_body(message, code), status_code=503,
                        headers={"Retry-After": str(RETRY_AFTER_S)})


async def refuse_stream(ws: WebSocket, stage: str, message: str,
                        code: str = "at_capacity") -> None:
    """Refuse a WebSocket stream in its handshake (before ``accept``) with the same
    503 + Retry-After + JSON body: a client learns it at connect time, with no extra
    round trip, and can try another replica at once."""
    await ws.send_denial_response(busy_response(stage, message, code))


def add_common_routes(app: FastAPI, stage: str, is_ready: Callable[[], bool],
                      load: Callable[[], StageLoad]) -> None:
    """/healthz (process up), /readyz (model loaded, with the load), /load, /metrics, and
    uniform 4xx bodies."""

    def current() -> StageLoad:
        now = load()
        STAGE_ACTIVE.labels(stage).set(now.active)
        STAGE_QUEUED.labels(stage).set(now.queued)
        STAGE_CAPACITY.labels(stage).set(now.capacity)
        STAGE_BUSY.labels(stage).set(now.busy)
        STAGE_LOAD.labels(stage).set(now.score)
        return now

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "stage": stage}

    @app.get("/readyz")
    async def readyz() -> Response:
        body = {"status": "ready" if is_ready() else "loading", "stage": stage,
                "load": current().model_dump()}
        return JSONResponse(body, status_code=200 if is_ready() else 503)

    @app.get("/load")
    async def load_route() -> StageLoad:
        return current()

    @app.get("/metrics")
    async def metrics() -> Response:
        current()
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        REQUESTS_REJECTED.labels(stage, "validation").inc()
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = f"{loc}: {first.get('msg', 'invalid request')}" if loc else str(first.get("msg"))
        return JSONResponse(error_body(msg, "invalid_request", loc or None), status_code=400)


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Run one service with uvicorn; SIGTERM/SIGINT drain connections (graceful shutdown)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        ws_max_size=16 * 1024 * 1024,
        timeout_graceful_shutdown=10,
        lifespan="on",
    )
    asyncio.run(uvicorn.Server(config).serve())
