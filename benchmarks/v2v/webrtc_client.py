"""One user turn over the Realtime API's WebRTC transport, timed as a listener hears it.

The same turn as ``client.run_turn`` (same session config, same clip, same marks and
definitions), carried the way a browser carries it: the client POSTs an SDP offer to
``/v1/realtime/calls`` (``Content-Type: application/sdp``, ``Authorization: Bearer``),
takes the SDP answer and the call's ``Location``, and then

- speaks through an outbound audio track that behaves like a microphone: 20 ms frames of
  48 kHz mono, each handed to the encoder when a microphone would have captured it
  (``start + (k + 1) * 20 ms``), silence before and after the clip. The ground-truth end
  of speech (EoS) is the moment the frame holding the clip's last voiced sample is handed
  over, as over the WebSocket;
- hears the reply on the remote audio track, drained continuously (aiortc's receive queue
  is unbounded); the reply's first audio and its gaps are read off the decoded frames
  (``received.py``);
- exchanges the JSON events on the ``oai-events`` data channel: ``session.update`` then
  the server's VAD, transcription and response events, as over the WebSocket, except
  that there are no audio deltas: ``output_audio_buffer.started/stopped/cleared`` say
  when the server's track plays the reply.

A turn ends once the reply has been played: its ``response.done`` and then its
``output_audio_buffer.stopped`` (or, from a server that never sends it, once the track has
carried only silence for ``QUIET_END_S``), plus ``DRAIN_S`` for the last frames to come
through the receiver's jitter buffer and decoder. The call is then hung up
(``POST <Location>/hangup``) and the peer connection closed.

The measured voice-to-voice includes what any WebRTC listener has on top of the
WebSocket: Opus encode/decode and the receiver's jitter buffer. aiortc's holds a fixed
4 packets (80 ms) before it decodes the first one; a browser's adapts (typically 20-80 ms
on a clean network).

ICE: no ICE servers (host candidates only; no third-party STUN is contacted). aioice never
gathers 127.0.0.1, so the client needs a real interface address; the server may offer
loopback (cascade: ``CASCADE_ICE_HOST_ADDRESSES='["127.0.0.1"]'``) or its own addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
from collections.abc import Awaitable
from typing import Any

import httpx
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

from benchmarks.v2v.client import (
    FRAME_S,
    RTC_FRAME,
    RTC_RATE,
    PreparedClip,
    TurnOptions,
    ga_session,
)
from benchmarks.v2v.events import Marks, ReplyAudio, finish, on_event, timings_pending
from benchmarks.v2v.received import TrackLog, reply_audio
from benchmarks.v2v.records import Phase, TurnRecord
from stages.common.audio import Int16Array

CHANNEL = "oai-events"  # the data channel OpenAI's clients open
CONNECT_TIMEOUT_S = 30.0  # offer posted -> data channel open
SESSION_TIMEOUT_S = 30.0  # session.update -> session.updated
HTTP_TIMEOUT_S = 30.0
DRAIN_S = 0.25  # after the server's track stopped: jitter buffer (80 ms) + decode + margin
QUIET_END_S = 1.5  # no output_audio_buffer.stopped: the reply is over after this silence
TIMINGS_GRACE_S = 1.0  # after the reply: wait this long for cascade.turn.timings
POLL_S = 0.02
_SILENCE: Int16Array = np.zeros(RTC_FRAME, np.int16)
_TIME_BASE = fractions.Fraction(1, RTC_RATE)


class MicrophoneTrack(MediaStreamTrack):
    """An outbound audio track paced like a microphone on one wall clock: frame k is
    handed over at ``start + (k + 1) * 20 ms`` (start: the sender's first ``recv``), the
    clip given to ``say`` from the next frame on, silence otherwise."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._start: float | None = None
        self._sent = 0
        self._clip: list[Int16Array] = []
        self._pos = 0
        self._eos_frame = -1
        self._marks: Marks | None = None
        self.eos_sent = asyncio.Event()

    def say(self, frames: list[Int16Array], eos_frame: int, marks: Marks) -> None:
        """Play ``frames`` from the next frame on; stamp ``marks.eos`` when frame
        ``eos_frame`` is handed over."""
        self._clip, self._pos, self._eos_frame, self._marks = frames, 0, eos_frame, marks
        self.eos_sent.clear()

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.perf_counter()
        delay = self._start + (self._sent + 1) * FRAME_S - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pcm = _SILENCE
        if self._pos < len(self._clip):
            pcm = self._clip[self._pos]
            if self._pos == self._eos_frame and self._marks is not None:
                self._marks.eos = time.perf_counter()
                self.eos_sent.set()
            self._pos += 1
        frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RTC_RATE
        frame.pts = self._sent * RTC_FRAME
        frame.time_base = _TIME_BASE
        self._sent += 1
        return frame


def _error_text(resp: httpx.Response) -> str:
    """An OpenAI-style ``{"error": {"message"}}`` body's message, else the body."""
    try:
        body = resp.json()
        message = body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:200]
    return f"HTTP {resp.status_code} from POST {resp.request.url}: {message}"


