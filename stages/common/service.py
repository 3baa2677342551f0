"""Pieces every stage service shares: health, readiness, metrics, JSON errors, serving."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stages.common.metrics import REQUESTS_REJECTED

log = logging.getLogger(__name__)


def error_body(message: str, code: str, param: str | None = None) -> dict[str, object]:
    """OpenAI-style error body: {"error": {"message", "type", "code", "param"}}."""
    return {
        "error": {"message": message, "type": "invalid_request_error", "code": code, "param": param}
    }


def add_common_routes(app: FastAPI, stage: str, is_ready: Callable[[], bool]) -> None:
    """/healthz (process up), /readyz (model loaded), /metrics, and uniform 4xx bodies."""

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "stage": stage}

    @app.get("/readyz")
    async def readyz() -> Response:
        if is_ready():
            return JSONResponse({"status": "ready", "stage": stage})
        return JSONResponse({"status": "loading", "stage": stage}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
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
