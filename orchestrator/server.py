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
- Transports are adapters over the session core (``orchestrator/realtime.py``): the
  WebSocket in ``websocket.py``, WebRTC calls in ``webrtc/``. Both count against one
  session cap (``max_sessions``) and share the loaded resources.
- Graceful shutdown (SIGTERM): the server drains first (``drain.py``: no new sessions,
  live ones closed between turns with ``server_draining`` so their clients resume
  elsewhere, up to ``drain_timeout_s``). Then uvicorn closes open WebSockets with 1012
  (service restart) before the lifespan ends; the lifespan closes any connection still
  open the same way, then the backends and the store. Session state stays in the store
  for a resume elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from fastapi import FastAPI, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from orchestrator import keys, web_demo, websocket
from orchestrator.backends import (
    Backends,
    embedded_backends,
    load_turn_model,
    remote_backends,
    remote_llm,
)
from orchestrator.drain import drain_sessions
from orchestrator.limits import (
    DEFAULT_TENANT,
    Refusal,
    TenantLimiter,
    own,
    process_capacity,
    redact_server_logs,
)
from orchestrator.loop_lag import LoopLagMonitor
from orchestrator.metrics import ACTIVE_SESSIONS
from orchestrator.outbox import Outbox
from orchestrator.playout import MediaPort
from orchestrator.protocol.session import SessionConfig
from orchestrator.settings import ServeSettings
from orchestrator.store import SessionStore, open_store
from orchestrator.webrtc import signalling
from orchestrator.webrtc.calls import Call, CallSession, MakeSession
from stages.common import tracing
from stages.common.service import Drain
from stages.vad.model import SileroVadModel

if TYPE_CHECKING:
    from orchestrator.shared_caps import SharedSessionCaps

log = logging.getLogger(__name__)

REALTIME_PATH = "/v1/realtime"
CLOSE_RESTART = 1012

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
            access=settings.stage_access(),
        )
    else:
        llm = (remote_llm(settings.llm_url, llm_model=settings.llm_model or None,
                          llm_api_key=settings.llm_api_key or None,
                          access=settings.stage_access())
               if settings.llm_url else None)
        backends_job = embedded_backends(settings.cpu_budget(), llm=llm,
                                         llm_parallel=settings.llm_parallel)
    results = await asyncio.gather(
        backends_job,
        asyncio.to_thread(SileroVadModel),
        open_store(settings.store_settings()),
        asyncio.to_thread(load_turn_model, settings.cpu_budget().resolved().turn),
        return_exceptions=True,
    )
    backends, vad, store, turn_model = results
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        if isinstance(backends, Backends):
            await backends.aclose()
        if not isinstance(store, BaseException):
            with contextlib.suppress(Exception):
                await store.aclose()
        raise failure
    assert isinstance(backends, Backends) and isinstance(vad, SileroVadModel)
    assert not isinstance(store, BaseException) and not isinstance(turn_model, BaseException)
    backends.turn = turn_model
    await backends.start()
    return Resources(backends=backends, vad=vad, store=store)


