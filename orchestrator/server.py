"""The Realtime server process: ``create_app(settings)`` -> FastAPI app.

Routes: ``/v1/realtime`` (WebSocket, OpenAI-Realtime-compatible), ``/healthz``,
``/readyz``, ``/metrics`` (default Prometheus registry).

Design decisions:

- Loading (stage backends, the one ``SileroVadModel`` of the process, the session store)
  runs in a background task started by the lifespan, so /healthz answers at once and
  /readyz says 503 until everything is loaded; a load failure turns both into 5xx with
  the reason (a liveness probe then restarts the process) instead of hanging startup.
  Connections that arrive before readiness are closed with 1013 (try again later).
- Auth happens before the WebSocket is accepted. A refused client gets an HTTP 403 with an
  OpenAI-style JSON error body (the WebSocket denial-response extension; plain close
  before accept, also a 403, where the server lacks it), which the ``openai`` SDK reports
  as a failed handshake. Keys are compared with ``hmac.compare_digest``.
- Refusals that need a reason the client can read (capacity, not ready, failed resume,
  expiry) accept first, send one ``error`` event, then close with a code: 1013 for "try
  again later", 1008 for a policy refusal.
- Every server event of a connection goes through one ``Outbox``: a bounded queue drained
  by a single writer task, so sends never interleave and the session never waits on the
  client's socket. A client that reads slower than its session produces fills the queue
  and is closed with 1008; the server never buffers without bound for it.
- Client frames are handled one at a time (the next frame is read only after ``handle``
  returns), so a fast client is slowed by TCP flow control rather than by server memory.
  Binary frames are a cascade extension: raw input audio in the session's input format.
- Graceful shutdown: uvicorn closes open WebSockets with 1012 (service restart) before
  the lifespan ends; the lifespan closes any connection still open the same way, then the
  backends and the store. Session state stays in the store for a resume elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from orchestrator.backends import Backends, embedded_backends, remote_backends
from orchestrator.metrics import ACTIVE_SESSIONS, ERROR_EVENTS, REJECTED_CONNECTIONS
from orchestrator.outbox import Outbox
from orchestrator.protocol import ProtocolError, error_event
from orchestrator.settings import ServeSettings
from orchestrator.store import SessionStore, StoreError, open_store
from stages.vad.model import SileroVadModel

log = logging.getLogger(__name__)

REALTIME_PATH = "/v1/realtime"
SUBPROTOCOL = "realtime"
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_RESTART = 1012
CLOSE_TRY_AGAIN = 1013

Send = Callable[[str], Awaitable[None]]


class RealtimeSessionLike(Protocol):
    """What the server needs of a session (``orchestrator.realtime.RealtimeSession``)."""

    async def start(self, *, resume_id: str | None = None,
                    resume_token: str | None = None) -> None: ...

    async def handle(self, raw: str | bytes) -> None: ...

    async def aclose(self) -> None: ...


class SessionFactory(Protocol):
    def __call__(self, *, backends: Backends, vad: SileroVadModel, store: SessionStore,
                 settings: ServeSettings, send: Send, beta: bool = False,
                 close: Callable[[int, str], None] | None = None) -> RealtimeSessionLike: ...


@dataclass
class Resources:
    """Everything a session needs that is loaded once per process."""

    backends: Backends
    vad: SileroVadModel
    store: SessionStore

    async def aclose(self) -> None:
        await self.backends.aclose()
        with contextlib.suppress(Exception):
            await self.store.aclose()


ResourceLoader = Callable[[ServeSettings], Awaitable[Resources]]


async def load_resources(settings: ServeSettings) -> Resources:
    """Backends (embedded or remote), the VAD model and the store, concurrently and off
    the event loop."""
    if settings.distributed:
        backends_job: Awaitable[Backends] = asyncio.to_thread(
            remote_backends, settings.asr_url, settings.llm_url, settings.tts_url,
            llm_model=settings.llm_model or None, llm_api_key=settings.llm_api_key or None,
        )
    else:
        backends_job = embedded_backends()
    results = await asyncio.gather(
        backends_job,
        asyncio.to_thread(SileroVadModel),
        open_store(settings.store_settings()),
        return_exceptions=True,
    )
    backends, vad, store = results
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        if isinstance(backends, Backends):
            await backends.aclose()
        if not isinstance(store, BaseException):
            with contextlib.suppress(Exception):
                await store.aclose()
        raise failure
    assert isinstance(backends, Backends) and isinstance(vad, SileroVadModel)
    assert not isinstance(store, BaseException)
    return Resources(backends=backends, vad=vad, store=store)


def error_json(code: str, message: str, type: str = "invalid_request_error") -> str:
    """One Realtime ``error`` event (same shape in the GA and beta dialects); counted."""
    ERROR_EVENTS.labels(code).inc()
    return error_event(ProtocolError(code, message, type=type)).to_json()


def error_body(code: str, message: str) -> dict[str, object]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": code,
                      "param": None}}


class _ServerState:
    def __init__(self, settings: ServeSettings, session_factory: SessionFactory | None,
                 loader: ResourceLoader) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.loader = loader
        self.resources: Resources | None = None
        self.load_error: str | None = None
        self.active = 0
        self.outboxes: set[Outbox] = set()

    async def load(self) -> None:
        try:
            self.resources = await self.loader(self.settings)
            log.info("ready: %s stages, %s store", "remote" if self.settings.distributed
                     else "embedded", "redis" if self.settings.redis_url else "memory")
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading failed")

    def factory(self) -> SessionFactory:
        if self.session_factory is None:
            from orchestrator.realtime import RealtimeSession

            self.session_factory = RealtimeSession
        return self.session_factory


def _presented_keys(ws: WebSocket) -> list[str]:
    keys = []
    auth = ws.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    for proto in ws.scope.get("subprotocols", []):
        if proto.startswith(KEY_SUBPROTOCOL_PREFIX):
            keys.append(proto[len(KEY_SUBPROTOCOL_PREFIX):])
    return keys


def _authorized(ws: WebSocket, api_key: str) -> bool:
    if not api_key:
        return True
    expected = api_key.encode()
    # Every presented key is compared (no early exit on the first mismatch).
    results = [hmac.compare_digest(k.encode(), expected) for k in _presented_keys(ws)]
    return any(results)


def _is_beta(ws: WebSocket) -> bool:
    header = ws.headers.get("openai-beta", "")
    if any(p.strip().lower() == "realtime=v1" for p in header.split(",")):
        return True
    return BETA_SUBPROTOCOL in ws.scope.get("subprotocols", [])


async def _deny(ws: WebSocket, code: str, message: str, status: int = 403) -> None:
    try:
        await ws.send_denial_response(JSONResponse(error_body(code, message), status_code=status))
    except RuntimeError:  # the server lacks the denial-response extension: plain 403
        await ws.close(CLOSE_POLICY, message)


async def _refuse(ws: WebSocket, subprotocol: str | None, close: int, code: str,
                  message: str, type: str = "invalid_request_error") -> None:
    """Accept, send one error event, close: the client learns why."""
    await ws.accept(subprotocol=subprotocol)
    with contextlib.suppress(Exception):
        await ws.send_text(error_json(code, message, type))
        await ws.close(close, message[:120])


async def _read_loop(ws: WebSocket, session: RealtimeSessionLike, outbox: Outbox,
                     max_bytes: int) -> None:
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return
        text = msg.get("text")
        data: str | bytes | None = text if text is not None else msg.get("bytes")
        if data is None:
            continue
        if len(data) > max_bytes:  # chars of a text frame: a lower bound on its bytes
            await outbox.send(error_json(
                "invalid_value", f"Event is too large ({len(data)} > {max_bytes} bytes)."
            ))
            continue
        await session.handle(data)


async def _serve_connection(state: _ServerState, ws: WebSocket) -> None:
    settings = state.settings
    if not _authorized(ws, settings.api_key):
        REJECTED_CONNECTIONS.labels("auth").inc()
        await _deny(ws, "invalid_api_key",
                    "Missing or incorrect API key: send 'Authorization: Bearer <key>'.")
        return
    offered = ws.scope.get("subprotocols", [])
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
    resources = state.resources
    if resources is None:
        REJECTED_CONNECTIONS.labels("not_ready").inc()
        detail = state.load_error or "the server is still loading its models"
        await _refuse(ws, subprotocol, CLOSE_TRY_AGAIN, "server_not_ready",
                      f"Not ready: {detail}. Try again later.", "server_error")
        return
    if state.active >= settings.max_sessions:
        REJECTED_CONNECTIONS.labels("capacity").inc()
        await _refuse(ws, subprotocol, CLOSE_TRY_AGAIN, "session_limit_reached",
                      f"The server is at its limit of {settings.max_sessions} sessions. "
                      "Try again later.", "server_error")
        return
    resume_id = ws.query_params.get("session_id") or None
    resume_token = ws.query_params.get("resume_token") or None
    if (resume_id is None) != (resume_token is None):
        REJECTED_CONNECTIONS.labels("resume").inc()
        await _refuse(ws, subprotocol, CLOSE_POLICY, "invalid_resume",
                      "To resume a session send both 'session_id' and 'resume_token'.")
        return

    state.active += 1  # no await since the check above: the cap holds
    ACTIVE_SESSIONS.inc()
    await ws.accept(subprotocol=subprotocol)
    outbox = Outbox(ws.send_text, ws.close, settings.send_queue_events,
                    settings.close_timeout_s)
    state.outboxes.add(outbox)
    outbox.start()
    session: RealtimeSessionLike | None = None
    try:
        session = state.factory()(
            backends=resources.backends, vad=resources.vad, store=resources.store,
            settings=settings, send=outbox.send, beta=_is_beta(ws), close=outbox.close_soon,
        )
        try:
            await session.start(resume_id=resume_id, resume_token=resume_token)
        except StoreError as exc:
            REJECTED_CONNECTIONS.labels("resume").inc()
            await outbox.send(error_json(exc.code, f"Cannot resume the session: {exc}"))
            await outbox.finish(CLOSE_POLICY, exc.code)
            return
        await _run(ws, session, outbox, settings)
    except Exception:
        log.exception("realtime connection failed")
        await outbox.send(error_json("server_error", "Internal server error.", "server_error"))
        await outbox.finish(CLOSE_INTERNAL, "internal error")
    finally:
        if session is not None:
            try:
                await session.aclose()
            except Exception:
                log.exception("session aclose failed")
        await outbox.finish()
        state.outboxes.discard(outbox)
        state.active -= 1
        ACTIVE_SESSIONS.dec()


async def _run(ws: WebSocket, session: RealtimeSessionLike, outbox: Outbox,
               settings: ServeSettings) -> None:
    """Read frames until the client leaves, the outbox ends the connection, or the session
    reaches its maximum duration."""
    reader = asyncio.create_task(_read_loop(ws, session, outbox, settings.max_event_bytes))
    ending = asyncio.create_task(outbox.closing.wait())
    try:
        done, _ = await asyncio.wait({reader, ending}, timeout=settings.max_session_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if reader in done:
            reader.result()  # re-raise a session failure
        elif not done:
            REJECTED_CONNECTIONS.labels("expired").inc()
            minutes = settings.max_session_s / 60
            await outbox.send(error_json(
                "session_expired",
                f"Your session hit the maximum duration of {minutes:g} minutes.",
            ))
            await outbox.finish(CLOSE_NORMAL, "session expired")
    finally:
        for task in (reader, ending):
            task.cancel()
        await asyncio.gather(reader, ending, return_exceptions=True)


def create_app(settings: ServeSettings | None = None, *,
               session_factory: SessionFactory | None = None,
               loader: ResourceLoader = load_resources) -> FastAPI:
    """The Realtime server. ``session_factory`` defaults to ``RealtimeSession`` and
    ``loader`` to the real backends/VAD/store; tests inject both."""
    settings = settings or ServeSettings()
    state = _ServerState(settings, session_factory, loader)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(state.load(), name="load-resources")
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            for outbox in list(state.outboxes):
                outbox.abort(CLOSE_RESTART, "server shutting down")
            for _ in range(int(settings.close_timeout_s * 10)):
                if state.active == 0:
                    break
                await asyncio.sleep(0.1)
            if state.resources is not None:
                await state.resources.aclose()

    app = FastAPI(title="cascade realtime", lifespan=lifespan)
    app.state.server = state

    @app.get("/healthz")
    async def healthz() -> Response:
        if state.load_error is not None:
            return JSONResponse({"status": "failed", "error": state.load_error},
                                status_code=500)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        if state.resources is not None:
            return JSONResponse({"status": "ready", "sessions": state.active})
        if state.load_error is not None:
            return JSONResponse({"status": "failed", "error": state.load_error},
                                status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.websocket(REALTIME_PATH)
    async def realtime(ws: WebSocket) -> None:
        await _serve_connection(state, ws)

    return app
