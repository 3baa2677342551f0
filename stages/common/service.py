"""Pieces every stage service shares: health, readiness, metrics, JSON errors, serving."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stages.common import event_loop, tracing
from stages.common.access import StageKeyGuard
from stages.common.load import StageLoad
from stages.common.metrics import (
    REQUESTS_REJECTED,
    STAGE_ACTIVE,
    STAGE_BUSY,
    STAGE_CAPACITY,
    STAGE_LOAD,
    STAGE_QUEUED,
)
from stages.common.ws_reads import QueuedReadsProtocol

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


class Drain:
    """Graceful shutdown of a stage service (``serve`` drives it on SIGTERM): new streams
    are refused (503 "draining", so clients go to another replica at once, and ``/readyz``
    fails so a load balancer stops sending), the streams in progress finish, then the
    process exits — after ``timeout_s`` at the latest, when the rest are cut (and move)."""

    def __init__(self, timeout_s: float, active: Callable[[], int],
                 on_start: Callable[[], None] | None = None) -> None:
        self.timeout_s = timeout_s
        self.active = active
        self.on_start = on_start  # called on the event loop when the drain begins
        self.draining = False


def drain_of(app: FastAPI) -> Drain | None:
    drain = getattr(app.state, "drain", None)
    return drain if isinstance(drain, Drain) else None


def add_common_routes(app: FastAPI, stage: str, is_ready: Callable[[], bool],
                      load: Callable[[], StageLoad], drain_timeout_s: float = 0.0,
                      api_key: str = "") -> Drain:
    """/healthz (process up), /readyz (model loaded and not draining, with the load),
    /load, /metrics, and uniform 4xx bodies. Returns the service's ``Drain``: its stream
    handlers refuse new streams while ``drain.draining``. ``api_key``: every other route
    needs it as a Bearer token (``StageKeyGuard``)."""
    if api_key:
        app.add_middleware(StageKeyGuard, api_key=api_key, stage=stage)
    drain = Drain(drain_timeout_s, lambda: load().active)
    app.state.drain = drain
    tracing.setup(app, f"cascade-{stage}")  # on only with an OTLP endpoint in the environment

    def current() -> StageLoad:
        now = load()
        if drain.draining:
            now = now.model_copy(update={"ready": False})
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
        status = "draining" if drain.draining else "ready" if is_ready() else "loading"
        body = {"status": status, "stage": stage, "load": current().model_dump()}
        return JSONResponse(body, status_code=200 if status == "ready" else 503)

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

    return drain


class _Server(uvicorn.Server):
    """uvicorn, except that a signal that ended a graceful shutdown is not raised again
    afterwards (uvicorn re-raises it, so the process died "killed by SIGTERM" after
    closing everything cleanly): ``serve`` then exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()  # read by uvicorn's re-raise loop


class _DrainingServer(_Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains (``Drain``) before the usual
    shutdown; a second one exits at once. uvicorn alone would cut every WebSocket with
    1012 at the first signal."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._drainer: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining or self.drain.timeout_s <= 0:
            super().handle_exit(sig, frame)
            return
        self.drain.draining = True
        log.info("draining: %d streams in progress, up to %.0f s", self.drain.active(),
                 self.drain.timeout_s)
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._start_drainer, sig)

    def _start_drainer(self, sig: int) -> None:
        if self.drain.on_start is not None:
            self.drain.on_start()
        self._drainer = asyncio.get_running_loop().create_task(self._drain_then_exit(sig))

    async def _drain_then_exit(self, sig: int) -> None:
        deadline = time.monotonic() + self.drain.timeout_s
        while time.monotonic() < deadline:  # the active count has no event to wait on
            if self.drain.active() == 0:
                break
            await asyncio.sleep(0.1)
        log.info("drained (%d streams left): shutting down", self.drain.active())
        super().handle_exit(sig, None)


def serve(app: FastAPI, host: str, port: int, log_level: str = "info", *,
          ssl_certfile: str = "", ssl_keyfile: str = "") -> None:
    """Run one service with uvicorn. SIGTERM/SIGINT: a stage service drains its streams
    first (``Drain``), then uvicorn shuts down gracefully. ``ssl_certfile`` and
    ``ssl_keyfile`` (PEM): serve HTTPS and WSS only."""
    try:
        loop_name = event_loop.configured()
        new_loop = event_loop.loop_factory(loop_name)
    except event_loop.EventLoopError as exc:
        sys.exit(f"error: {exc}")
    log.info("event loop: %s", loop_name)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        ws_max_size=16 * 1024 * 1024,
        ws=QueuedReadsProtocol,
        ws_per_message_deflate=False,  # see stages/common/ws_reads.py
        timeout_graceful_shutdown=10,
        lifespan="on",
        ssl_certfile=ssl_certfile or None,
        ssl_keyfile=ssl_keyfile or None,
    )
    drain = drain_of(app)
    server = _Server(config) if drain is None else _DrainingServer(config, drain)
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(server.serve())
    # Shut down cleanly (lifespan closed every model and connection): exit now. Left to
    # the interpreter, the exit waits on the models' idle worker threads, ~5 s inside a
    # container where PID 1 ignores the SIGTERM uvicorn re-raises, and a `docker stop`
    # (10 s by default) then ran close to its SIGKILL.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