class Call:
    """One WebRTC call: offer/answer over HTTP, the data channel, both audio tracks."""

    def __init__(self, opts: TurnOptions, marks: Marks) -> None:
        if not opts.calls_url:
            raise ValueError("a WebRTC turn needs TurnOptions.calls_url")
        self.opts = opts
        self.calls_url: str = opts.calls_url
        self.marks = marks
        self.track = TrackLog(rate=RTC_RATE)
        self.location: str | None = None
        self.session_id: str | None = None
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = MicrophoneTrack()
        self.channel: RTCDataChannel | None = None
        self._live = False  # session.updated seen: events belong to the turn now
        self._opened = asyncio.Event()
        self._updated = asyncio.Event()
        self._broken = asyncio.Event()  # the connection failed or the channel closed
        self._setup_error: str | None = None
        self._drain: asyncio.Task[None] | None = None
        self.closed_at: float | None = None

    # --- setup -----------------------------------------------------------------------

    async def open(self, mode: str) -> None:
        """Offer, answer, connect, configure the session; raises with a reason."""
        self.pc.addTrack(self.mic)
        channel = self.pc.createDataChannel(CHANNEL)
        self.channel = channel
        channel.on("open", self._opened.set)
        channel.on("message", self._on_message)
        channel.on("close", lambda: self._fail("the data channel closed"))
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        headers = {**self.opts.headers, "Content-Type": "application/sdp"}
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as http:
            resp = await http.post(self.calls_url, content=self.pc.localDescription.sdp,
                                   headers=headers)
        if not resp.is_success:
            raise ConnectionError(_error_text(resp))
        self.location = resp.headers.get("location")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=resp.text, type="answer"))
        await self._until(self._opened, CONNECT_TIMEOUT_S, "the data channel to open")
        channel.send(json.dumps({"type": "session.update", "session": ga_session(mode,
                                                                                  self.opts)}))
        await self._until(self._updated, SESSION_TIMEOUT_S, "session.updated")

    async def _until(self, event: asyncio.Event, timeout_s: float, what: str) -> None:
        broken = asyncio.ensure_future(self._broken.wait())
        ready = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({ready, broken}, timeout=timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (ready, broken):
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
        if event.is_set():
            return
        if self._setup_error:
            raise ConnectionError(f"{self._setup_error} (waiting for {what})")
        raise TimeoutError(f"no {what} within {timeout_s:.0f} s")

    def _fail(self, reason: str) -> None:
        if self.closed_at is not None:
            return  # our own hang-up
        self._setup_error = self._setup_error or reason
        self._broken.set()
        if self._live:
            self.marks.error = self.marks.error or reason
            self.marks.finished.set()

    def _on_state(self) -> None:
        if self.pc.connectionState == "failed":
            self._fail("the WebRTC connection failed (ICE/DTLS)")

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_track(track))

    async def _drain_track(self, track: MediaStreamTrack) -> None:
        """Read every received frame (the receive queue is unbounded) and log its level."""
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if isinstance(frame, AudioFrame):
                self.track.add(time.perf_counter(), frame.pts, frame.samples,
                               frame.to_ndarray())

    def _on_message(self, message: str | bytes) -> None:
        now = time.perf_counter()
        if isinstance(message, bytes):
            return
        try:
            event: dict[str, Any] = json.loads(message)
        except ValueError as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        kind = event.get("type")
        if self._live:
            try:
                on_event(event, now, self.marks)
            except Exception as exc:  # an event we cannot read fails the turn
                self._fail(f"{type(exc).__name__}: {exc}")
        elif kind == "session.created":
            self.session_id = (event.get("session") or {}).get("id")
        elif kind == "session.updated":
            self._live = True
            self._updated.set()
        elif kind == "error":
            err = event.get("error") or {}
            self._fail(f"server error before the turn: {err.get('code') or err.get('type')}:"
                       f" {err.get('message')}")

    # --- the turn --------------------------------------------------------------------

    async def talk(self, clip: PreparedClip, mode: str) -> None:
        """Speak the clip, wait for the reply to be played (or to fail)."""
        marks, opts = self.marks, self.opts
        self.mic.say(clip.rtc_frames, clip.eos_frame, marks)
        clip_s = len(clip.rtc_frames) * FRAME_S + 10.0
        if not await _first(self.mic.eos_sent.wait(), marks.finished.wait(), within_s=clip_s):
            marks.error = marks.error or "the microphone track was not read (no media flow)"
            return
        if marks.eos is None:
            return  # failed while speaking
        deadline = marks.eos + opts.reply_timeout_s
        if not await _first(marks.finished.wait(), within_s=deadline - time.perf_counter()):
            marks.error = marks.error or f"no reply within {opts.reply_timeout_s:.0f} s"
            return
        if marks.answer is None or marks.error is not None:
            return
        await self._played(marks.answer, deadline)
        if timings_pending(marks) and opts.timings(mode):
            marks.finished.clear()  # set again by cascade.turn.timings
            await _first(marks.finished.wait(), within_s=TIMINGS_GRACE_S)

    async def _played(self, rid: str, deadline: float) -> None:
        """Until the server's track has played reply ``rid`` (stopped or cleared), then
        the receiver's drain time."""
        done = self.marks.responses[rid].done or time.perf_counter()
        while time.perf_counter() < deadline and self.marks.error is None:
            if self.stopped(rid) is not None:
                break
            heard = self.track.last_sound()
            if time.perf_counter() - max(heard or done, done) > QUIET_END_S:
                break
            await asyncio.sleep(POLL_S)
        await asyncio.sleep(DRAIN_S)

    def stopped(self, rid: str) -> float | None:
        """When the server said reply ``rid`` stopped playing (drained or cleared)."""
        marks = self.marks.audio_buffer.get(rid, {})
        ends = [marks[k] for k in ("stopped", "cleared") if k in marks]
        return min(ends) if ends else None

    def reply(self, threshold_s: float) -> ReplyAudio | None:
        """The answer's audio off the received track (None: no answer)."""
        answer = self.marks.responses.get(self.marks.answer or "")
        if answer is None:
            return None
        stopped = self.stopped(self.marks.answer or "")
        end = float("inf") if stopped is None else stopped + DRAIN_S
        return reply_audio(self.track.frames, answer.created, end, threshold_s, RTC_RATE)

    # --- teardown --------------------------------------------------------------------

    async def close(self) -> None:
        """Hang up (best effort), close the peer connection, stop every task."""
        self.closed_at = time.perf_counter()
        if self.location:
            url = httpx.URL(self.calls_url).join(self.location.rstrip("/") + "/hangup")
            with contextlib.suppress(httpx.HTTPError):
                async with httpx.AsyncClient(timeout=5.0) as http:
                    await http.post(url, headers=self.opts.headers)
        await self.pc.close()
        self.mic.stop()
        if self._drain is not None:
            try:
                await asyncio.wait_for(self._drain, 5.0)
            except TimeoutError:
                pass  # wait_for cancelled it


