"""From server events to a turn record: what arrived when, and what it means.

``on_event`` stamps the events that matter as they arrive; ``finish`` turns the stamps
into a ``TurnRecord``, every time relative to the ground-truth end of speech (or, for a
barge-in, to the moment the interrupting speech began). Pure functions of (event, time),
so the rules are tested on scripted sequences with exact clocks.

The reply's audio is transport-specific (``ReplyAudio``): over the WebSocket it is the
``response.output_audio.delta`` chunks fed to a simulated player; over WebRTC it is read
off the received audio track (``received.py``). Everything else is the same events, so the
records of both transports are comparable.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field
from typing import Any

from benchmarks.v2v.corpus import RATE
from benchmarks.v2v.playback import PlaybackGaps
from benchmarks.v2v.records import TurnRecord
from stages.common.text import wer

AUDIO_DELTA = {"response.output_audio.delta", "response.audio.delta"}
# Optional cascade.turn.timings fields on the speculative starts of the turn (newer
# servers): how many were started and the work thrown away with the ones not used.
SPECULATION_FIELDS = ("speculations", "wasted_llm_tokens", "wasted_tts_ms")
TEXT_DELTA = {"response.output_audio_transcript.delta", "response.audio_transcript.delta",
              "response.output_text.delta", "response.text.delta"}


@dataclass(frozen=True)
class ReplyAudio:
    """What the listener got of one reply, whatever carried it."""

    first_audio: float | None  # perf_counter: the first reply audio the listener has
    chunks: int  # pieces of audio received (WebSocket deltas, or 20 ms WebRTC frames)
    audio_s: float  # seconds of reply audio received
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds)

    @classmethod
    def from_chunks(cls, first_audio: float | None, chunks: list[tuple[float, float]],
                    threshold_s: float) -> ReplyAudio:
        """WebSocket: the deltas ``(arrival, seconds)`` played by the simulated player."""
        player = PlaybackGaps(threshold_s=threshold_s)
        for arrival, seconds in chunks:
            player.add(arrival, seconds)
        return cls(first_audio=first_audio, chunks=player.chunks, audio_s=player.audio_s,
                   gaps=list(zip(player.gap_starts, player.gaps, strict=True)))


@dataclass
class Response:
    created: float
    first_text: float | None = None
    first_audio: float | None = None
    done: float | None = None
    status: str | None = None
    chunks: list[tuple[float, float]] = field(default_factory=list)  # (arrival, seconds)
    text: list[str] = field(default_factory=list)
    item_id: str | None = None  # the assistant item its audio belongs to

    def playback(self, until: float, threshold_s: float) -> PlaybackGaps:
        """The simulated player fed with the chunks that arrived before ``until``."""
        player = PlaybackGaps(threshold_s=threshold_s)
        for arrival, seconds in self.chunks:
            if arrival < until:
                player.add(arrival, seconds)
        return player


@dataclass
class Marks:
    """Receive times (perf_counter) of the events that matter, as they arrive."""

    barge_in: bool = False  # this turn interrupts the reply once it is playing
    eos: float | None = None
    onset: float | None = None  # barge-in: the first voiced interrupting frame was sent
    speech_started: list[float] = field(default_factory=list)
    speech_stopped: list[float] = field(default_factory=list)
    transcripts: list[tuple[float, str]] = field(default_factory=list)
    responses: dict[str, Response] = field(default_factory=dict)
    truncated: bool = False  # conversation.item.truncated arrived
    client_truncate: bool = False  # the client had to ask for it (the reply was complete)
    # cascade.turn.timings by response id ("" when the event names none), in arrival
    # order: the answer's gives the turn's stage marks; all of them its speculation work.
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # WebRTC only: output_audio_buffer.started/stopped/cleared, response id -> kind -> time
    # (the first of each kind).
    audio_buffer: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    # The reply to the whole turn (barge-in: the reply being interrupted).
    answer: str | None = None


def _response_done(rid: str, resp: Response, marks: Marks) -> None:
    if marks.barge_in:
        # A cancelled reply ends the barge-in turn (cascade truncates the item first). A
        # reply the server had finished sending ends it only after the client's truncate.
        if marks.onset is not None and rid == marks.answer and resp.status == "cancelled":
            marks.finished.set()
        return
    # The turn is answered by the first reply that ends after the user stopped talking
    # and was not cut off by the user continuing (a split turn).
    if marks.eos is not None and resp.status != "cancelled" and marks.answer is None:
        marks.answer = rid
        marks.finished.set()


def noticed(marks: Marks) -> float | None:
    """When the server reported the interrupting speech (the client stops playback)."""
    if marks.onset is None:
        return None
    onset = marks.onset
    return next((t for t in marks.speech_started if t >= onset), None)


def on_event(event: dict[str, Any], now: float, marks: Marks) -> None:
    kind = event.get("type", "")
    if kind == "input_audio_buffer.speech_started":
        marks.speech_started.append(now)
    elif kind == "input_audio_buffer.speech_stopped":
        marks.speech_stopped.append(now)
    elif kind == "conversation.item.input_audio_transcription.completed":
        marks.transcripts.append((now, str(event.get("transcript", ""))))
    elif kind == "conversation.item.truncated":
        marks.truncated = True
        answer = marks.responses.get(marks.answer or "")
        if marks.barge_in and marks.onset is not None and answer and answer.done is not None:
            marks.finished.set()  # the client's truncation of a reply sent in full
    elif kind == "response.created":
        marks.responses[event["response"]["id"]] = Response(created=now)
    elif kind in AUDIO_DELTA or kind in TEXT_DELTA:
        rid = event.get("response_id", "")
        resp = marks.responses.setdefault(rid, Response(created=now))
        if kind in AUDIO_DELTA:
            resp.first_audio = resp.first_audio or now
            resp.item_id = resp.item_id or event.get("item_id")
            resp.chunks.append((now, len(base64.b64decode(event["delta"])) / 2 / RATE))
            if marks.barge_in and marks.answer is None and marks.eos is not None:
                marks.answer = rid  # the reply the user will talk over
        else:
            resp.first_text = resp.first_text or now
            resp.text.append(str(event.get("delta", "")))
    elif kind == "response.done":
        rid = event["response"]["id"]
        resp = marks.responses.setdefault(rid, Response(created=now))
        resp.done, resp.status = now, event["response"].get("status")
        _response_done(rid, resp, marks)
    elif kind.startswith("output_audio_buffer."):
        rid = str(event.get("response_id") or "")
        marks.audio_buffer.setdefault(rid, {}).setdefault(kind.rsplit(".", 1)[1], now)
    elif kind == "cascade.turn.timings":
        rid = str(event.get("response_id") or "")
        marks.timings.setdefault(rid, event)
        if marks.answer is not None and not marks.barge_in and rid in ("", marks.answer):
            marks.finished.set()
    elif kind == "error":
        err = event.get("error") or {}
        marks.error = f"{err.get('code') or err.get('type')}: {err.get('message')}"
        marks.finished.set()


def timings_pending(marks: Marks) -> bool:
    """The turn has its answer but not yet the answer's cascade.turn.timings (which cascade
    sends right after response.done; an event naming no response counts as the answer's)."""
    return (marks.answer is not None and marks.answer not in marks.timings
            and "" not in marks.timings)


