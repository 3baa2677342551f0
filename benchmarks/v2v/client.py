"""One user turn over the Realtime WebSocket API, timed like a microphone would see it.

The client opens a session, configures 24 kHz pcm16 with server VAD, then streams the
clip in 20 ms ``input_audio_buffer.append`` frames at real time — each frame sent when a
microphone would have captured it — and keeps streaming silence until the reply is done.
Only standard Realtime events are needed (GA names, beta names accepted too); with
``cascade_extras`` the session also selects cascade's pipeline and asks for its
server-side stage timings.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from benchmarks.v2v.corpus import RATE, Clip
from benchmarks.v2v.options import DEFAULT_INSTRUCTIONS, DEFAULT_MAX_OUTPUT_TOKENS
from benchmarks.v2v.playback import PlaybackGaps
from benchmarks.v2v.records import Phase, TurnRecord
from stages.common.text import wer

FRAME = RATE // 50  # 20 ms
FRAME_S = FRAME / RATE
LEAD_S = 0.3  # silence before the clip, so the server's VAD hears the onset
CASCADE_MODES = ("streaming", "serial")

AUDIO_DELTA = {"response.output_audio.delta", "response.audio.delta"}
TEXT_DELTA = {"response.output_audio_transcript.delta", "response.audio_transcript.delta",
              "response.output_text.delta", "response.text.delta"}


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


@dataclass
class _Response:
    created: float
    first_text: float | None = None
    first_audio: float | None = None
    done: float | None = None
    status: str | None = None
    chunks: list[tuple[float, float]] = field(default_factory=list)  # (arrival, seconds)
    text: list[str] = field(default_factory=list)


@dataclass
class _Marks:
    """Receive times (perf_counter) of the events that matter, as they arrive."""

    eos: float | None = None
    speech_stopped: list[float] = field(default_factory=list)
    transcripts: list[tuple[float, str]] = field(default_factory=list)
    responses: dict[str, _Response] = field(default_factory=dict)
    server: dict[str, float | None] | None = None
    error: str | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    answer: str | None = None  # id of the response that answered the whole turn


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


def _session_update(mode: str, opts: TurnOptions) -> str:
    if opts.dialect == "beta":
        return _beta_session_update(mode, opts)
    audio_in: dict[str, Any] = {"format": {"type": "audio/pcm", "rate": RATE},
                                "turn_detection": {"type": "server_vad"}}
    if opts.transcription_model:
        audio_in["transcription"] = {"model": opts.transcription_model}
    session: dict[str, Any] = {
        "type": "realtime", "instructions": opts.instructions,
        "output_modalities": ["audio"],
        "audio": {"input": audio_in, "output": {"format": {"type": "audio/pcm", "rate": RATE}}},
    }
    if opts.max_output_tokens:
        session["max_output_tokens"] = opts.max_output_tokens
    if opts.cascade_extras and mode in CASCADE_MODES:
        session["cascade"] = {"pipeline": mode, "timings": True}
    return json.dumps({"type": "session.update", "session": session})


def _beta_session_update(mode: str, opts: TurnOptions) -> str:
    """The same session in the beta dialect (flat fields; pcm16 is 24 kHz there)."""
    session: dict[str, Any] = {
        "modalities": ["audio", "text"], "instructions": opts.instructions,
        "input_audio_format": "pcm16", "output_audio_format": "pcm16",
        "turn_detection": {"type": "server_vad"},
    }
    if opts.transcription_model:
        session["input_audio_transcription"] = {"model": opts.transcription_model}
    if opts.max_output_tokens:
        session["max_response_output_tokens"] = opts.max_output_tokens
    if opts.cascade_extras and mode in CASCADE_MODES:
        session["cascade"] = {"pipeline": mode, "timings": True}
    return json.dumps({"type": "session.update", "session": session})


def _on_event(event: dict[str, Any], now: float, marks: _Marks) -> None:
    kind = event.get("type", "")
    if kind == "input_audio_buffer.speech_stopped":
        marks.speech_stopped.append(now)
    elif kind == "conversation.item.input_audio_transcription.completed":
        marks.transcripts.append((now, str(event.get("transcript", ""))))
    elif kind == "response.created":
        marks.responses[event["response"]["id"]] = _Response(created=now)
    elif kind in AUDIO_DELTA or kind in TEXT_DELTA:
        resp = marks.responses.setdefault(event.get("response_id", ""), _Response(created=now))
        if kind in AUDIO_DELTA:
            resp.first_audio = resp.first_audio or now
            resp.chunks.append((now, len(base64.b64decode(event["delta"])) / 2 / RATE))
        else:
            resp.first_text = resp.first_text or now
            resp.text.append(str(event.get("delta", "")))
    elif kind == "response.done":
        rid = event["response"]["id"]
        resp = marks.responses.setdefault(rid, _Response(created=now))
        resp.done, resp.status = now, event["response"].get("status")
        # The turn is answered by the first reply that ends after the user stopped
        # talking and was not cut off by the user continuing (a split turn).
        if marks.eos is not None and resp.status != "cancelled" and marks.answer is None:
            marks.answer = rid
            marks.finished.set()
    elif kind == "cascade.turn.timings":
        marks.server = {k: v for k, v in event.items() if k.endswith("_ms")}
        if marks.answer is not None:
            marks.finished.set()
    elif kind == "error":
        err = event.get("error") or {}
        marks.error = f"{err.get('code') or err.get('type')}: {err.get('message')}"
        marks.finished.set()


async def _read(ws: ClientConnection, marks: _Marks) -> None:
    try:
        async for raw in ws:
            if isinstance(raw, bytes):
                continue
            _on_event(json.loads(raw), time.perf_counter(), marks)
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
                   t0: float = 0.0) -> TurnRecord:
    """Stream one clip as a user turn and time the reply. Never raises for a bad reply:
    failures land in the record's ``error``."""
    started = time.perf_counter()
    marks = _Marks()
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
                await _stream(ws, clip, marks, opts,
                              timings=opts.cascade_extras and mode in CASCADE_MODES)
            finally:
                reader.cancel()
    except (OSError, RuntimeError, TimeoutError) as exc:
        marks.error = marks.error or f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a closed connection or a malformed event
        marks.error = marks.error or f"{type(exc).__name__}: {exc}"
    return _finish(record, marks, clip, opts, t0)


