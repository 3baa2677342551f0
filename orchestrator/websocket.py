"""The WebSocket transport: ``/v1/realtime`` as OpenAI's Realtime WebSocket, one small
adapter over the session core (``orchestrator.realtime``).

- Auth (``auth.py``: the standard key, or an ``ek_`` key whose session config then
  applies to the new session) happens before the WebSocket is accepted. A refused
  client gets an HTTP 403 with an OpenAI-style JSON error body (the WebSocket
  denial-response extension; plain close before accept, also a 403, where the server
  lacks it), which the ``openai`` SDK reports as a failed handshake.
- Refusals that need a reason the client can read (capacity, a key's own limits, not
  ready, failed resume, expiry, idleness) accept first, send one ``error`` event, then
  close with a code: 1013 for "try again later", 1008 for a policy refusal, 1000 when a
  session ends its life (``max_session_s``) or sat idle (``max_idle_s``).
- Each session counts against the tenant of its key (``limits.py``): the key's connection
  rate and concurrent sessions, beside the process's ``max_sessions``.
- Every server event goes through one ``Outbox`` (bounded, one writer); client frames are
  handled one at a time, in order (the next frame is read only after ``handle``
  returns), so a fast client is slowed by TCP flow control rather than by server memory.
  Binary frames are a cascade extension: raw input audio in the session's input format.
- ``?call_id=rtc_...`` makes the WebSocket the sideband of a live WebRTC call: its
  events go into the call's inbox, and the call's events come back on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from fastapi import WebSocket
from fastapi.responses import JSONResponse

from orchestrator.auth import AuthUnavailable, Grant, authorize, presented_keys
from orchestrator.limits import Refusal, new_member, own
from orchestrator.metrics import REJECTED_CONNECTIONS
from orchestrator.outbox import Outbox, error_json
from orchestrator.protocol import ProtocolError, error_event
from orchestrator.protocol.session import SessionConfig
from orchestrator.settings import ServeSettings
from orchestrator.store import StoreError, StoreUnavailable
from orchestrator.webrtc.calls import Call

if TYPE_CHECKING:
    from orchestrator.server import RealtimeSessionLike, ServerState

log = logging.getLogger(__name__)

SUBPROTOCOL = "realtime"
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013


def error_body(code: str, message: str) -> dict[str, object]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": code,
                      "param": None}}


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


class _Activity:
    """When the client last sent a frame (loop time)."""

    def __init__(self) -> None:
        self._clock = asyncio.get_running_loop().time  # looked up once: touched per frame
        self.at = self._clock()

    def touch(self) -> None:
        self.at = self._clock()


async def _idle_watch(session: RealtimeSessionLike, activity: _Activity,
                      max_idle_s: float) -> None:
    """Returns once the client has sent nothing for ``max_idle_s`` while the session had
    nothing going on (a reply being generated or played counts as activity)."""
    loop = asyncio.get_running_loop()
    while True:
        wait = activity.at + max_idle_s - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        elif not getattr(session, "idle", True):
            activity.touch()
        else:
            return


async def _read_loop(ws: WebSocket, session: RealtimeSessionLike, outbox: Outbox,
                     max_bytes: int, activity: _Activity) -> None:
    while True:
        msg = await ws.receive()
        activity.touch()
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


async def serve(state: ServerState, ws: WebSocket) -> None:
    """One ``/v1/realtime`` WebSocket, from the handshake to the close."""
    settings = state.settings
    offered = ws.scope.get("subprotocols", [])
    try:
        grant = await authorize(presented_keys(ws.headers, offered),
                                api_key=state.limiter.ring, secrets=state.secrets)
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
        refusal = state.limiter.connect(grant.tenant)
        if refusal is not None:
            await _refuse_for(ws, subprotocol, refusal)
            return
        await _serve_sideband(state, ws, call_id, subprotocol, grant.tenant)
        return
    resources = state.resources
    if resources is None:
        REJECTED_CONNECTIONS.labels("not_ready").inc()
        detail = state.load_error or "the server is still loading its models"
        await _refuse(ws, subprotocol, CLOSE_TRY_AGAIN, "server_not_ready",
                      f"Not ready: {detail}. Try again later.", "server_error")
        return
    if state.draining:
        REJECTED_CONNECTIONS.labels("draining").inc()
        await _refuse(ws, subprotocol, CLOSE_TRY_AGAIN, "server_draining",
                      "This server is shutting down. Connect again (another server will "
                      "answer).", "server_error")
        return
    resume_id = ws.query_params.get("session_id") or None
    resume_token = ws.query_params.get("resume_token") or None
    if (resume_id is None) != (resume_token is None):
        REJECTED_CONNECTIONS.labels("resume").inc()
        await _refuse(ws, subprotocol, CLOSE_POLICY, "invalid_resume",
                      "To resume a session send both 'session_id' and 'resume_token'.")
        return
    member = resume_id or new_member()  # the session in the key's shared count
    refusal = await state.enter(grant.tenant, member)  # counted from here
    if refusal is not None:
        await _refuse_for(ws, subprotocol, refusal)
        return
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
        own(session, grant.tenant)
        state.sessions.add(session)
        try:
            await session.start(resume_id=resume_id, resume_token=resume_token,
                                configs=_grant_configs(grant))
        except ProtocolError as exc:  # the key's session config no longer validates
            await outbox.send(error_event(exc).to_json())
            await outbox.finish(CLOSE_POLICY, exc.code)
            return
        except StoreError as exc:
            # A wrong token or a lost session is final (1008); the store being out of reach
            # (Redis restarting) is "try again later" (1013), for a new session too.
            transient = isinstance(exc, StoreUnavailable)
            REJECTED_CONNECTIONS.labels("store" if transient else "resume").inc()
            what = "resume the session" if resume_id else "start a session"
            await outbox.send(error_json(exc.code, f"Cannot {what}: {exc}"))
            await outbox.finish(CLOSE_TRY_AGAIN if transient else CLOSE_POLICY, exc.code)
            return
        member = state.rename_member(grant.tenant, member, session)
        await _run(ws, session, outbox, settings)
    except Exception:
        log.exception("realtime connection failed")
        await outbox.send(error_json("server_error", "Internal server error.", "server_error"))
        await outbox.finish(CLOSE_INTERNAL, "internal error")
    finally:
        if session is not None:
            state.sessions.discard(session)
            try:
                await session.aclose()
            except Exception:
                log.exception("session aclose failed")
        await outbox.finish()
        state.outboxes.discard(outbox)
        state.leave(grant.tenant, member)


async def _refuse_for(ws: WebSocket, subprotocol: str | None, refusal: Refusal) -> None:
    """A limit's refusal (``limits.py``): every one means "try again later" (1013)."""
    REJECTED_CONNECTIONS.labels(refusal.reason).inc()
    await _refuse(ws, subprotocol, CLOSE_TRY_AGAIN, refusal.code, refusal.message,
                  "server_error" if refusal.reason == "capacity" else "invalid_request_error")


