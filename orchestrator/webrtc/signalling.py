"""WebRTC signalling, OpenAI-compatible: ``POST /v1/realtime/calls`` (and the legacy
``POST /v1/realtime?model=``), ``POST /v1/realtime/calls/{id}/hangup``.

An offer comes in one of three shapes, all answered the same way (201, the SDP answer,
``Location: /v1/realtime/calls/rtc_<id>``):

- raw SDP (``Content-Type: application/sdp``): browsers with an ephemeral key, whose
  session config comes from the key;
- ``multipart/form-data`` with parts ``sdp`` and ``session`` (JSON): a backend (openai-node);
- JSON ``{"sdp": ..., "session": {...}}`` (openai-python).

A session config in the request applies after the key's. ``session_id`` +
``resume_token`` query parameters resume a stored conversation on the new call (a
cascade extension, as on the WebSocket). Errors are OpenAI-style JSON with a 4xx/5xx
status that says whose fault it is; nothing is set up before the offer, the key and the
capacity have been checked.

Calls live in the process that answered them (the media terminates here): hang-up and
sideband connections for a call must reach the same replica (route on the call id).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from aiortc import RTCPeerConnection
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from orchestrator import metrics
from orchestrator.auth import AuthUnavailable, Grant, authorize, presented_keys
from orchestrator.keys import ClientSecrets, error_response, read_body
from orchestrator.limits import Refusal, new_member, refusal_response
from orchestrator.protocol.errors import from_validation_error
from orchestrator.protocol.session import SessionConfig
from orchestrator.settings import ServeSettings
from orchestrator.store import StoreError
from orchestrator.webrtc import peer
from orchestrator.webrtc.calls import Call, MakeSession, negotiate, new_call_id
from stages.common.jsontext import strict_loads

log = logging.getLogger(__name__)

CALLS_PATH = "/v1/realtime/calls"
LEGACY_PATH = "/v1/realtime"
MAX_REQUEST_BYTES = 256 * 1024  # an offer plus a session config


class CallHost(Protocol):
    """What signalling needs of the server (``orchestrator.server.ServerState``)."""

    settings: ServeSettings
    calls: dict[str, Call]
    draining: bool  # shutting down: no new calls

    def client_secrets(self) -> ClientSecrets | None: ...

    call_tenants: dict[str, str]  # live call id -> the tenant (API key name) owning it

    def session_maker(self, tenant: str = ...) -> MakeSession | None:
        """None until the server is ready; its sessions belong to ``tenant``."""
        ...

    async def enter(self, tenant: str, member: str) -> Refusal | None:
        """Count one more live session of ``tenant`` (``member``: its entry in the key's
        count shared by the servers), or why not (limits.py, shared_caps.py)."""
        ...

    def rename_member(self, tenant: str, member: str, session: object) -> str: ...

    def leave(self, tenant: str, member: str) -> None: ...


class BadRequest(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, param=self.param)


async def grant_for(host: CallHost, request: Request) -> Grant:
    try:
        grant = await authorize(presented_keys(request.headers),
                                api_key=host.settings.key_ring(), secrets=host.client_secrets())
    except AuthUnavailable as exc:
        raise BadRequest(503, "server_not_ready", f"The key cannot be checked now ({exc}). "
                         "Try again later.") from exc
    if grant is None:
        metrics.REJECTED_CONNECTIONS.labels("auth").inc()
        raise BadRequest(401, "invalid_api_key", "Missing, expired or incorrect API key: "
                         "send 'Authorization: Bearer <key or ek_ client secret>'.")
    return grant


def _config(data: Any, where: str) -> SessionConfig:
    try:
        if isinstance(data, str):
            data = strict_loads(data)
        return SessionConfig.model_validate(data)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, ValidationError):
            err = from_validation_error(exc, data, None)
            raise BadRequest(400, err.code, f"{where}: {err.message}", err.param) from exc
        raise BadRequest(400, "invalid_json", f"{where} is not valid JSON") from exc


async def read_offer(request: Request) -> tuple[str, SessionConfig | None]:
    """The offer SDP and the request's session config (if any), from any of the three
    body shapes."""
    body = await read_body(request, MAX_REQUEST_BYTES)
    if body is None:
        raise BadRequest(413, "payload_too_large",
                         f"The request body is over {MAX_REQUEST_BYTES} bytes.")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        replay = Request(request.scope, _replay(body))
        try:
            form = await replay.form(max_files=2, max_fields=8)
        except Exception as exc:
            raise BadRequest(400, "invalid_request", f"the multipart body could not be "
                             f"read: {exc}") from exc
        sdp_part, session_part = form.get("sdp"), form.get("session")
        sdp = await _text(sdp_part)
        session = await _text(session_part)
        if sdp is None:
            raise BadRequest(400, "missing_required_parameter", "the multipart body has no "
                             "'sdp' part", "sdp")
        return sdp, None if session is None else _config(session, "the 'session' part")
    text = _decode(body)
    if ctype == "application/json":
        try:
            data = strict_loads(text)
        except ValueError as exc:  # also too-deep nesting and lone surrogates
            raise BadRequest(400, "invalid_json", "the request body is not valid JSON") from exc
        if not isinstance(data, dict) or not isinstance(data.get("sdp"), str):
            raise BadRequest(400, "missing_required_parameter", "a JSON body must be an object "
                             "with the offer in 'sdp' (a string)", "sdp")
        session = data.get("session")
        return data["sdp"], None if session is None else _config(session, "'session'")
    if ctype not in ("application/sdp", "text/plain", ""):
        raise BadRequest(415, "unsupported_media_type", f"Content-Type {ctype!r}: send the "
                         "offer as application/sdp, multipart/form-data (sdp, session) or "
                         "application/json ({sdp, session})")
    return text, None


def _decode(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(400, "invalid_sdp", "the SDP offer is not UTF-8 text") from exc


async def _text(part: UploadFile | str | None) -> str | None:
    if part is None or isinstance(part, str):
        return part
    return _decode(await part.read())


def _replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def open_call(host: CallHost, request: Request) -> Response:
    """Check everything, set up the call, answer it."""
    try:
        grant = await grant_for(host, request)
        make_session = host.session_maker(grant.tenant)
        if make_session is None:
            raise BadRequest(503, "server_not_ready", "The server is still loading its "
                             "models. Try again later.")
        if host.draining:
            metrics.REJECTED_CONNECTIONS.labels("draining").inc()
            raise BadRequest(503, "server_draining", "This server is shutting down. "
                             "Try again (another server will answer).")
        sdp, config = await read_offer(request)
        try:
            peer.check_offer(sdp)
        except peer.InvalidOffer as exc:
            raise BadRequest(400, "invalid_offer", str(exc), "sdp") from exc
        configs = [] if grant.session is None else [_config(grant.session, "the key's session")]
        if config is not None:
            configs.append(config)
        resume_id = request.query_params.get("session_id") or None
        resume_token = request.query_params.get("resume_token") or None
        if (resume_id is None) != (resume_token is None):
            raise BadRequest(400, "invalid_resume", "To resume a session send both "
                             "'session_id' and 'resume_token'.")
        member = resume_id or new_member()  # the session in the key's shared count
        refusal = await host.enter(grant.tenant, member)
        if refusal is not None:
            metrics.REJECTED_CONNECTIONS.labels(refusal.reason).inc()
            return refusal_response(refusal)
    except BadRequest as err:
        return err.response()
    return await _set_up(host, make_session, sdp, configs, resume_id, resume_token,
                         grant.tenant, member)


async def _set_up(host: CallHost, make_session: MakeSession, sdp: str,
                  configs: list[SessionConfig], resume_id: str | None,
                  resume_token: str | None, tenant: str, member: str) -> Response:
    settings = host.settings
    peer.use_host_addresses(settings.ice_host_addresses)
    call_id = new_call_id()
    entry = [member]  # its shared-count member: the session id once started

    def closed(call: Call) -> None:
        if host.calls.pop(call.id, None) is not None:
            metrics.WEBRTC_CALLS.dec()
            host.call_tenants.pop(call.id, None)
            host.leave(tenant, entry[0])

    call = Call(call_id, RTCPeerConnection(peer.configuration(settings)), settings, closed)
    host.calls[call_id] = call
    host.call_tenants[call_id] = tenant
    metrics.WEBRTC_CALLS.inc()
    try:
        answer = await negotiate(call, sdp)
        await call.start(make_session, configs=configs, resume_id=resume_id,
                         resume_token=resume_token)
        entry[0] = host.rename_member(tenant, entry[0], call.session)
    except peer.InvalidOffer as exc:
        await call.close("invalid_offer")
        return error_response(400, "invalid_offer", str(exc), param="sdp")
    except StoreError as exc:
        await call.close("resume_failed")
        metrics.REJECTED_CONNECTIONS.labels("resume").inc()
        status = 404 if exc.code == "session_not_found" else 400
        return error_response(status, exc.code, f"Cannot resume the session: {exc}")
    except Exception as exc:
        log.exception("call %s could not be set up", call_id)
        await call.close("error")
        return error_response(500, "server_error", f"The call could not be set up: "
                              f"{type(exc).__name__}", type="server_error")
    log.info("call %s answered (%d session config(s)%s)", call_id, len(configs),
             ", resumed" if resume_id else "")
    return Response(answer, status_code=201, media_type="application/sdp",
                    headers={"Location": f"{CALLS_PATH}/{call_id}"})


def router(host: CallHost) -> APIRouter:
    api = APIRouter()

    @api.post(CALLS_PATH)
    async def create_call(request: Request) -> Response:
        return await open_call(host, request)

    @api.post(LEGACY_PATH)
    async def create_call_legacy(request: Request) -> Response:
        """The beta flow: ``POST /v1/realtime?model=...`` with the raw SDP offer."""
        return await open_call(host, request)

    @api.post(CALLS_PATH + "/{call_id}/hangup")
    async def hangup(call_id: str, request: Request) -> Response:
        try:
            grant = await grant_for(host, request)
        except BadRequest as err:
            return err.response()
        call = host.calls.get(call_id)
        if call is None or host.call_tenants.get(call_id) != grant.tenant:  # another key's
            return error_response(404, "call_not_found", f"No live call {call_id!r} on "
                                  "this server.", param="call_id")
        await call.close("hangup")
        return JSONResponse({}, status_code=200)

    return api