async def _stream(ws: ClientConnection, clip: PreparedClip, marks: _Marks,
                  opts: TurnOptions, *, timings: bool) -> None:
    """Send frames at real time (clip, then silence) until the reply is done."""
    start = time.perf_counter()
    deadline: float | None = None
    k = 0
    while not marks.finished.is_set():
        # A microphone hands over frame k once it has captured it: at (k + 1) * 20 ms.
        delay = start + (k + 1) * FRAME_S - time.perf_counter()
        if delay > 0:
            try:
                await asyncio.wait_for(marks.finished.wait(), delay)
                break
            except TimeoutError:
                pass
        await ws.send(clip.frames[k] if k < len(clip.frames) else _SILENCE)
        if k == clip.eos_frame:
            marks.eos = time.perf_counter()
            deadline = marks.eos + opts.reply_timeout_s
        if deadline is not None and time.perf_counter() > deadline:
            marks.error = marks.error or f"no reply within {opts.reply_timeout_s:.0f} s"
            break
        k += 1
    if marks.answer is not None and timings and marks.server is None:
        # cascade sends its stage timings right after response.done; others never do.
        await _grace(marks, 1.0)


async def _grace(marks: _Marks, seconds: float) -> None:
    marks.finished.clear()
    try:
        await asyncio.wait_for(marks.finished.wait(), seconds)
    except TimeoutError:
        pass


def _ms(at: float | None, eos: float) -> float | None:
    return None if at is None else round((at - eos) * 1000, 1)


def _finish(record: TurnRecord, marks: _Marks, clip: PreparedClip, opts: TurnOptions,
            t0: float) -> TurnRecord:
    if marks.eos is None:
        record.error = marks.error or "the clip was not fully sent"
        return record
    eos = marks.eos
    record.eos_s = round(eos - t0, 3)
    record.error = marks.error
    record.early_endpoint = any(t < eos for t in marks.speech_stopped)
    after = [t for t in marks.speech_stopped if t >= eos]
    record.speech_stopped_ms = _ms(after[0] if after else None, eos)
    if marks.transcripts:
        record.final_transcript_ms = _ms(marks.transcripts[-1][0], eos)
        record.transcript = " ".join(t for _, t in marks.transcripts).strip()
        if clip.clip.info.text:
            record.wer = round(wer(clip.clip.info.text, record.transcript), 3)
    record.responses = len(marks.responses)
    answer = marks.responses.get(marks.answer or "")
    if answer is None:
        record.error = record.error or "no reply"
        return record
    record.first_text_ms = _ms(answer.first_text, eos)
    record.first_audio_ms = _ms(answer.first_audio, eos)
    record.done_ms = _ms(answer.done, eos)
    record.reply_text = "".join(answer.text).strip()
    player = PlaybackGaps(threshold_s=opts.gap_threshold_s)
    for arrival, seconds in answer.chunks:
        player.add(arrival, seconds)
    record.audio_chunks = player.chunks
    record.reply_audio_ms = round(player.audio_s * 1000, 1)
    record.gap_count = len(player.gaps)
    record.gap_total_ms = round(player.total_s * 1000, 1)
    record.gap_max_ms = round(player.max_s * 1000, 1)
    record.gaps = [(round((at - eos) * 1000, 1), round(length * 1000, 1))
                   for at, length in zip(player.gap_starts, player.gaps, strict=True)]
    if marks.server is not None:
        record.server = marks.server
    if record.error is None and answer.first_audio is None:
        record.error = "the reply had no audio"
    return record