class ServerState:
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
        self.sessions: set[RealtimeSessionLike] = set()  # live WebSocket sessions
        self.draining = False
        # Per-key (tenant) connection rates and live sessions; the tenant of each live call.
        self.limiter = TenantLimiter(settings.key_ring())
        self.call_tenants: dict[str, str] = {}
        # With the Redis store: the keys' session caps across every server (shared_caps.py).
        self.shared_caps: SharedSessionCaps | None = None
        self._drainer: asyncio.Task[int] | None = None

    def live_sessions(self) -> list[object]:
        """Every live session: WebSocket connections' and WebRTC calls'."""
        calls = [call.session for call in self.calls.values() if call.session is not None]
        return [*self.sessions, *calls]

    def begin_drain(self) -> None:
        """SIGTERM: refuse new sessions, close live ones as they go idle (``drain.py``)."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d sessions, up to %.0f s", self.active,
                 self.settings.drain_timeout_s)
        self._drainer = asyncio.get_running_loop().create_task(
            drain_sessions(self.live_sessions, self.settings.drain_timeout_s),
            name="drain-sessions")

    async def load(self) -> None:
        try:
            resources = await self.loader(self.settings)
            self.secrets = keys.ClientSecrets(resources.store)
            # Only a Redis store has imported redis-py (which imports the OpenTelemetry
            # SDK): the memory store's servers never import it.
            redis_store = sys.modules.get("orchestrator.store.redis_store")
            if redis_store is not None and isinstance(resources.store, redis_store.RedisStore):
                from orchestrator.shared_caps import SharedSessionCaps

                self.shared_caps = SharedSessionCaps(resources.store.client,
                                                     resources.store.settings.key_prefix)
            self.resources = resources
            s = self.settings
            placement = ("remote" if s.distributed else
                         "embedded (remote LLM)" if s.llm_url else "embedded")
            log.info("ready: %s stages, %s store", placement,
                     "redis" if s.redis_url else "memory")
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

    def session_maker(self, tenant: str = DEFAULT_TENANT) -> MakeSession | None:
        resources = self.resources
        if resources is None:
            return None
        factory = self.factory()

        def make(**ports: Any) -> CallSession:
            session = factory(backends=resources.backends, vad=resources.vad,
                              store=resources.store, settings=self.settings, **ports)
            own(session, tenant)
            return cast(CallSession, session)

        return make

    def admit(self, tenant: str) -> Refusal | None:
        """One more live session of ``tenant`` (the key's connection rate, the process's
        ``max_sessions``, the key's own cap, in that order), or why not. No await: the
        caps hold without a lock."""
        refusal = self.limiter.connect(tenant)
        if refusal is None and self.active >= self.settings.max_sessions:
            refusal = process_capacity(self.settings.max_sessions)
        if refusal is None:
            refusal = self.limiter.reserve(tenant)
        if refusal is None:
            self.active += 1
            ACTIVE_SESSIONS.inc()
        return refusal

    def release(self, tenant: str) -> None:
        self.limiter.release(tenant)
        self.active -= 1
        ACTIVE_SESSIONS.dec()

    async def enter(self, tenant: str, member: str) -> Refusal | None:
        """``admit``, then the key's cap across every server sharing Redis
        (``shared_caps.py``; ``member``: the session id of a resume, else ``new_member()``).
        Let in: ``leave(tenant, member)`` when the session ends."""
        refusal = self.admit(tenant)
        caps = self.shared_caps
        cap = self.limiter.ring.limits(tenant).max_sessions
        if refusal is not None or caps is None or cap <= 0:
            return refusal
        held = await caps.reserve(tenant, member, cap)
        if held is None:
            return None
        self.release(tenant)
        return Refusal("key_session_limit_reached",
                       f"This API key already has {held} live sessions across the servers, "
                       "its limit. Close one or try again later.", "key_capacity",
                       retry_after_s=5)

    def rename_member(self, tenant: str, member: str, session: object) -> str:
        """A started session's id is known: its shared-cap entry takes it (see ``enter``);
        returns the member to ``leave`` with."""
        session_id = getattr(session, "session_id", None)  # RealtimeSession's
        if self.shared_caps is None or not isinstance(session_id, str) or not session_id:
            return member
        self.shared_caps.rename(tenant, member, session_id)
        return session_id

    def leave(self, tenant: str, member: str) -> None:
        self.release(tenant)
        if self.shared_caps is not None:
            self.shared_caps.release(tenant, member)


def create_app(settings: ServeSettings | None = None, *,
               session_factory: SessionFactory | None = None,
               loader: ResourceLoader = load_resources) -> FastAPI:
    """The Realtime server. ``session_factory`` defaults to ``RealtimeSession`` and
    ``loader`` to the real backends/VAD/store; tests inject both."""
    settings = settings or ServeSettings()
    redact_server_logs()  # resume tokens travel in query strings: keep them out of logs
    state = ServerState(settings, session_factory, loader)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(state.load(), name="load-resources")
        lag = LoopLagMonitor()  # event-loop lag and leak-counting gauges (/metrics)
        lag.start()
        try:
            yield
        finally:
            await lag.stop()
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
            if state.shared_caps is not None:
                await state.shared_caps.aclose()
            if state.resources is not None:
                await state.resources.aclose()

    app = FastAPI(title="cascade realtime", lifespan=lifespan)
    tracing.setup(app, "cascade-orchestrator")  # on only with an OTLP endpoint in the env
    app.state.server = state
    # SIGTERM: sessions close as they go idle (up to drain_timeout_s), then uvicorn stops;
    # the extra close_timeout_s lets the last ones flush their closing event.
    app.state.drain = Drain(settings.drain_timeout_s + settings.close_timeout_s,
                            lambda: state.active, on_start=state.begin_drain)
    if settings.cors_origins:
        # Browsers preflight an SDP POST with Authorization; the agents SDK reads the
        # call id from Location.
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "OpenAI-Beta",
                           "X-OpenAI-Agents-SDK"],
            expose_headers=["Location"], max_age=600)
    app.include_router(signalling.router(state))
    app.include_router(keys.secrets_router(settings, state.client_secrets, state.limiter))
    app.include_router(web_demo.router(settings, state.client_secrets))

    @app.get("/healthz")
    async def healthz() -> Response:
        if state.load_error is not None:
            return JSONResponse({"status": "failed", "error": state.load_error},
                                status_code=500)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        if state.draining:
            return JSONResponse({"status": "draining", "sessions": state.active},
                                status_code=503)
        if state.resources is not None:
            return JSONResponse({"status": "ready", "sessions": state.active,
                                 "stages": state.resources.backends.replicas()})
        if state.load_error is not None:
            return JSONResponse({"status": "failed", "error": state.load_error},
                                status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.websocket(REALTIME_PATH)
    async def realtime(ws: WebSocket) -> None:
        await websocket.serve(state, ws)

    return app
