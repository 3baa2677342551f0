"""A conversation: many user turns on one Realtime connection, with silence between them.

Real users do not open a fresh connection per question. They keep one open, think, speak
again, sometimes stay silent for minutes; the microphone streams the whole time. So the
client here streams 20 ms frames in real time on one clock for the whole connection (the
gap before each turn is streamed silence, never a pause in sending) and times each turn
exactly like a first turn (``client.run_turn``): from the ground-truth end of speech.

Server events are handed to the turn they belong to: ``response.*`` events and
``cascade.turn.timings`` by their response id, transcription events by the user item the
server's VAD opened, anything else to whatever is happening now (a turn, or the gap
before one). Errors in a gap are counted on the turn that follows. A
server that stops answering (deaf after a long silence, failing once the conversation is
long) shows up as failed turns with the server's reason; a connection that drops fails
the turn in progress and every turn still to come, so failures are counted, not hidden.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from benchmarks.v2v.client import (
    _SILENCE,
    FRAME_S,
    PreparedClip,
    TurnOptions,
    _session_update,
    _wait_for,
)
from benchmarks.v2v.events import Marks, finish, on_event, timings_pending
from benchmarks.v2v.records import TurnRecord

TIMINGS_GRACE_S = 1.0  # after response.done: wait this long for cascade.turn.timings

Progress = Callable[[TurnRecord], None]


class Router:
    """Hands each server event to the turn (``Marks``) it belongs to."""

    def __init__(self) -> None:
        self.current = Marks()
        self.by_response: dict[str, Marks] = {}
        self.by_item: dict[str, Marks] = {}  # user items, for transcripts that come late
        self.errors = 0  # error events so far (a gap's count is a difference)
        self.first_error: str | None = None  # since the last ``take_errors``
        self.closed: str | None = None  # why the connection ended, once it has

    def on_event(self, event: dict[str, Any], now: float) -> None:
        kind = str(event.get("type", ""))
        response = event.get("response")
        rid = event.get("response_id") or (response.get("id") if isinstance(response, dict)
                                            else None)
        item = event.get("item_id")
        if kind == "response.created" and rid:
            self.by_response[str(rid)] = self.current
        elif kind.startswith("input_audio_buffer.") and item:
            self.by_item.setdefault(str(item), self.current)
        if rid:
            target = self.by_response.get(str(rid), self.current)
        elif kind.startswith("conversation.item.input_audio_transcription.") and item:
            target = self.by_item.get(str(item), self.current)
        else:
            target = self.current
        if kind == "error":
            self.errors += 1
            if self.first_error is None:
                err = event.get("error") or {}
                self.first_error = f"{err.get('code') or err.get('type')}: {err.get('message')}"
        on_event(event, now, target)

    def take_errors(self) -> tuple[int, str | None]:
        """Error events and the first one's text since the last call."""
        count, first = self.errors, self.first_error
        self.errors, self.first_error = 0, None
        return count, first

    def close(self, reason: str) -> None:
        self.closed = self.closed or reason
        self.current.error = self.current.error or reason
        self.current.finished.set()


class Microphone:
    """Frames on one real-time clock for the whole connection: frame k is handed over
    once a microphone would have captured it, at ``start + (k + 1) * 20 ms``."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.start = time.perf_counter()
        self.sent = 0

    async def due(self, stop: asyncio.Event | None = None) -> bool:
        """Wait for the next frame's capture time; False if ``stop`` was set first."""
        delay = self.start + (self.sent + 1) * FRAME_S - time.perf_counter()
        if stop is None:
            if delay > 0:
                await asyncio.sleep(delay)
            return True
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
        return not stop.is_set()

    async def send(self, frame: str) -> None:
        await self.ws.send(frame)
        self.sent += 1

    async def silence_until(self, until: float, stop: asyncio.Event | None = None) -> None:
        """Stream silence until ``until`` (perf_counter), or until ``stop`` is set: every
        frame whose capture starts before ``until``, so the silence is never shorter."""
        while self.start + self.sent * FRAME_S < until:
            if not await self.due(stop):
                return
            await self.send(_SILENCE)


async def _speak(mic: Microphone, clip: PreparedClip, marks: Marks, opts: TurnOptions) -> None:
    """The clip, then silence until the turn is over (answered, failed or timed out)."""
    deadline: float | None = None
    k = 0
    while await mic.due(marks.finished):
        await mic.send(clip.frames[k] if k < len(clip.frames) else _SILENCE)
        if k == clip.eos_frame:
            marks.eos = time.perf_counter()
            deadline = marks.eos + opts.reply_timeout_s
        if deadline is not None and time.perf_counter() > deadline:
            marks.error = marks.error or f"no reply within {opts.reply_timeout_s:.0f} s"
            return
        k += 1


