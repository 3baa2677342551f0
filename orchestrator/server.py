"""The Realtime server process: ``create_app(settings)`` -> FastAPI app.

Routes: ``/v1/realtime`` (WebSocket, OpenAI-Realtime-compatible; with ``?call_id=`` the
sideband control of a WebRTC call), ``POST /v1/realtime/calls`` and its hang-up
(WebRTC, ``orchestrator/webrtc/``), ``POST /v1/realtime/client_secrets`` (ephemeral
keys, ``keys.py``), the demo page at ``/`` (``web_demo.py``), ``/healthz``, ``/readyz``,
``/metrics`` (default Prometheus registry).

Design decisions:

- Loading (stage backends, the one ``SileroVadModel`` of the process, the session store)
  runs in a background task started by the lifespan, so /healthz answers at once and
  /readyz says 503 until everything is loaded; a load failure turns both into 5xx with
  the reason (a liveness probe then restarts the process) instead of hanging startup.
  Connections that arrive before readiness are closed with 1013 (try again later).
- Auth (``auth.py``: the standard key, or an ``ek_`` key whose session config then
  applies to the new session) happens before the WebSocket is accepted. A refused
  client gets an HTTP 403 with an OpenAI-style JSON error body (the WebSocket
  denial-response extension; plain close before accept, also a 403, where the server
  lacks it), which the ``openai`` SDK reports as a failed handshake.
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
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from fastapi import FastAPI, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from orchestrator import keys, web_demo
from orchestrator.auth import AuthUnavailable, Grant, authorize, presented_keys
from orchestrator.backends import Backends, embedded_backends, remote_backends
from orchestrator.metrics import ACTIVE_SESSIONS, ERROR_EVENTS, REJECTED_CONNECTIONS
from orchestrator.outbox import Outbox
from orchestrator.playout import MediaPort
from orchestrator.protocol import ProtocolError, error_event
from orchestrator.protocol.session import SessionConfig
from orchestrator.settings import ServeSettings
from orchestrator.store import SessionStore, StoreError, open_store
from orchestrator.webrtc import signalling
from orchestrator.webrtc.calls import Call, CallSession, MakeSession
from stages.vad.model import SileroVadModel

log = logging.getLogger(__name__)

REALTIME_PATH = "/v1/realtime"
SUBPROTOCOL = "realtime"
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
                    resume_token: str | None = None,
                    configs: Sequence[SessionConfig] = ()) -> None: ...

    async def handle(self, raw: str | bytes) -> None: ...

    async def aclose(self) -> None: ...


class SessionFactory(Protocol):
    def __call__(self, *, backends: Backends, vad: SileroVadModel, store: SessionStore,
                 settings: ServeSettings, send: Send, beta: bool = False,
                 close: Callable[[int, str], None] | None = None,
                 media: MediaPort | None = None) -> RealtimeSessionLike: ...


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
        self.calls: dict[str, Call] = {}
        self.secrets: keys.ClientSecrets | None = None

    async def load(self) -> None:
        try:
            resources = await self.loader(self.settings)
            self.secrets = keys.ClientSecrets(resources.store)
            self.resources = resources
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

    # --- what WebRTC signalling needs (signalling.CallHost) ----------------------------
    def client_secrets(self) -> keys.ClientSecrets | None:
        return self.secrets

    def session_maker(self) -> MakeSession | None:
        resources = self.resources
        if resources is None:
            return None
        factory = self.factory()

        def make(**ports: Any) -> CallSession:
            session = factory(backends=resources.backends, vad=resources.vad,
                              store=resources.store, settings=self.settings, **ports)
            return cast(CallSession, session)

        return make

    def reserve_session(self) -> bool:
        if self.active >= self.settings.max_sessions:
            return False
        self.active += 1
        ACTIVE_SESSIONS.inc()
        return True

    def release_session(self) -> None:
        self.active -= 1
        ACTIVE_SESSIONS.dec()


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
    offered = ws.scope.get("subprotocols", [])
    try:
        grant = await authorize(presented_keys(ws.headers, offered),
                                api_key=settings.api_key, secrets=state.secrets)
    except AuthUnavailable as exc:
        REJECTED_CONNECTIONS.labels("not_ready").inc()
        await _deny(ws, "server_not_ready", f"The key cannot be checked now ({exc}). "
                    "Try again later.", status=503)
        return
    if grant is None:
        REJECTED_CONNECTIONS.labels("auth").inc()
        await _deny(ws, "invalid_api_key", "Missing, expired or incorrect API key: send "
                    "'Authorization: Bearer <key or ek_ client secret>'.")
        return
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
    call_id = ws.query_params.get("call_id")
    if call_id is not None:
        if grant.kind == "ephemeral":  # a browser's key does not reach the sideband
            REJECTED_CONNECTIONS.labels("auth").inc()
            await _deny(ws, "invalid_api_key", "The sideband connection of a call needs the "
                        "server's API key, not a client secret.")
            return
        await _serve_sideband(state, ws, call_id, subprotocol)
        return
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
            await session.start(resume_id=resume_id, resume_token=resume_token,
                                configs=_grant_configs(grant))
        except ProtocolError as exc:  # the key's session config no longer validates
            await outbox.send(error_event(exc).to_json())
            await outbox.finish(CLOSE_POLICY, exc.code)
            return
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


def _grant_configs(grant: Grant) -> list[SessionConfig]:
    """An ephemeral key's session config, to start a new session from."""
    if grant.session is None:
        return []
    return [SessionConfig.model_validate(grant.session)]


