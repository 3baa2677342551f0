"""The WebRTC turn client against a small answering peer: real aiortc on both ends, a real
loopback HTTP endpoint for the offer, scripted events on the data channel, and a reply
tone (with a planted underrun) on the peer's track once it has heard the speech.

The peer stands in for ``cascade serve``'s WebRTC transport so the client's definitions
(EoS, first audio off the received track, gaps, turn end, hang-up) are tested without
models: every number asserted is on the media timeline, none is a speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aioice.ice
import numpy as np
import pytest
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

from benchmarks.v2v import webrtc_client
from benchmarks.v2v.client import PreparedClip, TurnOptions
from benchmarks.v2v.corpus import RATE, Clip
from benchmarks.v2v.received import level
from benchmarks.v2v.records import ClipInfo, TurnRecord
from benchmarks.v2v.webrtc_client import run_webrtc_turn

KEY = "sk-test-webrtc"
PEER_RATE = 48_000
PEER_FRAME = PEER_RATE // 50
SPEECH_RMS = 1000.0  # the peer's "VAD": a frame this loud is speech
END_QUIET_FRAMES = 10  # 200 ms of quiet after speech ends the user's turn
TONE_S = (0.4, 0.3)  # the reply: tone, planted underrun, tone
UNDERRUN_S = 0.2
CLIP_SPEECH_S = 0.5
OPUS_RING_MS = 40  # decoded Opus rings on for ~30 ms after a hard cut


@pytest.fixture(autouse=True)
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both peers gather 127.0.0.1 only (aioice skips loopback): the test needs no network
    interface and never leaves the machine."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses",
                        lambda use_ipv4, use_ipv6: ["127.0.0.1"])


def _tone(seconds: float, amplitude: float = 0.3, hz: float = 330.0,
          rate: int = PEER_RATE) -> np.ndarray[Any, Any]:
    t = np.arange(round(seconds * rate)) / rate
    return (np.sin(2 * np.pi * hz * t) * amplitude * 32767).astype(np.int16)


def _clip() -> PreparedClip:
    """A 'voice' the peer's level VAD hears: 0.5 s of tone, then 0.5 s of silence."""
    pcm = np.concatenate([_tone(CLIP_SPEECH_S, rate=RATE), np.zeros(RATE // 2, np.int16)])
    info = ClipInfo(name="tone", text="hello there", source="builtin", duration_ms=1000.0,
                    speech_end_ms=CLIP_SPEECH_S * 1000)
    return PreparedClip(Clip(info, pcm))


class ReplyTrack(MediaStreamTrack):
    """The peer's outbound track: paced 20 ms frames, queued audio, else digital silence
    (as a server's track sends when it has nothing to play)."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.queue: list[np.ndarray[Any, Any]] = []
        self.on_drained: Callable[[], None] | None = None
        self._start: float | None = None
        self._sent = 0

    def play(self, pcm: np.ndarray[Any, Any], on_drained: Callable[[], None]) -> None:
        pcm = np.concatenate([pcm, np.zeros(-pcm.size % PEER_FRAME, np.int16)])
        self.queue += [pcm[i:i + PEER_FRAME] for i in range(0, pcm.size, PEER_FRAME)]
        self.on_drained = on_drained

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.perf_counter()
        delay = self._start + self._sent * 0.02 - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if self.queue:
            pcm = self.queue.pop(0)
            if not self.queue and self.on_drained is not None:
                self.on_drained()
                self.on_drained = None
        else:
            pcm = np.zeros(PEER_FRAME, np.int16)
        frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = PEER_RATE, self._sent * PEER_FRAME
        frame.time_base = fractions.Fraction(1, PEER_RATE)
        self._sent += 1
        return frame


@dataclass
class Peer:
    """A scripted Realtime WebRTC server: one call at a time."""

    script: str = "reply"  # "reply" | "no_stopped" | "error" | "mute" (never updates)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    client_events: list[dict[str, Any]] = field(default_factory=list)
    speech_frames: int = 0  # frames of the client's track the VAD heard as speech
    hangups: list[str] = field(default_factory=list)
    pcs: list[RTCPeerConnection] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    channel: RTCDataChannel | None = None
    track: ReplyTrack | None = None

    def send(self, **event: Any) -> None:
        assert self.channel is not None
        self.channel.send(json.dumps(event))

    async def answer(self, sdp: str) -> str:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pcs.append(pc)
        self.track = ReplyTrack()
        pc.addTrack(self.track)

        @pc.on("datachannel")
        def on_channel(channel: RTCDataChannel) -> None:
            self.channel = channel
            self.send(type="session.created", session={"id": "sess_1"})

            @channel.on("message")
            def on_message(message: str) -> None:
                event = json.loads(message)
                self.client_events.append(event)
                if event["type"] == "session.update" and self.script != "mute":
                    self.send(type="session.updated", session=event["session"])

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self.tasks.append(asyncio.ensure_future(self.listen(track)))

        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return str(pc.localDescription.sdp)

    async def listen(self, track: MediaStreamTrack) -> None:
        """A level VAD on the client's audio; the scripted reply at the end of speech."""
        quiet = 0
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            assert isinstance(frame, AudioFrame)
            rms, _ = level(frame.to_ndarray())
            if rms >= SPEECH_RMS:
                if self.speech_frames == 0:
                    self.send(type="input_audio_buffer.speech_started", item_id="item_u")
                self.speech_frames += 1
                quiet = 0
            elif self.speech_frames:
                quiet += 1
                if quiet == END_QUIET_FRAMES:
                    self.respond()

    def respond(self) -> None:
        self.send(type="input_audio_buffer.speech_stopped", item_id="item_u")
        self.send(type="conversation.item.input_audio_transcription.completed",
                  item_id="item_u", content_index=0, transcript="hello there")
        if self.script == "error":
            self.send(type="error", error={"type": "server_error", "code": "llm_failed",
                                           "message": "the LLM is down"})
            return
        rid = "resp_1"
        self.send(type="response.created", response={"id": rid, "status": "in_progress"})
        reply = np.concatenate([_tone(TONE_S[0]), np.zeros(round(UNDERRUN_S * PEER_RATE),
                                                           np.int16), _tone(TONE_S[1])])

        def drained() -> None:
            if self.script != "no_stopped":
                self.send(type="output_audio_buffer.stopped", response_id=rid)

        assert self.track is not None
        self.track.play(reply, drained)
        self.send(type="output_audio_buffer.started", response_id=rid)
        self.send(type="response.output_audio_transcript.delta", response_id=rid,
                  item_id="item_a", delta="Hi there.")
        self.send(type="response.done", response={"id": rid, "status": "completed"})
        self.send(type="cascade.turn.timings", response_id=rid, llm_first_token_ms=5.0)

    async def close(self) -> None:
        for pc in self.pcs:
            await pc.close()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 5.0)


async def _http(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Just enough HTTP/1.1 for the calls endpoint: one request per connection."""
    try:
        method, path, _ = (await reader.readline()).decode().split(" ", 2)
        headers: dict[str, str] = {}
        while (line := (await reader.readline()).decode().strip()):
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        body = (await reader.readexactly(int(headers.get("content-length", "0")))).decode()
        peer.requests.append((method, path, headers))
        status, extra, out = "404 Not Found", "", ""
        if method == "POST" and path == "/v1/realtime/calls":
            if headers.get("authorization") != f"Bearer {KEY}":
                status, extra = "401 Unauthorized", "Content-Type: application/json\r\n"
                out = json.dumps({"error": {"message": "Incorrect API key provided.",
                                            "type": "invalid_request_error",
                                            "code": "invalid_api_key", "param": None}})
            else:
                out = await peer.answer(body)
                status = "201 Created"
                extra = ("Content-Type: application/sdp\r\n"
                         "Location: /v1/realtime/calls/rtc_test1\r\n")
        elif method == "POST" and path == "/v1/realtime/calls/rtc_test1/hangup":
            peer.hangups.append(path)
            status = "200 OK"
        data = out.encode()
        writer.write(f"HTTP/1.1 {status}\r\n{extra}Content-Length: {len(data)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + data)
        await writer.drain()
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def serving(peer: Peer) -> AsyncIterator[str]:
    server = await asyncio.start_server(lambda r, w: _http(peer, r, w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1/realtime/calls"
    finally:
        server.close()
        await server.wait_closed()
        await peer.close()


def _opts(url: str, key: str = KEY) -> TurnOptions:
    return TurnOptions(url="ws://unused/v1/realtime", calls_url=url,
                       headers={"Authorization": f"Bearer {key}"}, reply_timeout_s=20.0)


async def _turn(peer: Peer, key: str = KEY, mode: str = "streaming") -> TurnRecord:
    before = asyncio.all_tasks()
    async with serving(peer) as url:
        rec = await run_webrtc_turn(_opts(url, key), _clip(), mode, phase="compare")
    await asyncio.sleep(0.1)  # let closed transports finish their callbacks
    leaked = [t for t in asyncio.all_tasks() - before if not t.done()]
    assert not leaked, leaked
    return rec


@pytest.mark.parametrize("script", ["reply", "no_stopped"])
async def test_a_turn_over_webrtc_is_timed_like_a_listener_hears_it(script: str) -> None:
    peer = Peer(script=script)
    rec = await _turn(peer)
    assert rec.error is None, rec.error
    assert rec.transport == "webrtc" and rec.phase == "compare" and rec.replied
    # The offer went out as raw SDP with the key, and the call was hung up.
    method, path, headers = peer.requests[0]
    assert (method, path) == ("POST", "/v1/realtime/calls")
    assert headers["content-type"] == "application/sdp"
    assert headers["authorization"] == f"Bearer {KEY}"
    assert peer.hangups == ["/v1/realtime/calls/rtc_test1/hangup"]
    assert all(pc.connectionState == "closed" for pc in peer.pcs)
    # The session config: the WebSocket's, minus audio formats (Opus on RTP).
    from openai.types.realtime import SessionUpdateEvent

    update = peer.client_events[0]
    SessionUpdateEvent.model_validate(update)
    session = update["session"]
    vad = {"type": "server_vad", "silence_duration_ms": 500}
    assert session["audio"] == {"input": {"turn_detection": vad,
                                          "transcription": {"model": "whisper-1"}}}
    assert session["cascade"] == {"pipeline": "streaming", "timings": True}
    assert not any(e["type"] == "input_audio_buffer.append" for e in peer.client_events)
    # The microphone track carried the clip's speech (0.5 s = 25 frames; Opus may smear
    # one frame at each edge).
    assert abs(peer.speech_frames - CLIP_SPEECH_S * 50) <= 2, peer.speech_frames
    # The events, as over the WebSocket.
    assert rec.transcript == "hello there" and rec.wer == 0.0
    assert rec.reply_text == "Hi there." and rec.responses == 1
    assert rec.server == {"llm_first_token_ms": 5.0}
    assert rec.speech_stopped_ms is not None and rec.speech_stopped_ms > 0
    # The peer stopped after hearing 200 ms of quiet; the tone leaves after that event.
    assert rec.first_audio_ms is not None and rec.first_audio_ms > rec.speech_stopped_ms
    # The reply off the received track: 0.7 s of tone around a 0.2 s underrun, which is
    # the one gap. Sample-exact but for the codec: Opus rings for ~30 ms after a hard cut
    # (of a tone; speech fades out), which lengthens the sound and shortens the hole.
    tone_ms, hole_ms = 1000 * sum(TONE_S), 1000 * UNDERRUN_S
    assert tone_ms - 5 <= rec.reply_audio_ms <= tone_ms + 2 * OPUS_RING_MS, rec.reply_audio_ms
    assert rec.gap_count == 1, rec.gaps
    assert hole_ms - OPUS_RING_MS <= rec.gap_total_ms <= hole_ms + 5, rec.gaps
    (start, length), = rec.gaps
    assert start > rec.first_audio_ms and length == rec.gap_max_ms


async def test_a_refused_call_fails_the_turn_with_the_servers_reason() -> None:
    peer = Peer()
    rec = await _turn(peer, key="wrong")
    assert rec.error is not None and "401" in rec.error, rec.error
    assert "Incorrect API key provided." in rec.error
    assert not rec.replied and peer.pcs == [] and peer.hangups == []


async def test_an_error_event_fails_the_turn_and_hangs_up() -> None:
    peer = Peer(script="error")
    rec = await _turn(peer)
    assert rec.error == "llm_failed: the LLM is down"
    assert rec.transcript == "hello there" and not rec.replied
    assert peer.hangups == ["/v1/realtime/calls/rtc_test1/hangup"]


async def test_a_session_that_never_updates_fails_after_the_setup_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webrtc_client, "SESSION_TIMEOUT_S", 1.0)
    peer = Peer(script="mute")
    rec = await _turn(peer)
    assert rec.error is not None and "session.updated" in rec.error, rec.error
    assert peer.hangups == ["/v1/realtime/calls/rtc_test1/hangup"]


async def test_no_calls_endpoint_is_an_error_not_a_crash() -> None:
    rec = await run_webrtc_turn(TurnOptions(url="ws://unused", headers={},
                                            calls_url="http://127.0.0.1:1/v1/realtime/calls"),
                                _clip(), "default", phase="compare")
    assert rec.error is not None and "ConnectError" in rec.error, rec.error
