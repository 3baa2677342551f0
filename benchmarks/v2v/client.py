"""One user turn over the Realtime WebSocket API, timed like a microphone would see it.

The client opens a session, configures 24 kHz pcm16 with server VAD, then streams the
clip in 20 ms ``input_audio_buffer.append`` frames at real time — each frame sent when a
microphone would have captured it — and keeps streaming silence until the reply is done.
Only standard Realtime events are needed (GA names, beta names accepted too); the mode
(modes.py) picks the turn detection and, for cascade's modes with ``cascade_extras``, the
pipeline and the server-side stage timings.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from benchmarks.v2v.corpus import RATE, Clip, voiced_span
from benchmarks.v2v.events import Marks, Response, finish, noticed, on_event, timings_pending
from benchmarks.v2v.modes import Eagerness, ModeSpec, parse_mode
from benchmarks.v2v.options import DEFAULT_INSTRUCTIONS, DEFAULT_MAX_OUTPUT_TOKENS
from benchmarks.v2v.records import Phase, TurnRecord
from stages.common.audio import Int16Array, float_to_pcm16, resample

FRAME = RATE // 50  # 20 ms
FRAME_S = FRAME / RATE
LEAD_S = 0.3  # silence before the clip, so the server's VAD hears the onset
RTC_RATE = 48_000  # WebRTC audio (Opus) runs at 48 kHz
RTC_FRAME = RTC_RATE // 50  # 20 ms

INTERRUPT_AFTER_S = 1.0  # barge-in: the user starts talking this long into the reply
BARGE_IN_WAIT_S = 3.0  # after speech_started: how long to wait for the cancel/truncation


@dataclass(frozen=True)
class TurnOptions:
    url: str
    headers: dict[str, str]
    instructions: str = DEFAULT_INSTRUCTIONS
    max_output_tokens: int | None = DEFAULT_MAX_OUTPUT_TOKENS
    transcription_model: str | None = "whisper-1"
    cascade_extras: bool = True
    gap_threshold_s: float = 0.02
    dialect: Literal["ga", "beta"] = "ga"  # beta: OpenAI-Beta: realtime=v1 servers
    reply_timeout_s: float = 60.0
    # WebRTC turns: the POST /v1/realtime/calls endpoint (SDP offer in, answer out).
    calls_url: str | None = None
    eagerness: Eagerness = "auto"  # semantic_vad modes that do not name their own

    def spec(self, mode: str) -> ModeSpec:
        """What ``mode`` sends (modes.py; the CLI has validated the names)."""
        return parse_mode(mode, self.eagerness)

    def timings(self, mode: str) -> bool:
        """Whether turns of ``mode`` ask for (and wait for) cascade.turn.timings."""
        return self.cascade_extras and self.spec(mode).cascade


def _frames(pcm: np.ndarray[Any, Any]) -> list[str]:
    """The append events of a clip, encoded once (JSON + base64 is the protocol's cost)."""
    out = []
    for i in range(0, pcm.size, FRAME):
        chunk = pcm[i:i + FRAME]
        if chunk.size < FRAME:
            chunk = np.concatenate([chunk, np.zeros(FRAME - chunk.size, np.int16)])
        out.append(json.dumps({"type": "input_audio_buffer.append",
                               "audio": base64.b64encode(chunk.tobytes()).decode()}))
    return out


_SILENCE = _frames(np.zeros(FRAME, np.int16))[0]


class PreparedClip:
    """A clip with its append events pre-encoded and the frame that carries its EoS."""

    def __init__(self, clip: Clip) -> None:
        self.clip = clip
        lead = np.zeros(round(LEAD_S * RATE), np.int16)
        self.frames = _frames(np.concatenate([lead, clip.pcm]))
        self.eos_frame = (lead.size + max(clip.speech_end - 1, 0)) // FRAME
        self.onset_frame = (lead.size + voiced_span(clip.pcm)[0]) // FRAME

    @functools.cached_property
    def rtc_frames(self) -> list[Int16Array]:
        """The same lead + clip as 20 ms frames at 48 kHz, for a WebRTC microphone track
        (resampled once; frame k covers the same 20 ms as ``frames[k]``, so ``eos_frame``
        and ``onset_frame`` hold for both)."""
        lead = np.zeros(round(LEAD_S * RATE), np.int16)
        pcm = float_to_pcm16(resample(np.concatenate([lead, self.clip.pcm]), RATE, RTC_RATE))
        pcm = np.concatenate([pcm, np.zeros(len(self.frames) * RTC_FRAME - pcm.size, np.int16)])
        return [pcm[k * RTC_FRAME:(k + 1) * RTC_FRAME] for k in range(len(self.frames))]


def ga_session(mode: str, opts: TurnOptions) -> dict[str, Any]:
    """The GA session config both transports send, without audio formats (a WebRTC call
    carries Opus on RTP; the WebSocket adds pcm16 at 24 kHz)."""
    spec = opts.spec(mode)
    audio_in: dict[str, Any] = {"turn_detection": spec.turn_detection_config()}
    if opts.transcription_model:
        audio_in["transcription"] = {"model": opts.transcription_model}
    session: dict[str, Any] = {
        "type": "realtime", "instructions": opts.instructions,
        "output_modalities": ["audio"], "audio": {"input": audio_in},
    }
    if opts.max_output_tokens:
        session["max_output_tokens"] = opts.max_output_tokens
    if opts.cascade_extras and spec.pipeline is not None:
        session["cascade"] = {"pipeline": spec.pipeline, "timings": True}
    return session


def _session_update(mode: str, opts: TurnOptions) -> str:
    if opts.dialect == "beta":
        return _beta_session_update(mode, opts)
    session = ga_session(mode, opts)
    pcm = {"type": "audio/pcm", "rate": RATE}
    session["audio"] = {"input": {"format": pcm, **session["audio"]["input"]},
                        "output": {"format": pcm}}
    return json.dumps({"type": "session.update", "session": session})


def _beta_session_update(mode: str, opts: TurnOptions) -> str:
    """The same session in the beta dialect (flat fields; pcm16 is 24 kHz there)."""
    spec = opts.spec(mode)
    session: dict[str, Any] = {
        "modalities": ["audio", "text"], "instructions": opts.instructions,
        "input_audio_format": "pcm16", "output_audio_format": "pcm16",
        "turn_detection": spec.turn_detection_config(),
    }
    if opts.transcription_model:
        session["input_audio_transcription"] = {"model": opts.transcription_model}
    if opts.max_output_tokens:
        session["max_response_output_tokens"] = opts.max_output_tokens
    if opts.cascade_extras and spec.pipeline is not None:
        session["cascade"] = {"pipeline": spec.pipeline, "timings": True}
    return json.dumps({"type": "session.update", "session": session})


async def _read(ws: ClientConnection, marks: Marks) -> None:
    try:
        async for raw in ws:
            if isinstance(raw, bytes):
                continue
            on_event(json.loads(raw), time.perf_counter(), marks)
    except Exception as exc:  # a dropped connection or an event we cannot read
        marks.error = marks.error or f"{type(exc).__name__}: {exc}"
        marks.finished.set()
    else:
        if marks.answer is None:
            marks.error = marks.error or "the server closed the connection"
        marks.finished.set()


async def _wait_for(ws: ClientConnection, kind: str, timeout_s: float) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        async for raw in ws:
            event: dict[str, Any] = json.loads(raw)
            if event.get("type") == kind:
                return event
            if event.get("type") == "error":
                raise RuntimeError(f"server error before the turn: {event.get('error')}")
    raise RuntimeError(f"connection closed before {kind}")


async def run_turn(opts: TurnOptions, clip: PreparedClip, mode: str, *, phase: Phase,
                   concurrency: int = 1, session_index: int = 0, round_: int = 0,
                   t0: float = 0.0, interrupt: PreparedClip | None = None) -> TurnRecord:
    """Stream one clip as a user turn and time the reply. With ``interrupt``, the user
    talks over the reply (that clip) once it has played for ``INTERRUPT_AFTER_S``. Never
    raises for a bad reply: failures land in the record's ``error``."""
    started = time.perf_counter()
    marks = Marks(barge_in=interrupt is not None)
    record = TurnRecord(phase=phase, mode=mode, concurrency=concurrency,
                        session_index=session_index, round=round_, clip=clip.clip.info.name,
                        started_s=round(started - t0, 3), eos_s=0.0)
    try:
        async with connect(opts.url, additional_headers=opts.headers, max_size=2**24,
                           open_timeout=30) as ws:
            await _wait_for(ws, "session.created", 30)
            await ws.send(_session_update(mode, opts))
            await _wait_for(ws, "session.updated", 30)
            reader = asyncio.create_task(_read(ws, marks))
            try:
                await _stream(ws, clip, marks, opts, interrupt)
                if interrupt is None and timings_pending(marks) and opts.timings(mode):
                    # cascade sends its stage timings right after response.done.
                    await _grace(marks, 1.0)
            finally:
                reader.cancel()
    except Exception as exc:  # refused, dropped, timed out: a failed turn, not a crash
        marks.error = marks.error or f"{type(exc).__name__}: {exc}"
    return finish(record, marks, clip.clip.info.text, opts.gap_threshold_s, t0)


async def _stream(ws: ClientConnection, clip: PreparedClip, marks: Marks,
                  opts: TurnOptions, interrupt: PreparedClip | None) -> None:
    """Send frames at real time (the clip, then silence, or the interrupting clip once
    the reply has played a while) until the turn is over."""
    start = time.perf_counter()
    deadline: float | None = None
    k = 0
    j: int | None = None  # position in the interrupting clip, once the user talks over
    while not marks.finished.is_set():
        # A microphone hands over frame k once it has captured it: at (k + 1) * 20 ms.
        delay = start + (k + 1) * FRAME_S - time.perf_counter()
        if delay > 0:
            try:
                await asyncio.wait_for(marks.finished.wait(), delay)
                break
            except TimeoutError:
                pass
        if interrupt is not None and marks.answer is not None:
            if j is None:
                state = _interrupt_now(marks.responses[marks.answer], opts)
                if state == "finished":
                    marks.error = "the reply had finished playing before the interruption"
                    break
                j = 0 if state == "now" else None
            elif await _client_truncate(ws, marks, opts):
                break
        if j is not None and interrupt is not None and j < len(interrupt.frames):
            await ws.send(interrupt.frames[j])
            if j == interrupt.onset_frame:
                marks.onset = time.perf_counter()
            j += 1
        else:
            await ws.send(clip.frames[k] if k < len(clip.frames) else _SILENCE)
        if k == clip.eos_frame:
            marks.eos = time.perf_counter()
            deadline = marks.eos + opts.reply_timeout_s
        if deadline is not None and time.perf_counter() > deadline:
            marks.error = marks.error or f"no reply within {opts.reply_timeout_s:.0f} s"
            break
        k += 1


def _interrupt_now(reply: Response, opts: TurnOptions) -> str:
    """"now" once the reply has played INTERRUPT_AFTER_S and is still audible, "wait"
    before, "finished" if it ended before that."""
    now = time.perf_counter()
    if reply.first_audio is None or now < reply.first_audio + INTERRUPT_AFTER_S:
        return "wait"
    playing_until = reply.playback(now, opts.gap_threshold_s).played_until or 0.0
    if playing_until > now:
        return "now"
    return "finished" if reply.done is not None else "wait"  # dry mid-reply: wait


async def _client_truncate(ws: ClientConnection, marks: Marks, opts: TurnOptions) -> bool:
    """A Realtime WebSocket client stops playback at speech_started; when the server has
    already sent the whole reply (it cannot cancel it), the client truncates the item to
    what was heard. True when the turn should end (nothing more will come)."""
    seen = noticed(marks)
    if seen is None or marks.truncated or marks.answer is None:
        return False
    reply = marks.responses[marks.answer]
    if time.perf_counter() > seen + BARGE_IN_WAIT_S:
        return True  # the server neither cancelled nor confirmed a truncation
    if marks.client_truncate or reply.status in (None, "cancelled") or not reply.item_id:
        return False
    player = reply.playback(seen, opts.gap_threshold_s)
    heard = player.audio_s - max(0.0, (player.played_until or seen) - seen)
    await ws.send(json.dumps({"type": "conversation.item.truncate", "item_id": reply.item_id,
                              "content_index": 0, "audio_end_ms": int(heard * 1000)}))
    marks.client_truncate = True
    return False


async def _grace(marks: Marks, seconds: float) -> None:
    marks.finished.clear()
    try:
        await asyncio.wait_for(marks.finished.wait(), seconds)
    except TimeoutError:
        pass
