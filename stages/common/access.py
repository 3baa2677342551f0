"""Who may use a stage service, and how the orchestrator reaches one (key and TLS).

Server side: ``StageKeyGuard`` wraps a stage service's app. With a key set
(``CASCADE_STAGE_API_KEY``, shared by the three stages and the orchestrator), every HTTP
request and WebSocket handshake must carry ``Authorization: Bearer <key>``, except the
probes and the scrape (``OPEN_PATHS``: ``/healthz`` and ``/readyz`` for the kubelet,
which sends no credentials, and ``/metrics`` like the orchestrator's own, for Prometheus:
load and latency figures, never a transcript, a prompt or audio; a NetworkPolicy limits
who reaches it). A refusal is 401 with an OpenAI-style JSON body, in the WebSocket
handshake too (before anything is accepted or any model work starts). The key is compared
with ``hmac.compare_digest`` and never logged. Without a key the service is open: bind it
to loopback (the default) or a private network (docs/security.md).

Client side: ``StageAccess`` is what the orchestrator's stage clients (and the replica
poller) present: the same key as a Bearer header, and the TLS trust for ``https``/``wss``
stage URLs: ``CASCADE_STAGE_CA_FILE`` (a PEM bundle, e.g. a private CA or a self-signed
certificate), or else the libraries' defaults (httpx: certifi's bundle; websockets: the
system's trust store).
"""

from __future__ import annotations

import functools
import hmac
import logging
import ssl
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from stages.common.metrics import REQUESTS_REJECTED

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
UNAUTHORIZED = {"error": {"message": "missing or invalid stage API key (Authorization: Bearer)",
                          "type": "invalid_request_error", "code": "invalid_api_key",
                          "param": None}}


class StageAccessSettings(BaseSettings):
    """``CASCADE_STAGE_API_KEY`` and ``CASCADE_STAGE_CA_FILE`` from the environment."""

    model_config = SettingsConfigDict(env_prefix="CASCADE_STAGE_", extra="ignore")

    api_key: str = ""
    ca_file: str = ""


@functools.lru_cache(maxsize=8)
def client_ssl_context(ca_file: str) -> ssl.SSLContext:
    """A verifying TLS client context trusting ``ca_file`` alone. Cached: building one
    reads the whole bundle."""
    return ssl.create_default_context(cafile=ca_file)


@dataclass(frozen=True)
class StageAccess:
    """The key and TLS trust a stage client uses. ``repr`` hides the key."""

    api_key: str = ""
    ca_file: str = ""

    @classmethod
    def from_env(cls) -> StageAccess:
        settings = StageAccessSettings()
        return cls(settings.api_key, settings.ca_file)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def verify(self) -> ssl.SSLContext | bool:
        """httpx's ``verify``: the CA file's context, else True (httpx's default trust)."""
        return client_ssl_context(self.ca_file) if self.ca_file else True

    def ws_ssl(self, url: str) -> ssl.SSLContext | None:
        """The ``ssl`` argument of a WebSocket connect to ``url``: the CA file's context
        for ``wss://``, else None (``websockets``' default: the system's trust store)."""
        return client_ssl_context(self.ca_file) if self.ca_file and url.startswith(
            "wss://") else None

    def __repr__(self) -> str:
        return f"StageAccess(api_key={'***' if self.api_key else ''!r}, ca_file={self.ca_file!r})"


def bearer(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The Bearer token of an ASGI header list (b"" when there is none)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
    return b""


class StageKeyGuard:
    """ASGI middleware: HTTP and WebSocket requests outside ``open_paths`` need the key."""

    def __init__(self, app: ASGIApp, api_key: str, stage: str,
                 open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self._key = api_key.encode("utf-8", "surrogatepass")
        self.stage = stage
        self.open_paths = open_paths

    def allows(self, scope: Scope) -> bool:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths:
            return True
        # Constant time in the key's content: the compare has no early exit.
        return hmac.compare_digest(bearer(scope.get("headers", [])), self._key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.allows(scope):
            await self.app(scope, receive, send)
            return
        REQUESTS_REJECTED.labels(self.stage, "unauthorized").inc()
        log.debug("refused %s %s: no valid stage key", scope["type"], scope["path"])
        response = JSONResponse(UNAUTHORIZED, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        if scope["type"] == "http":
            await response(scope, receive, send)
            return
        ws = WebSocket(scope, receive, send)
        if "websocket.http.response" in scope.get("extensions", {}):
            await ws.send_denial_response(response)
        else:  # a server without the denial extension: refused at the handshake (403)
            await ws.close(code=1008)
