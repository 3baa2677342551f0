"""A WebRTC Realtime client for tests (aiortc): what a browser does, in Python.

It posts an offer to ``/v1/realtime/calls``, sends a microphone track (a script of pcm
clips and silence, paced at real time like a microphone), records every event of the
``oai-events`` data channel and the level of the audio it receives, and hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from orchestrator.webrtc.media import audio_frames

RATE = 48_000
FRAME = RATE // 50


class MicTrack(MediaStreamTrack):
    """Paced 20 ms 48 kHz mono frames: queued clips first, silence when none."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pending: deque[np.ndarray[Any, Any]] = deque()
        self._start: float | None = None
        self._pts = 0
        self.speech_ended_at: float | None = None  # monotonic time the last clip ended

    def say(self, pcm48: np.ndarray[Any, Any]) -> float:
        """Queue a clip (mono int16 at 48 kHz); returns its duration in seconds."""
        for i in range(0, pcm48.size, FRAME):
            chunk = pcm48[i:i + FRAME]
            if chunk.size < FRAME:
                chunk = np.concatenate([chunk, np.zeros(FRAME - chunk.size, np.int16)])
            self._pending.append(chunk.astype(np.int16))
        return pcm48.size / RATE

    @property
    def speaking(self) -> bool:
        return bool(self._pending)

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            self._pts += FRAME
            wait = self._start + self._pts / RATE - now
            if wait > 0:
                await asyncio.sleep(wait)
        if self._pending:
            samples = self._pending.popleft()
            if not self._pending:
                self.speech_ended_at = time.monotonic()
        else:
            samples = np.zeros(FRAME, np.int16)
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME)
        frame.planes[0].update(samples.tobytes())
        frame.pts = self._pts
        frame.sample_rate = RATE
        frame.time_base = fractions.Fraction(1, RATE)
        return frame


@dataclass
class Heard:
    """Received audio: when each loud frame arrived."""

    frames: int = 0
    loud_at: list[float] = field(default_factory=list)

    def loud_since(self, t: float) -> list[float]:
        return [x for x in self.loud_at if x >= t]


class RtcClient:
    def __init__(self, base_url: str, key: str, *, session: dict[str, Any] | None = None,
                 query: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.session_config = session
        self.query = query
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = MicTrack()
        self.events: list[dict[str, Any]] = []
        self.event_times: list[float] = []
        self._new_event = asyncio.Event()
        self.heard = Heard()
        self.call_id: str | None = None
        self.answer_status: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.channel = self.pc.createDataChannel("oai-events")
        self.channel_open = asyncio.Event()
        self.channel.on("open", self.channel_open.set)
        self.channel.on("message", self._on_message)
        self.pc.addTrack(self.mic)
        self.pc.on("track", self._on_track)

    def _on_message(self, message: str | bytes) -> None:
        self.events.append(json.loads(message))
        self.event_times.append(time.monotonic())
        self._new_event.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self._drain(track)))

    async def _drain(self, track: MediaStreamTrack) -> None:
        async for frame in audio_frames(track):
            self.heard.frames += 1
            samples = frame.to_ndarray().astype(np.float32)
            if float(np.sqrt(np.mean(samples * samples))) > 300.0:
                self.heard.loud_at.append(time.monotonic())

    async def connect(self, *, within: float = 20.0) -> httpx.Response:
        """Offer, post, answer; wait for the data channel. Returns the HTTP answer."""
        offer = await self.pc.createOffer()
        await self.pc.setLocalDescription(offer)
        assert self.pc.localDescription is not None
        headers = {"Authorization": f"Bearer {self.key}"}
        async with httpx.AsyncClient(timeout=within) as http:
            if self.session_config is None:
                resp = await http.post(f"{self.base_url}/v1/realtime/calls{self.query}",
                                       content=self.pc.localDescription.sdp,
                                       headers={**headers, "Content-Type": "application/sdp"})
            else:
                resp = await http.post(f"{self.base_url}/v1/realtime/calls{self.query}",
                                       json={"sdp": self.pc.localDescription.sdp,
                                             "session": self.session_config},
                                       headers=headers)
        self.answer_status = resp.status_code
        if resp.status_code != 201:
            return resp
        self.call_id = resp.headers["location"].rsplit("/", 1)[-1]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=resp.text, type="answer"))
        async with asyncio.timeout(within):
            await self.channel_open.wait()
        return resp

    def send(self, event: dict[str, Any]) -> None:
        self.channel.send(json.dumps(event))

    async def wait_for(self, type_: str, *, after: int = 0, within: float = 30.0,
                       **match: Any) -> dict[str, Any]:
        """The first event of ``type_`` at index >= ``after`` whose fields match."""
        async with asyncio.timeout(within):
            while True:
                for event in self.events[after:]:
                    if event.get("type") == type_ and all(
                            event.get(k) == v for k, v in match.items()):
                        return event
                self._new_event.clear()
                await self._new_event.wait()

    def types(self) -> list[str]:
        return [e.get("type", "") for e in self.events]

    async def hangup(self) -> int:
        async with httpx.AsyncClient(timeout=10) as http:
            resp = await http.post(
                f"{self.base_url}/v1/realtime/calls/{self.call_id}/hangup",
                headers={"Authorization": f"Bearer {self.key}"})
        return resp.status_code

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.mic.stop()
        await self.pc.close()