async def _serve_sideband(state: _ServerState, ws: WebSocket, call_id: str,
                          subprotocol: str | None) -> None:
    """``/v1/realtime?call_id=rtc_...``: a WebSocket that controls a live WebRTC call like
    any Realtime WebSocket (its events go to the call's session, in order with the data
    channel's; the session's events come back here too)."""
    call = state.calls.get(call_id)
    if call is None:
        await _refuse(ws, subprotocol, CLOSE_POLICY, "call_not_found",
                      f"No live call {call_id!r} on this server.")
        return
    await ws.accept(subprotocol=subprotocol)
    settings = state.settings
    outbox = Outbox(ws.send_text, ws.close, settings.send_queue_events,
                    settings.close_timeout_s)
    call.add_outbox(outbox)
    ended = asyncio.create_task(call.ended.wait())
    closing = asyncio.create_task(outbox.closing.wait())
    reader = asyncio.create_task(_sideband_reads(ws, call, outbox, settings.max_event_bytes))
    try:
        await asyncio.wait({reader, ended, closing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (reader, ended, closing):
            task.cancel()
        await asyncio.gather(reader, ended, closing, return_exceptions=True)
        call.remove_outbox(outbox)
        await outbox.finish(CLOSE_NORMAL, "call ended" if call.ended.is_set() else "")


async def _sideband_reads(ws: WebSocket, call: Call, outbox: Outbox, max_bytes: int) -> None:
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return
        data: str | bytes | None = msg.get("text")
        if data is None:
            data = msg.get("bytes")
        if data is None:
            continue
        if len(data) > max_bytes:
            await outbox.send(error_json(
                "invalid_value", f"Event is too large ({len(data)} > {max_bytes} bytes)."))
            continue
        call.put_event(data)


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
            await asyncio.gather(*(call.close("shutdown") for call in list(state.calls.values())),
                                 return_exceptions=True)
            for _ in range(int(settings.close_timeout_s * 10)):
                if state.active == 0:
                    break
                await asyncio.sleep(0.1)
            if state.resources is not None:
                await state.resources.aclose()

    app = FastAPI(title="cascade realtime", lifespan=lifespan)
    app.state.server = state
    if settings.cors_origins:
        # Browsers preflight an SDP POST with Authorization; the agents SDK reads the
        # call id from Location.
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "OpenAI-Beta",
                           "X-OpenAI-Agents-SDK"],
            expose_headers=["Location"], max_age=600)
    app.include_router(signalling.router(state))
    app.include_router(keys.secrets_router(settings, state.client_secrets))
    app.include_router(web_demo.router(settings, state.client_secrets))

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
