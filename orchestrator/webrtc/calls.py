"""One WebRTC call: a peer connection plugged into a session core.

The adapter's parts: the data channel (``oai-events``) and any sideband WebSockets
(``/v1/realtime?call_id=``) put client events into one ordered ``Inbox`` together with
the decoded microphone frames; the session's events go out through one ``Outbox`` per
listener (the data channel's, each sideband's); the session's audio goes out on the
call's ``OutboundAudio`` track via ``CallMedia``.

Life: ``open_call`` validates the offer, builds the peer, starts the session (a failed
resume is an HTTP error, before any answer), and answers. A watchdog closes a call that
has not connected within ``webrtc_connect_timeout_s``; a call also ends on hang-up, when
the peer connection fails or closes, when the data channel closes, when the session
is taken over by a resume elsewhere, at its maximum duration, or at shutdown.
``Call.close`` is the one teardown path for all of them and is idempotent: tasks
cancelled, session closed (its conversation stays in the store), track stopped, peer
connection closed, the call removed from the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Any, Protocol

from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from orchestrator import metrics
from orchestrator.inbox import Inbox
from orchestrator.outbox import Outbox, error_json
from orchestrator.protocol.session import SessionConfig
from orchestrator.settings import ServeSettings
from orchestrator.webrtc import peer
from orchestrator.webrtc.media import CallMedia, OutboundAudio, pump_inbound

log = logging.getLogger(__name__)

CLOSE_RESTART = 1012  # the session's close code when the server drains

DATA_CHANNEL = "oai-events"
MAX_CHANNEL_BUFFERED = 512 * 1024  # bytes the data channel may hold unsent
CHANNEL_WAIT_S = 5.0  # how long a send may wait for the channel to drain


class CallSession(Protocol):
    """What a call needs of the session core (``orchestrator.realtime.RealtimeSession``)."""

    session_id: str

    async def start(self, *, resume_id: str | None = None, resume_token: str | None = None,
                    configs: Any = ()) -> None: ...

    async def handle(self, raw: str | bytes) -> None: ...

    async def push_audio(self, samples: Any, rate: int) -> None: ...

    async def aclose(self) -> None: ...


MakeSession = Callable[..., CallSession]


def new_call_id() -> str:
    return "rtc_" + secrets.token_hex(12)


class Call:
    def __init__(self, call_id: str, pc: RTCPeerConnection, settings: ServeSettings,
                 on_closed: Callable[[Call], None]) -> None:
        self.id = call_id
        self.pc = pc
        self.settings = settings
        self._on_closed = on_closed
        self.track = OutboundAudio()
        self.media = CallMedia(self.track)
        self.session: CallSession | None = None
        self.inbox: Inbox | None = None
        self._outboxes: set[Outbox] = set()
        self._primary: list[Outbox] = []  # the data channel's
        self._channel: RTCDataChannel | None = None
        self._channel_open = asyncio.Event()
        self._drained = asyncio.Event()  # the data channel's buffer fell below its threshold
        self.connected = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing: asyncio.Task[None] | None = None
        self.ended = asyncio.Event()
        self.end_reason = ""

    # ------------------------------------------------------------------ wiring
    def listen(self) -> None:
        """Peer events -> the call (before the offer is applied: aiortc announces the
        remote track while it applies it)."""
        pc = self.pc

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            if self._channel is not None:  # one event channel per call
                log.info("call %s: extra data channel %r ignored", self.id, channel.label)
                return
            self._channel = channel
            channel.bufferedAmountLowThreshold = MAX_CHANNEL_BUFFERED // 2
            channel.on("bufferedamountlow", self._drained.set)
            self._channel_open.set()
            channel.on("message", self._on_message)
            channel.on("close", lambda: self.close_soon("client_left"))

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._spawn(pump_inbound(track, self._push_audio), "inbound-audio")
            else:  # video is not read: stop it so its queue cannot grow
                track.stop()

        @pc.on("connectionstatechange")
        def on_state() -> None:
            state = pc.connectionState
            if state == "connected":
                self.connected.set()
            elif state in ("failed", "closed"):
                self.close_soon("failed" if state == "failed" else "client_left")

    def attach(self, *, data_channel: bool) -> None:
        """Our track into the answer; ``data_channel``: the offer has an application
        section, so events wait for the channel instead of being dropped."""
        self.pc.addTrack(self.track)
        if data_channel:
            self.add_outbox(Outbox(self._channel_write, self._channel_close,
                                   self.settings.send_queue_events,
                                   self.settings.close_timeout_s), primary=True)

    def add_outbox(self, outbox: Outbox, *, primary: bool = False) -> None:
        """A listener of the call's events. The data channel's is primary: when it ends
        (a client that does not read, a closed channel) the call ends; a sideband's
        ending only detaches it."""
        outbox.start()
        self._outboxes.add(outbox)
        if primary:
            self._primary.append(outbox)

        async def watch() -> None:
            await outbox.closing.wait()
            self._outboxes.discard(outbox)
            if primary:
                self.close_soon("client_left")

        self._spawn(watch(), "outbox-watch")

    def remove_outbox(self, outbox: Outbox) -> None:
        self._outboxes.discard(outbox)

    async def broadcast(self, text: str) -> None:
        for outbox in list(self._outboxes):
            await outbox.send(text)

    def _spawn(self, work: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=f"{self.id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ data channel
    async def _channel_write(self, text: str) -> None:
        """Send one event on the data channel: after it opens, and never into an
        unbounded SCTP buffer (waits while it holds more than MAX_CHANNEL_BUFFERED)."""
        await self._channel_open.wait()
        channel = self._channel
        assert channel is not None
        if channel.bufferedAmount > MAX_CHANNEL_BUFFERED:
            self._drained.clear()
            async with asyncio.timeout(CHANNEL_WAIT_S):
                await self._drained.wait()
        if channel.readyState != "open":
            raise ConnectionError("the data channel is closed")
        channel.send(text)

    async def _channel_close(self, code: int, reason: str) -> None:
        self.close_soon("closed_by_server" if code != 1000 else "hangup")

    def _on_message(self, message: str | bytes) -> None:
        if len(message) > self.settings.max_event_bytes:
            self._spawn(self.broadcast(error_json(
                "invalid_value", f"Event is too large ({len(message)} > "
                f"{self.settings.max_event_bytes} bytes).")), "error")
            return
        self.put_event(message)

    def put_event(self, message: str | bytes) -> None:
        """A client event from the data channel or a sideband WebSocket, in order."""
        if self.inbox is None or not self.inbox.put_event(message):
            self._spawn(self.broadcast(error_json(
                "too_many_events", "The session is busy: events arrive faster than it "
                "handles them. Slow down and resend.")), "error")

    def _push_audio(self, samples: Any, rate: int) -> bool:
        return self.inbox is not None and self.inbox.put_audio(samples, rate)

    # ------------------------------------------------------------------ life
    async def start(self, make_session: MakeSession, *, configs: list[SessionConfig],
                    resume_id: str | None, resume_token: str | None) -> None:
        session = make_session(send=self.broadcast, close=self._session_close,
                               media=self.media)
        self.session = session
        await session.start(resume_id=resume_id, resume_token=resume_token, configs=configs)
        self.inbox = Inbox(session, max_items=max(64, self.settings.send_queue_events))
        self.inbox.start(name=f"{self.id}-inbox")
        self._spawn(self._watchdog(), "watchdog")

    def _session_close(self, code: int, reason: str) -> None:
        """The session ends the call: taken over by a resume elsewhere, or the server is
        draining (1012: service restart)."""
        self.close_soon("draining" if code == CLOSE_RESTART else "taken_over")

    async def _watchdog(self) -> None:
        try:
            async with asyncio.timeout(self.settings.webrtc_connect_timeout_s):
                await self.connected.wait()
        except TimeoutError:
            log.info("call %s: not connected after %.0f s; closing", self.id,
                     self.settings.webrtc_connect_timeout_s)
            self.close_soon("connect_timeout")
            return
        await asyncio.sleep(self.settings.max_session_s)
        minutes = self.settings.max_session_s / 60
        await self.broadcast(error_json(
            "session_expired", f"Your session hit the maximum duration of {minutes:g} minutes."))
        self.close_soon("expired")

    def close_soon(self, reason: str) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(
                self.close(reason), name=f"{self.id}-close")

    async def close(self, reason: str) -> None:
        """Tear the call down (idempotent; concurrent callers wait for the first)."""
        if self.end_reason:
            await self.ended.wait()
            return
        self.end_reason = reason
        metrics.WEBRTC_CALLS_ENDED.labels(reason).inc()
        log.info("call %s ended: %s", self.id, reason)
        current = asyncio.current_task()
        try:
            if self.inbox is not None:
                await self.inbox.aclose()
            if self.session is not None:
                try:
                    await self.session.aclose()
                except Exception:
                    log.exception("call %s: session close failed", self.id)
            channel = self._channel
            if channel is None or channel.readyState != "open":
                for outbox in self._primary:  # nothing can be flushed to no channel
                    outbox.abort(1000, reason)
            for outbox in list(self._outboxes):  # flush what the session said last
                await outbox.finish()
            self._outboxes.clear()
            tasks = [t for t in self._tasks if t is not current and t is not self._closing]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.track.stop()
            with contextlib.suppress(Exception):
                await self.pc.close()
        finally:
            self.ended.set()
            self._on_closed(self)


async def negotiate(call: Call, offer_sdp: str) -> str:
    """Apply the client's offer; return the answer SDP (ICE gathered, no trickle)."""
    pc = call.pc
    call.listen()
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
    except Exception as exc:
        raise peer.InvalidOffer(f"the SDP offer could not be applied: {exc}") from exc
    if not any(t.kind == "audio" for t in pc.getTransceivers()):
        raise peer.InvalidOffer("the SDP offer has no usable audio section")
    peer.decode_promptly(pc)
    call.attach(data_channel=any(line.startswith("m=application ")
                               for line in offer_sdp.splitlines()))
    try:
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
    except Exception as exc:  # aiortc trips over offers it accepted (peer.check_offer
        # refuses the ones fuzzing found); still the offer's fault, not a server error
        log.warning("call %s: the offer could not be answered: %r", call.id, exc)
        raise peer.InvalidOffer(f"the SDP offer could not be answered: {exc}") from exc
    local = pc.localDescription
    if local is None:
        raise RuntimeError("no local description after setLocalDescription")
    return local.sdp