async def _first(*waits: Awaitable[Any], within_s: float) -> bool:
    """True if any of ``waits`` finished within ``within_s`` (the rest are cancelled)."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        done, _ = await asyncio.wait(tasks, timeout=max(within_s, 0.0),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return bool(done)


async def run_webrtc_turn(opts: TurnOptions, clip: PreparedClip, mode: str, *, phase: Phase,
                          concurrency: int = 1, session_index: int = 0, round_: int = 0,
                          t0: float = 0.0) -> TurnRecord:
    """Speak one clip as a user turn on a fresh WebRTC call and time the reply. Never
    raises for a bad reply or a refused call: failures land in the record's ``error``."""
    started = time.perf_counter()
    marks = Marks()
    record = TurnRecord(phase=phase, mode=mode, transport="webrtc", concurrency=concurrency,
                        session_index=session_index, round=round_, clip=clip.clip.info.name,
                        started_s=round(started - t0, 3), eos_s=0.0)
    call = Call(opts, marks)
    try:
        try:
            await call.open(mode)
            await call.talk(clip, mode)
        finally:
            await call.close()
    except Exception as exc:  # refused, unreachable, timed out: a failed turn, not a crash
        marks.error = marks.error or f"{type(exc).__name__}: {exc}"
    audio = call.reply(opts.gap_threshold_s)
    return finish(record, marks, clip.clip.info.text, opts.gap_threshold_s, t0, audio=audio)
