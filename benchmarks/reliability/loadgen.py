"""Many Realtime WebSocket sessions from one asyncio process, each a talking user.

Every session streams ``input_audio_buffer.append`` events of 20 ms in real time for its
whole life (speech, then silence: an always-open microphone), on an absolute schedule so
the audio clock never drifts. A turn: speak an utterance (real speech, piper's voice,
synthesized and base64-encoded once for all sessions), stay silent until the reply's
``response.done`` and until its audio would have finished playing, think 0.5-1.5 s, speak
again. Some turns barge in (speak again ~0.7 s into the reply's audio); after some turns
the session drops its connection and resumes with ``session_id`` + ``resume_token``.

Reply gaps are measured on the audio clock: the client starts playing at the first
``response.output_audio.delta`` and plays in real time; a delta that arrives after the
audio received so far has run out is an underrun of that many ms (the orchestrator paces
audio ``lead_ms`` ahead, so with stages far faster than real time any underrun is the
orchestrator's, or this generator's: its own event-loop lag is measured too).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

RATE = 24_000  # the Realtime default input and output format: pcm16 at 24 kHz
FRAME_MS = 20
UTTERANCES = ("Could you tell me what the weather will be like tomorrow?",
              "And do I need an umbrella for the walk to work?",
              "Thanks, what about the weekend?")
REPLY_TIMEOUT_S = 15.0  # end of speech -> response.done, or the turn counts as unanswered
GAP_MS = 40.0  # underruns shorter than this are jitter, not gaps
CACHE = Path.home() / ".cache" / "cascade" / "reliability"


def speech_frames(frame_ms: int = FRAME_MS) -> list[list[str]]:
    """Each utterance as pre-encoded append events of ``frame_ms`` (piper's voice, cached
    on disk)."""
    frame_bytes = RATE * frame_ms // 1000 * 2
    out: list[list[str]] = []
    for text in UTTERANCES:
        key = hashlib.sha256(f"{text}|{RATE}".encode()).hexdigest()[:16]
        path = CACHE / f"utt-{key}.pcm"
        if not path.exists():
            from benchmarks.speech import piper_speech

            CACHE.mkdir(parents=True, exist_ok=True)
            path.write_bytes(piper_speech(text, RATE).tobytes())
        pcm = path.read_bytes()
        pcm += b"\0" * (-len(pcm) % frame_bytes)
        out.append([_append(pcm[i:i + frame_bytes]) for i in range(0, len(pcm), frame_bytes)])
    return out


def _append(pcm: bytes) -> str:
    return json.dumps({"type": "input_audio_buffer.append",
                       "audio": base64.b64encode(pcm).decode()})




@dataclass
class Stats:
    """What the sessions saw since the last ``reset``."""

    turns: int = 0  # utterances finished (end of speech)
    answered: int = 0  # replies whose audio started
    completed: int = 0  # response.done "completed"
    unanswered: int = 0  # no reply audio within REPLY_TIMEOUT_S
    failed: int = 0  # response.done "failed"
    barge_ins: int = 0  # spoke over a playing reply
    reconnects: int = 0
    reconnect_failures: int = 0
    connect_failures: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # error events by code
    gaps_ms: list[float] = field(default_factory=list)  # underruns >= GAP_MS
    first_audio_ms: list[float] = field(default_factory=list)  # end of speech -> audio
    late_frames: int = 0  # sends more than one frame behind schedule
    frames: int = 0
    ended: dict[str, int] = field(default_factory=dict)  # sessions lost before stop, why
    deleted: int = 0  # items deleted (keep_items)

    def lost(self, why: str) -> None:
        self.ended[why] = self.ended.get(why, 0) + 1

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


class LoadGen:
    """Runs sessions against ``url`` (``ws://host:port/v1/realtime``) until ``stop``."""

    def __init__(self, url: str, *, barge_in_p: float = 0.15, reconnect_p: float = 0.1,
                 seed: int = 1, frame_ms: int = FRAME_MS, keep_items: int = 0) -> None:
        self.url = url
        # > 0: each session deletes its oldest items between turns beyond this many, as a
        # long-running client bounds its conversation (the soak: flat memory is then
        # the server's, not the conversations' growth); 0 keeps every item.
        self.keep_items = keep_items
        self.frame_ms = frame_ms  # each append's audio (the load: 20 ms)
        self.silence = _append(b"\0" * (RATE * frame_ms // 1000 * 2))
        self.barge_in_p = barge_in_p
        self.reconnect_p = reconnect_p
        self.rng = random.Random(seed)
        self.frames = speech_frames(frame_ms)
        self.stats = Stats()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.live = 0  # sessions connected now
        self.lag_s: list[float] = []  # this generator's own loop lag samples
        self._lag_task: asyncio.Task[None] | None = None

    def reset(self) -> Stats:
        """The stats so far; counting starts again."""
        stats, self.stats = self.stats, Stats()
        self.lag_s = []
        return stats

    @property
    def sessions(self) -> int:
        return len(self._tasks)

    async def add(self, n: int, spread_s: float = 2.0) -> None:
        """Start ``n`` more sessions, spread over ``spread_s``."""
        if self._lag_task is None:
            self._lag_task = asyncio.create_task(self._probe_lag())
        for i in range(n):
            task = asyncio.create_task(self._session(i))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            await asyncio.sleep(spread_s / max(1, n))

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Close every session (a normal close), wait for them."""
        self._stopping = True
        tasks = list(self._tasks)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._lag_task is not None:
            self._lag_task.cancel()
            await asyncio.gather(self._lag_task, return_exceptions=True)
            self._lag_task = None
        self._stopping = False

    async def _probe_lag(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.05)
            self.lag_s.append(time.monotonic() - before - 0.05)

    async def _session(self, seed: int) -> None:
        session = _Session(self, random.Random(self.rng.random() + seed))
        try:
            await session.run()
        except Exception as exc:  # counted; one broken session must not stop the run
            self.stats.error(f"generator:{type(exc).__name__}")


class _Session:
    def __init__(self, gen: LoadGen, rng: random.Random) -> None:
        self.gen = gen
        self.rng = rng
        self.ws: ClientConnection | None = None
        self.session_id = ""
        self.token = ""
        # Turn state, shared by the sender (frames) and the reader (server events).
        self.speech: list[str] = []
        self.pos = 0
        self.speak_at = time.monotonic() + rng.uniform(0.2, 1.5)
        self.eos: float | None = None  # end of the current turn's speech
        self.waiting = False  # a turn awaits its reply
        self.barge = False  # this turn's reply will be barged into
        self.response_id: str | None = None
        self.first_audio: float | None = None
        self.buffered_until = 0.0  # the client's playout: audio received runs out then
        self.reply_done = False
        self.items: list[str] = []  # the conversation's item ids, oldest first

    async def _connect(self, resume: bool) -> bool:
        url = self.gen.url
        if resume:
            url += f"?session_id={self.session_id}&resume_token={self.token}"
        try:
            self.ws = await connect(url, max_size=2**24, compression=None, open_timeout=10)
            raw = await asyncio.wait_for(self.ws.recv(), 10)
        except (OSError, TimeoutError, ConnectionClosed) as exc:
            self.gen.stats.error(f"connect:{type(exc).__name__}")
            return False
        event = json.loads(raw)
        if event.get("type") != "session.created":
            self.gen.stats.error(str(event.get("error", {}).get("code", event.get("type"))))
            await self.ws.close()
            return False
        session = event["session"]
        self.session_id = session.get("id", self.session_id)
        self.token = (session.get("cascade") or {}).get("resume_token") or self.token
        return True

    async def run(self) -> None:
        gen = self.gen
        if not await self._connect(resume=False):
            gen.stats.connect_failures += 1
            return
        while True:
            assert self.ws is not None
            gen.live += 1
            try:
                reader = asyncio.create_task(self._read(self.ws))
                reconnect = await self._send(self.ws, reader)
                if not reconnect and not gen._stopping:
                    gen.stats.lost(self._why_ended(reader))
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.ws.close(), 5)
            finally:
                gen.live -= 1
            if not reconnect or gen._stopping:
                return
            if not await self._connect(resume=True):
                gen.stats.reconnect_failures += 1
                return
            gen.stats.reconnects += 1

    def _why_ended(self, reader: asyncio.Task[None]) -> str:
        """Why the connection ended before the generator stopped it."""
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            exc = reader.exception()
            return f"reader raised {type(exc).__name__}: {exc}"[:160]
        ws = self.ws
        code = ws.close_code if ws is not None else None
        reason = ws.close_reason if ws is not None else ""
        return f"closed {code} {reason!r}" if code is not None else "closed (no close frame)"

    async def _send(self, ws: ClientConnection, reader: asyncio.Task[None]) -> bool:
        """Stream frames until stopped (False) or it is time to reconnect (True)."""
        gen = self.gen
        stats = gen.stats
        tick = time.monotonic()
        while not gen._stopping and not reader.done():
            now = time.monotonic()
            if now - tick > gen.frame_ms / 1000:
                gen.stats.late_frames += 1
            frame = self._next_frame(now)
            if frame is None:  # the turn is over and the dice say: reconnect
                return True
            keep = gen.keep_items
            if keep and len(self.items) > keep and not (self.speech or self.waiting):
                stale = self.items.pop(0)  # between turns: one delete per frame
                try:
                    await ws.send(json.dumps({"type": "conversation.item.delete",
                                              "item_id": stale}))
                    stats.deleted += 1
                except ConnectionClosed:
                    stats.error("connection_closed")
                    return False
            try:
                await ws.send(frame)
            except ConnectionClosed:
                stats.error("connection_closed")
                return False
            gen.stats.frames += 1
            tick += gen.frame_ms / 1000
            delay = tick - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:  # far behind (a stalled loop): skip ahead, do not burst
                tick = time.monotonic()
        return False

    def _next_frame(self, now: float) -> str | None:
        stats = self.gen.stats
        if self.speech:  # speaking
            frame = self.speech[self.pos]
            self.pos += 1
            if self.pos == len(self.speech):
                self.speech = []
                self.eos = now
                self.waiting = True
                self.reply_done = False
                self.first_audio = None
                self.response_id = None
                self.barge = self.rng.random() < self.gen.barge_in_p
                stats.turns += 1
            return frame
        if self.waiting:
            assert self.eos is not None
            if self.first_audio is None and now - self.eos > REPLY_TIMEOUT_S:
                stats.unanswered += 1
                self.waiting = False
                self.speak_at = now + self.rng.uniform(0.5, 1.5)
            elif (self.barge and self.first_audio is not None and not self.reply_done
                  and now - self.first_audio > 0.7):
                stats.barge_ins += 1
                self.waiting = False
                self._start_speaking()
                return self._next_frame(now)
            elif self.reply_done and now >= self.buffered_until:
                self.waiting = False
                if self.rng.random() < self.gen.reconnect_p:
                    self.speak_at = now + self.rng.uniform(0.5, 1.5)
                    return None
                self.speak_at = now + self.rng.uniform(0.5, 1.5)
            return self.gen.silence
        if now >= self.speak_at:
            self._start_speaking()
            return self._next_frame(now)
        return self.gen.silence

    def _start_speaking(self) -> None:
        self.speech = self.rng.choice(self.gen.frames)
        self.pos = 0

    async def _read(self, ws: ClientConnection) -> None:
        stats = self.gen.stats
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                if isinstance(raw, bytes):
                    continue
                now = time.monotonic()
                event: dict[str, Any] = json.loads(raw)
                kind = event.get("type")
                if kind == "response.output_audio.delta":
                    self._on_audio(now, event)
                elif kind == "response.created":
                    if self.waiting and self.response_id is None:
                        self.response_id = (event.get("response") or {}).get("id")
                elif kind == "response.done":
                    response = event.get("response") or {}
                    if response.get("id") == self.response_id:
                        status = response.get("status")
                        if status == "completed":
                            stats.completed += 1
                        elif status == "failed":
                            stats.failed += 1
                        self.reply_done = True
                        if self.first_audio is None and self.waiting:
                            # done without audio (failed or cancelled): turn unanswered
                            stats.unanswered += 1
                            self.waiting = False
                            self.speak_at = now + self.rng.uniform(0.5, 1.5)
                elif kind == "conversation.item.added":
                    item_id = (event.get("item") or {}).get("id")
                    if item_id:
                        self.items.append(item_id)
                elif kind == "error":
                    stats.error(str((event.get("error") or {}).get("code")))

    def _on_audio(self, now: float, event: dict[str, Any]) -> None:
        stats = self.gen.stats
        ms = len(event.get("delta", "")) * 3 / 4 / 2 / RATE * 1000
        if event.get("response_id") != self.response_id:
            return  # a reply this turn no longer waits for
        if self.first_audio is None:  # the first delta of the reply
            self.first_audio = now
            if self.waiting and self.eos is not None:
                stats.answered += 1
                stats.first_audio_ms.append((now - self.eos) * 1000)
            self.buffered_until = now + ms / 1000
            return
        if now > self.buffered_until:
            gap = (now - self.buffered_until) * 1000
            if gap >= GAP_MS:
                stats.gaps_ms.append(gap)
            self.buffered_until = now + ms / 1000
        else:
            self.buffered_until += ms / 1000


def quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
