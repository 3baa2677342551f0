"""From events to a turn record, on scripted event sequences with exact clock values."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from benchmarks.v2v.corpus import RATE
from benchmarks.v2v.events import Marks, on_event, timings_pending
from benchmarks.v2v.events import finish as finish_record
from benchmarks.v2v.records import TurnRecord


def _audio(response_id: str, seconds: float) -> dict[str, Any]:
    pcm = np.zeros(round(seconds * RATE), np.int16).tobytes()
    return {"type": "response.output_audio.delta", "response_id": response_id,
            "delta": base64.b64encode(pcm).decode()}


def _play(script: list[tuple[float, dict[str, Any]]], eos: float = 10.0) -> Marks:
    marks = Marks()
    for at, event in script:
        if marks.eos is None and at >= eos:
            marks.eos = eos
        on_event(event, at, marks)
    marks.eos = marks.eos or eos
    return marks


def _finish(marks: Marks, t0: float, text: str | None = "what is the capital of france"
            ) -> TurnRecord:
    return finish_record(_record(), marks, text, 0.02, t0)


def _record() -> TurnRecord:
    return TurnRecord(phase="compare", mode="streaming", concurrency=1, session_index=0,
                      round=0, clip="q", started_s=0.0, eos_s=0.0)


def test_a_clean_turn_is_timed_from_the_end_of_speech() -> None:
    marks = _play([
        (10.53, {"type": "input_audio_buffer.speech_stopped"}),
        (10.60, {"type": "response.created", "response": {"id": "r1"}}),
        (10.61, {"type": "conversation.item.input_audio_transcription.completed",
                 "transcript": "What is the capital of France?"}),
        (10.90, {"type": "response.output_audio_transcript.delta", "response_id": "r1",
                 "delta": "Paris "}),
        (11.00, _audio("r1", 0.5)),
        (11.20, _audio("r1", 0.5)),   # queued behind the first: no gap
        (12.30, _audio("r1", 0.2)),   # player ran dry at 12.0: a 300 ms gap
        (12.40, {"type": "response.done", "response": {"id": "r1", "status": "completed"}}),
        (12.41, {"type": "cascade.turn.timings", "endpoint_ms": 520.0,
                 "llm_first_token_ms": 250.5, "pipeline": "streaming"}),
    ])
    assert marks.finished.is_set() and marks.answer == "r1"
    rec = _finish(marks, t0=9.0)
    assert rec.error is None and rec.replied
    assert (rec.speech_stopped_ms, rec.final_transcript_ms, rec.first_text_ms,
            rec.first_audio_ms, rec.done_ms) == (530.0, 610.0, 900.0, 1000.0, 2400.0)
    assert rec.eos_s == 1.0
    assert rec.reply_audio_ms == 1200.0 and rec.audio_chunks == 3
    assert (rec.gap_count, rec.gap_total_ms, rec.gap_max_ms) == (1, 300.0, 300.0)
    assert rec.gaps == [(2000.0, 300.0)]  # the player ran dry at 12.0 s, EoS was 10.0 s
    assert rec.transcript == "What is the capital of France?" and rec.wer == 0.0
    assert rec.reply_text == "Paris"
    assert rec.server == {"endpoint_ms": 520.0, "llm_first_token_ms": 250.5}
    assert not rec.early_endpoint and rec.responses == 1


def test_a_reply_cut_off_by_the_user_continuing_is_not_the_answer() -> None:
    """An endpoint inside a mid-sentence pause starts a reply the server then cancels;
    the answer is the reply to the whole turn, and the early endpoint is flagged."""
    marks = _play([
        (9.0, {"type": "input_audio_buffer.speech_stopped"}),
        (9.1, {"type": "response.created", "response": {"id": "early"}}),
        (9.3, {"type": "response.done", "response": {"id": "early", "status": "cancelled"}}),
        (10.6, {"type": "input_audio_buffer.speech_stopped"}),
        (10.7, {"type": "response.created", "response": {"id": "r2"}}),
        (11.5, _audio("r2", 1.0)),
        (12.6, {"type": "response.done", "response": {"id": "early", "status": "cancelled"}}),
        (12.7, {"type": "response.done", "response": {"id": "r2", "status": "completed"}}),
    ])
    rec = _finish(marks, t0=0.0)
    assert marks.answer == "r2"
    assert rec.early_endpoint and rec.responses == 2
    assert rec.speech_stopped_ms == 600.0 and rec.first_audio_ms == 1500.0
    assert rec.gap_count == 0 and rec.server is None


def test_beta_event_names_are_understood() -> None:
    marks = _play([
        (10.7, {"type": "response.created", "response": {"id": "r"}}),
        (10.8, {"type": "response.audio_transcript.delta", "response_id": "r", "delta": "Hi"}),
        (10.9, {**_audio("r", 0.3), "type": "response.audio.delta"}),
        (11.3, {"type": "response.done", "response": {"id": "r", "status": "completed"}}),
    ])
    rec = _finish(marks, t0=0.0, text=None)
    assert rec.first_text_ms == 800.0 and rec.first_audio_ms == 900.0
    assert rec.wer is None and rec.transcript is None


def test_errors_and_silent_replies_are_recorded_not_raised() -> None:
    marks = _play([(10.2, {"type": "error", "error": {"type": "invalid_request_error",
                                                      "code": "bad", "message": "nope"}})])
    assert marks.finished.is_set()
    rec = _finish(marks, t0=0.0)
    assert rec.error == "bad: nope" and not rec.replied

    text_only = _play([
        (10.7, {"type": "response.created", "response": {"id": "r"}}),
        (11.3, {"type": "response.done", "response": {"id": "r", "status": "completed"}}),
    ])
    rec = _finish(text_only, t0=0.0)
    assert rec.error == "the reply had no audio" and not rec.replied

    unsent = Marks()
    assert _finish(unsent, t0=0.0).error


def _barge(script: list[tuple[float, dict[str, Any]]], onset: float | None = 12.0) -> Marks:
    marks = Marks(barge_in=True)
    for at, event in script:
        if marks.eos is None and at >= 10.0:
            marks.eos = 10.0
        if onset is not None and marks.onset is None and at >= onset:
            marks.onset = onset
        on_event(event, at, marks)
    return marks


def test_barge_in_is_timed_from_the_interrupting_speech() -> None:
    marks = _barge([
        (10.6, {"type": "conversation.item.input_audio_transcription.completed",
                "transcript": "What is the capital of France?"}),
        (10.7, {"type": "response.created", "response": {"id": "r"}}),
        (11.0, _audio("r", 2.0)),
        (11.8, _audio("r", 1.0)),
        (12.25, {"type": "input_audio_buffer.speech_started"}),  # the client stops playing
        (12.30, _audio("r", 0.5)),  # already on the wire: the client discards it
        (12.32, {"type": "conversation.item.truncated"}),
        (12.35, {"type": "response.done", "response": {"id": "r", "status": "cancelled"}}),
        (13.50, {"type": "conversation.item.input_audio_transcription.completed",
                 "transcript": "Stop."}),
    ])
    assert marks.finished.is_set() and marks.answer == "r"
    rec = _finish(marks, t0=0.0)
    assert rec.error is None, rec.error
    assert rec.done_ms == 2350.0 and not rec.client_truncate
    assert (rec.barge_in_ms, rec.barge_in_cancel_ms, rec.barge_in_audio_after_ms) == (
        250.0, 350.0, 500.0)
    assert rec.truncated is True and rec.first_audio_ms == 1000.0
    # The interruption's words are not the turn's transcript.
    assert rec.transcript == "What is the capital of France?" and rec.wer == 0.0


def test_a_reply_sent_in_full_is_truncated_by_the_client_not_cancelled() -> None:
    """A server that streams faster than real time has finished the reply (status
    completed) while the client still plays it: the turn ends at the truncation the
    client asked for, and no cancel time is claimed."""
    marks = _barge([
        (10.7, {"type": "response.created", "response": {"id": "r"}}),
        (11.0, {**_audio("r", 3.0), "item_id": "item_1"}),
        (11.1, {"type": "response.done", "response": {"id": "r", "status": "completed"}}),
        (12.2, {"type": "input_audio_buffer.speech_started"}),
    ])
    assert not marks.finished.is_set()  # the client still has to truncate
    assert marks.responses["r"].item_id == "item_1"
    marks.client_truncate = True
    on_event({"type": "conversation.item.truncated"}, 12.3, marks)
    assert marks.finished.is_set()
    rec = _finish(marks, t0=0.0)
    assert rec.error is None and rec.barge_in_ms == 200.0
    assert rec.barge_in_cancel_ms is None and rec.truncated and rec.client_truncate


def test_an_interruption_the_server_never_notices_is_an_error() -> None:
    marks = _barge([
        (10.7, {"type": "response.created", "response": {"id": "r"}}),
        (11.0, _audio("r", 3.0)),
        (14.0, {"type": "response.done", "response": {"id": "r", "status": "completed"}}),
    ])
    rec = _finish(marks, t0=0.0)
    assert rec.error == "the server did not notice the interruption"
    assert rec.barge_in_ms is None and rec.barge_in_cancel_ms is None and not rec.truncated
    never = _barge([(10.7, {"type": "response.created", "response": {"id": "r"}}),
                    (11.0, _audio("r", 0.5))], onset=None)
    assert _finish(never, t0=0.0).error == "the reply was never interrupted"


def test_a_server_side_truncation_waits_for_the_cancelled_response_done() -> None:
    script = [
        (10.7, {"type": "response.created", "response": {"id": "r"}}),
        (11.0, _audio("r", 3.0)),
        (12.2, {"type": "input_audio_buffer.speech_started"}),
        (12.3, {"type": "conversation.item.truncated"}),
    ]
    marks = _barge(script)
    assert not marks.finished.is_set()  # response.done (cancelled) is still to come
    on_event({"type": "response.done", "response": {"id": "r", "status": "cancelled"}},
             12.4, marks)
    assert marks.finished.is_set()
    assert _finish(marks, t0=0.0).barge_in_cancel_ms == 400.0


def test_the_server_says_whether_the_reply_was_speculative() -> None:
    for reported, expect in ((True, True), (False, False), (None, None), ("yes", None)):
        marks = _play([
            (10.50, {"type": "input_audio_buffer.speech_stopped"}),
            (10.60, {"type": "response.created", "response": {"id": "r1"}}),
            (11.00, _audio("r1", 0.5)),
            (11.10, {"type": "response.done", "response": {"id": "r1", "status": "completed"}}),
            (11.11, {"type": "cascade.turn.timings", "response_id": "r1",
                     "speculative_hit": reported, "endpoint_ms": 500.0}),
        ])
        rec = _finish(marks, t0=9.0)
        assert rec.speculative_hit is expect, reported
        assert rec.server == {"endpoint_ms": 500.0}
        assert rec.after_endpoint_ms == 500.0  # v2v 1000 - speech_stopped 500
    assert _finish(_play([(10.6, {"type": "response.created", "response": {"id": "r"}})]),
                   t0=9.0).speculative_hit is None  # not reported at all


def _speculative_turn(*timings: dict[str, Any]) -> TurnRecord:
    """A turn whose reply r1 is timed by ``timings`` events (sent after response.done)."""
    script: list[tuple[float, dict[str, Any]]] = [
        (10.50, {"type": "input_audio_buffer.speech_stopped"}),
        (10.60, {"type": "response.created", "response": {"id": "r1"}}),
        (11.00, _audio("r1", 0.5)),
        (11.10, {"type": "response.done", "response": {"id": "r1", "status": "completed"}}),
    ]
    script += [(11.11 + i / 100, {"type": "cascade.turn.timings", **t})
               for i, t in enumerate(timings)]
    return _finish(_play(script), t0=9.0)


def test_speculation_work_is_recorded_when_the_server_reports_it() -> None:
    rec = _speculative_turn({"response_id": "r1", "speculative_hit": True,
                             "endpoint_ms": 500.0, "speculations": 2,
                             "wasted_llm_tokens": 14, "wasted_tts_ms": 320.5})
    assert rec.speculative_hit is True
    assert (rec.speculations, rec.wasted_llm_tokens, rec.wasted_tts_ms) == (2, 14, 320.5)
    # wasted_tts_ms is an amount of audio, not a stage mark: it stays out of the ticks.
    assert rec.server == {"endpoint_ms": 500.0}


def test_an_older_server_leaves_the_speculation_work_unreported() -> None:
    rec = _speculative_turn({"response_id": "r1", "speculative_hit": False,
                             "endpoint_ms": 500.0})
    assert rec.speculative_hit is False
    assert (rec.speculations, rec.wasted_llm_tokens, rec.wasted_tts_ms) == (None, None, None)
    # Values of the wrong type are not counts.
    rec = _speculative_turn({"response_id": "r1", "speculations": True,
                             "wasted_llm_tokens": "9", "wasted_tts_ms": None})
    assert (rec.speculations, rec.wasted_llm_tokens, rec.wasted_tts_ms) == (None, None, None)


def test_a_split_turn_sums_the_work_and_keeps_the_answers_marks() -> None:
    """An endpoint in the pause starts a reply that is cancelled; the timings of both
    replies arrive. The marks and the hit are the answer's; the thrown-away work of both
    counts, and the grace for the timings ends only with the answer's."""
    marks = _play([
        (9.0, {"type": "input_audio_buffer.speech_stopped"}),
        (9.1, {"type": "response.created", "response": {"id": "early"}}),
        (9.3, {"type": "response.done", "response": {"id": "early", "status": "cancelled"}}),
        (9.31, {"type": "cascade.turn.timings", "response_id": "early", "endpoint_ms": 400.0,
                "speculative_hit": True, "speculations": 1, "wasted_llm_tokens": 5,
                "wasted_tts_ms": 100.0}),
        (10.6, {"type": "input_audio_buffer.speech_stopped"}),
        (10.7, {"type": "response.created", "response": {"id": "r2"}}),
        (11.5, _audio("r2", 1.0)),
        (12.7, {"type": "response.done", "response": {"id": "r2", "status": "completed"}}),
    ])
    assert marks.answer == "r2" and timings_pending(marks)
    marks.finished.clear()  # the client's grace for the answer's timings
    on_event({"type": "cascade.turn.timings", "response_id": "early"}, 12.71, marks)
    assert not marks.finished.is_set() and timings_pending(marks)
    on_event({"type": "cascade.turn.timings", "response_id": "r2", "endpoint_ms": 600.0,
              "speculative_hit": False, "speculations": 2, "wasted_llm_tokens": 7,
              "wasted_tts_ms": 50.0}, 12.72, marks)
    assert marks.finished.is_set() and not timings_pending(marks)
    rec = _finish(marks, t0=0.0)
    assert rec.early_endpoint and rec.server == {"endpoint_ms": 600.0}
    assert rec.speculative_hit is False
    assert (rec.speculations, rec.wasted_llm_tokens, rec.wasted_tts_ms) == (3, 12, 150.0)