async def _silence(mic: Microphone, router: Router, until: float,
                   stop: asyncio.Event | None = None) -> None:
    """Silence until ``until``; a broken connection is noted, not raised."""
    try:
        await mic.silence_until(until, stop)
    except Exception as exc:
        router.close(f"{type(exc).__name__}: {exc}")


async def _read(ws: ClientConnection, router: Router) -> None:
    try:
        async for raw in ws:
            if isinstance(raw, bytes):
                continue
            router.on_event(json.loads(raw), time.perf_counter())
    except Exception as exc:  # a dropped connection or an event we cannot read
        router.close(f"{type(exc).__name__}: {exc}")
    else:
        router.close("the server closed the connection")


def gap_before(gaps: Sequence[float], turn_index: int) -> float | None:
    """Seconds of silence before turn ``turn_index`` (1-based; None for turn 1): the gaps
    apply to turns 2, 3, ... in order and repeat when there are more turns."""
    if turn_index <= 1 or not gaps:
        return None
    return float(gaps[(turn_index - 2) % len(gaps)])


def conversation_clips(clips: Sequence[PreparedClip], turns: int) -> list[PreparedClip]:
    """The clip each turn speaks: the corpus in order, cycled."""
    return [clips[i % len(clips)] for i in range(turns)]


async def run_conversation(opts: TurnOptions, clips: Sequence[PreparedClip], mode: str, *,
                           turns: int, gaps: Sequence[float], round_: int = 0,
                           connection_id: str = "", t0: float = 0.0,
                           progress: Progress | None = None) -> list[TurnRecord]:
    """``turns`` user turns on one connection; always one record per turn. Never raises
    for a server that misbehaves: failures land in the records' ``error``."""
    spoken = conversation_clips(clips, turns)
    records: list[TurnRecord] = []
    router = Router()
    timings = opts.timings(mode)
    session_id: str | None = None
    failure: str | None = None  # why the connection is gone, once it is

    def record(i: int, clip: PreparedClip, started: float, gap: float | None) -> TurnRecord:
        return TurnRecord(phase="conversation", mode=mode, concurrency=1, session_index=0,
                          round=round_, clip=clip.clip.info.name,
                          started_s=round(started - t0, 3), eos_s=0.0,
                          connection_id=connection_id, session_id=session_id,
                          turn_index=i + 1, gap_before_s=gap)

    def done(rec: TurnRecord) -> None:
        records.append(rec)
        if progress is not None:
            progress(rec)

    try:
        async with connect(opts.url, additional_headers=opts.headers, max_size=2**24,
                           open_timeout=30) as ws:
            created = await _wait_for(ws, "session.created", 30)
            session_id = (created.get("session") or {}).get("id")
            await ws.send(_session_update(mode, opts))
            await _wait_for(ws, "session.updated", 30)
            reader = asyncio.create_task(_read(ws, router))
            try:
                mic = Microphone(ws)
                turn_end = time.perf_counter()
                for i, clip in enumerate(spoken):
                    gap = gap_before(gaps, i + 1)
                    if gap is not None:  # the user is silent; the microphone is not
                        await _silence(mic, router, turn_end + gap)
                    gap_errors, gap_error = router.take_errors()
                    marks = Marks()
                    router.current = marks
                    started = time.perf_counter()
                    measured = None if gap is None else round(started - turn_end, 3)
                    if router.closed:
                        raise ConnectionError(router.closed)
                    try:
                        await _speak(mic, clip, marks, opts)
                    except Exception as exc:  # the connection broke mid-turn
                        router.close(f"{type(exc).__name__}: {exc}")
                    turn_end = time.perf_counter()
                    router.current = Marks()  # the gap after it
                    router.take_errors()  # the turn's own errors are in its marks
                    if timings and timings_pending(marks) and not router.closed:
                        marks.finished.clear()  # set again when the timings arrive
                        await _silence(mic, router, turn_end + TIMINGS_GRACE_S,
                                       marks.finished)
                    rec = record(i, clip, started, measured)
                    rec.gap_errors, rec.gap_error = gap_errors, gap_error
                    done(finish(rec, marks, clip.clip.info.text, opts.gap_threshold_s, t0))
                    if router.closed:
                        raise ConnectionError(router.closed)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
    except Exception as exc:  # refused, dropped, timed out: failed turns, not a crash
        failure = router.closed or f"{type(exc).__name__}: {exc}"
    for i in range(len(records), turns):  # the turns the connection did not live to see
        rec = record(i, spoken[i], time.perf_counter(), gap_before(gaps, i + 1))
        rec.error = (failure if i == len(records) and not records
                     else f"the connection was gone before this turn ({failure})")
        done(rec)
    return records