def _grant_configs(grant: Grant) -> list[SessionConfig]:
    """An ephemeral key's session config, to start a new session from."""
    if grant.session is None:
        return []
    return [SessionConfig.model_validate(grant.session)]


async def _serve_sideband(state: ServerState, ws: WebSocket, call_id: str,
                          subprotocol: str | None, tenant: str) -> None:
    """``/v1/realtime?call_id=rtc_...``: a WebSocket that controls a live WebRTC call like
    any Realtime WebSocket (its events go to the call's session, in order with the data
    channel's; the session's events come back here too). Only the key (tenant) that opened
    the call reaches it."""
    call = state.calls.get(call_id)
    if call is None or state.call_tenants.get(call_id) != tenant:  # another key's: unknown
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
    """Read frames until the client leaves, the outbox ends the connection, the session
    reaches its maximum duration, or it sits idle for ``max_idle_s``."""
    activity = _Activity()
    reader = asyncio.create_task(_read_loop(ws, session, outbox, settings.max_event_bytes,
                                            activity))
    ending = asyncio.create_task(outbox.closing.wait())
    tasks = {reader, ending}
    idler: asyncio.Task[None] | None = None
    if settings.max_idle_s > 0:
        idler = asyncio.create_task(_idle_watch(session, activity, settings.max_idle_s))
        tasks.add(idler)
    try:
        done, _ = await asyncio.wait(tasks, timeout=settings.max_session_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if reader in done:
            reader.result()  # re-raise a session failure
        elif idler is not None and idler in done and ending not in done:
            REJECTED_CONNECTIONS.labels("idle").inc()
            await outbox.send(error_json(
                "session_idle_timeout",
                f"The session was idle (no client event) for {settings.max_idle_s:g} s and "
                "is closed. Resume it with session_id and resume_token.",
            ))
            await outbox.finish(CLOSE_NORMAL, "session idle")
        elif not done:
            REJECTED_CONNECTIONS.labels("expired").inc()
            minutes = settings.max_session_s / 60
            await outbox.send(error_json(
                "session_expired",
                f"Your session hit the maximum duration of {minutes:g} minutes.",
            ))
            await outbox.finish(CLOSE_NORMAL, "session expired")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