def answer_timings(marks: Marks) -> dict[str, Any] | None:
    """The answer's cascade.turn.timings, else the first that arrived (None: none)."""
    if not marks.timings:
        return None
    return marks.timings.get(marks.answer or "") or next(iter(marks.timings.values()))


def server_marks(timings: dict[str, Any]) -> dict[str, float | None]:
    """The server's stage marks (ms from its end of speech) of one timings event: its
    ``*_ms`` fields, less the speculation totals (amounts of audio, not moments)."""
    return {k: v for k, v in timings.items()
            if k.endswith("_ms") and k not in SPECULATION_FIELDS}


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _amount(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _total(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def speculation_totals(marks: Marks) -> tuple[int | None, int | None, float | None]:
    """(speculations started, wasted LLM tokens, wasted TTS ms) summed over every
    timings event of the turn (a split turn has one per reply); None where no event
    reported the field (an older server)."""
    events = list(marks.timings.values())
    started = _total([_count(e.get("speculations")) for e in events])
    tokens = _total([_count(e.get("wasted_llm_tokens")) for e in events])
    tts = _total([_amount(e.get("wasted_tts_ms")) for e in events])
    return (None if started is None else int(started), None if tokens is None else int(tokens),
            None if tts is None else round(tts, 1))


def _ms(at: float | None, origin: float) -> float | None:
    return None if at is None else round((at - origin) * 1000, 1)


def finish(record: TurnRecord, marks: Marks, text: str | None, gap_threshold_s: float,
           t0: float, audio: ReplyAudio | None = None) -> TurnRecord:
    """Fill ``record`` from the stamps; ``text`` is what the user said, when known.
    ``audio``: the answer's audio as the transport delivered it (default: its WebSocket
    deltas)."""
    if marks.eos is None:
        record.error = marks.error or "the clip was not fully sent"
        return record
    eos = marks.eos
    record.eos_s = round(eos - t0, 3)
    record.error = marks.error
    record.early_endpoint = any(t < eos for t in marks.speech_stopped)
    after = [t for t in marks.speech_stopped if t >= eos]
    record.speech_stopped_ms = _ms(after[0] if after else None, eos)
    said = [(at, t) for at, t in marks.transcripts if marks.onset is None or at < marks.onset]
    if said:
        record.final_transcript_ms = _ms(said[-1][0], eos)
        record.transcript = " ".join(t for _, t in said).strip()
        if text:
            record.wer = round(wer(text, record.transcript), 3)
    record.responses = len(marks.responses)
    answer = marks.responses.get(marks.answer or "")
    if answer is None:
        record.error = record.error or "no reply"
        return record
    if audio is None:
        audio = ReplyAudio.from_chunks(answer.first_audio, answer.chunks, gap_threshold_s)
    record.first_text_ms = _ms(answer.first_text, eos)
    record.first_audio_ms = _ms(audio.first_audio, eos)
    record.done_ms = _ms(answer.done, eos)
    record.reply_text = "".join(answer.text).strip()
    lengths = [length for _, length in audio.gaps]
    record.audio_chunks = audio.chunks
    record.reply_audio_ms = round(audio.audio_s * 1000, 1)
    record.gap_count = len(lengths)
    record.gap_total_ms = round(sum(lengths) * 1000, 1)
    record.gap_max_ms = round(max(lengths, default=0.0) * 1000, 1)
    record.gaps = [(round((at - eos) * 1000, 1), round(length * 1000, 1))
                   for at, length in audio.gaps]
    timings = answer_timings(marks)
    if timings is not None:
        record.server = server_marks(timings)
        hit = timings.get("speculative_hit")
        record.speculative_hit = hit if isinstance(hit, bool) else None
    record.speculations, record.wasted_llm_tokens, record.wasted_tts_ms = (
        speculation_totals(marks))
    if record.error is None and audio.first_audio is None:
        record.error = "the reply had no audio"
    if marks.barge_in:
        _finish_barge_in(record, marks, answer)
    return record


def _finish_barge_in(record: TurnRecord, marks: Marks, answer: Response) -> None:
    """Times from the first interrupting voiced frame: when the server noticed (the
    client stops playback at ``speech_started``) and when it cancelled the reply."""
    onset = marks.onset
    if onset is None:
        record.error = record.error or "the reply was never interrupted"
        return
    seen = noticed(marks)
    record.barge_in_ms = _ms(seen, onset)
    if answer.status == "cancelled" and answer.done is not None and answer.done >= onset:
        record.barge_in_cancel_ms = _ms(answer.done, onset)
    if seen is not None:
        late = sum(seconds for at, seconds in answer.chunks if at > seen)
        record.barge_in_audio_after_ms = round(late * 1000, 1)
    record.truncated = marks.truncated
    record.client_truncate = marks.client_truncate
    if record.error is None and seen is None:
        record.error = "the server did not notice the interruption"
