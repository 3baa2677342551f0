"""One trace per user turn (OpenTelemetry), off unless an OTLP endpoint is configured.

When and how tracing is switched on, and the stage streams' spans: ``stages.common.tracing``.
Off, every function here returns at its first line and creates nothing.

A turn's trace, with the span names dashboards and docs cite:

``turn`` (root; from the moment the turn opens — the speech start, or the first audio of a
manual turn — to the end of its reply, or of the turn when there is none). Attributes:
``cascade.session.id``, ``cascade.turn.number`` (1, 2, ... per connection),
``cascade.turn.item_id`` (the user's conversation item), ``cascade.pipeline``,
``cascade.turn.outcome`` (``replied``, ``barged_in``, ``cancelled``, ``error``, or
``no_reply`` for a turn that asked for none: manual turns, an empty transcript),
``cascade.speculation`` (``hit``: the reply started speculatively was kept; ``miss``: a
speculative reply was thrown away and the reply restarted; ``none``),
``cascade.speculations``, ``cascade.endpoint.reason``, ``cascade.response.id`` and
``cascade.response.status``; events ``transcript.first_delta`` and ``reply.started``.

Its children are the stage streams the turn opened while it was current (``asr.stream``,
``llm.request`` for the reply and for primers, ``tts.stream``, each with the stage
service's own ``asr.session``/``llm.generate``/``tts.session`` under it), and one span per
mark of the timing vocabulary of ``metrics.py``, made after the fact from the timestamps
the session records. Each starts at the end of speech (EoS) and ends at its mark, so its
duration is exactly the histogram's observation (``cascade.latency_ms``):

=====================  ==========================================  =====================
span                   ends when                                   histogram
=====================  ==========================================  =====================
``endpoint``           the endpoint is decided (speech_stopped)     TURN_ENDPOINT_DELAY
``asr.final``          the final transcript is in                   TURN_FINAL_TRANSCRIPT
``llm.first_token``    the kept reply's first LLM token             TURN_LLM_FIRST_TOKEN
``tts.first_audio``    TTS gave the kept reply's first audio        (none: TTS's part)
``first_audio_out``    the first reply audio is sent to the client  TURN_FIRST_AUDIO
=====================  ==========================================  =====================

The session and the turn controller meet on the controller's turn numbers: the controller
opens a turn's trace (``turn_scope``) and starts its replies inside it (``start_reply``);
the session names it (``turn_opened``) and ends it (``turn_done`` after the reply,
``turn_ended`` without one). At most ``MAX_OPEN_TURNS`` traces are open per session.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stages.common import tracing

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span

    from orchestrator.realtime import TurnTiming
    from orchestrator.reply import ReplyRun
    from orchestrator.responder import Responder

MAX_OPEN_TURNS = 16
TIMING_SPANS = ("endpoint", "asr.final", "llm.first_token", "tts.first_audio",
                "first_audio_out")
OUTCOMES = ("replied", "barged_in", "cancelled", "error", "no_reply")

_NULL: AbstractContextManager[None] = contextlib.nullcontext()


@dataclass
class _Turn:
    owner: weakref.ref[object]
    number: int
    span: Span
    context: Context


# Open turns per session (its turn controller), and the turn of each reply run started.
_TURNS: weakref.WeakKeyDictionary[object, dict[int, _Turn]] = weakref.WeakKeyDictionary()
_RUNS: weakref.WeakKeyDictionary[object, _Turn] = weakref.WeakKeyDictionary()


def turn_scope(owner: object, number: int) -> AbstractContextManager[None]:
    """Open turn ``number`` of ``owner`` (the session's turn controller) if it is not yet,
    and make its trace current for the block: the ASR stream opened there is the turn's."""
    if tracing.tracer() is None:
        return _NULL
    return tracing.attached(_open(owner, number).context)


def start_reply(owner: object, number: int, run: ReplyRun) -> None:
    """``run.start()`` inside turn ``number``'s trace: the reply's LLM request and TTS
    stream are the turn's, and ``turn_done`` finds the turn from the run."""
    turn = _lookup(owner, number)
    if turn is None:
        run.start()
        return
    _RUNS[run] = turn
    with tracing.attached(turn.context):
        run.start()


def turn_opened(owner: object | None, number: int, *, session_id: str, item_id: str,
                pipeline: str) -> None:
    """The session's names for turn ``number``."""
    turn = _lookup(owner, number)
    if turn is not None:
        turn.span.set_attributes({"cascade.session.id": session_id,
                                  "cascade.turn.item_id": item_id,
                                  "cascade.pipeline": pipeline})


def turn_ended(owner: object | None, number: int, outcome: str,
               error: str | None = None) -> None:
    """Turn ``number`` ends without a reply (``no_reply``, ``error``, ``cancelled``)."""
    turn = _lookup(owner, number)
    if turn is not None:
        _end(turn, outcome, error)


def close_turns(owner: object) -> None:
    """The session closes: the turns still open end ``cancelled``."""
    if tracing.tracer() is None:
        return
    for turn in list(_TURNS.get(owner, {}).values()):
        _end(turn, "cancelled")


def turn_done(responder: Responder, timing: TurnTiming) -> None:
    """The turn's reply is over: its timing spans, attributes and outcome; the turn ends."""
    tracer = tracing.tracer()
    if tracer is None:
        return
    run = responder.run
    turn = _RUNS.pop(run, None)
    if turn is None:
        return
    if not turn.span.is_recording():  # ended already, or sampled out (OTEL_TRACES_SAMPLER)
        _end(turn, "replied")
        return
    offset = time.time_ns() - time.monotonic_ns()  # both clocks now: monotonic -> epoch

    def epoch_ns(monotonic_s: float) -> int:
        return int(monotonic_s * 1e9) + offset

    eos = timing.eos
    marks = (timing.endpoint, timing.final, run.timings.first_token, run.timings.first_audio,
             responder.first_audio_at)
    if eos is not None:
        for name, at in zip(TIMING_SPANS, marks, strict=True):
            if at is None:
                continue
            at = max(at, eos)
            span = tracer.start_span(name, context=turn.context, start_time=epoch_ns(eos))
            span.set_attribute("cascade.latency_ms", round((at - eos) * 1000.0, 1))
            span.end(end_time=epoch_ns(at))
    if timing.first_delta is not None:
        turn.span.add_event("transcript.first_delta", timestamp=epoch_ns(timing.first_delta))
    turn.span.add_event("reply.started", timestamp=epoch_ns(run.timings.started))
    speculation = ("hit" if timing.speculative_hit
                   else "miss" if timing.speculations else "none")
    response = responder.response
    turn.span.set_attributes({
        "cascade.speculation": speculation,
        "cascade.speculations": timing.speculations,
        "cascade.endpoint.reason": timing.endpoint_reason or "commit",
        "cascade.response.id": response.id,
        "cascade.response.status": response.status or "",
    })
    status = response.status
    error = None
    if status == "failed":
        outcome = "error"
        details = response.status_details
        failure = details.error if details is not None else None
        error = failure.code if failure is not None and failure.code else "failed"
    elif status == "cancelled":
        outcome = "barged_in" if responder.cancel_reason == "turn_detected" else "cancelled"
    else:
        outcome = "replied"
    _end(turn, outcome, error)


def open_turns(owner: object) -> list[int]:
    """The numbers of ``owner``'s turns whose trace is still open."""
    return sorted(_TURNS.get(owner, {}))


# ---------------------------------------------------------------------- the registry


def _open(owner: object, number: int) -> _Turn:
    turns = _TURNS.setdefault(owner, {})
    turn = turns.get(number)
    if turn is not None:
        return turn
    tracer = tracing.tracer()
    assert tracer is not None
    from opentelemetry.context import Context
    from opentelemetry.trace import set_span_in_context

    span = tracer.start_span("turn", context=Context())  # a root: a trace per turn
    span.set_attribute("cascade.turn.number", number)
    turn = turns[number] = _Turn(weakref.ref(owner), number, span, set_span_in_context(span))
    while len(turns) > MAX_OPEN_TURNS:  # a session that never ends its turns: bounded
        _end(turns[min(turns)], "cancelled")
    return turn


def _lookup(owner: object | None, number: int) -> _Turn | None:
    if tracing.tracer() is None or owner is None:
        return None
    turns = _TURNS.get(owner)
    return turns.get(number) if turns is not None else None


def _end(turn: _Turn, outcome: str, error: str | None = None) -> None:
    owner = turn.owner()
    turns = _TURNS.get(owner) if owner is not None else None
    if turns is not None and turns.get(turn.number) is turn:
        del turns[turn.number]
    span = turn.span
    if not span.is_recording():
        return
    span.set_attribute("cascade.turn.outcome", outcome)
    if error is not None:
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("cascade.error.code", error)
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()
