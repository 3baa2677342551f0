"""Conversation turns in the report: turn 1 vs later turns, the turn after the long gap,
failed turns, speculation hit rate and the work after the endpoint (synthetic records)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from benchmarks.v2v import conversation_stats, plots
from benchmarks.v2v import report as rep
from benchmarks.v2v.records import Report, TurnRecord
from tests.benchmarks.v2v.test_plots import assert_png
from tests.benchmarks.v2v.test_report import make_report, turn

GAPS = (1.0, 3.0, 65.0, 2.0)  # before turns 2, 3, 4, 5


def talk(mode: str, index: int, v2v: float | None, *, conn: str = "", stopped: float = 600.0,
         hit: bool | None = None, error: str | None = None) -> TurnRecord:
    rec = turn(mode, v2v, phase="conversation", error=error)
    rec.connection_id = conn or f"{mode}-1"
    rec.turn_index = index
    rec.gap_before_s = None if index == 1 else GAPS[index - 2]
    rec.speech_stopped_ms = stopped
    rec.speculative_hit = hit
    return rec


def conversation_records() -> list[TurnRecord]:
    """streaming: 5 turns, v2v 1000 then 1200/1300/1400/1500, speculation 2 of 4 reported.
    serial: turn 4 (after 65 s of silence) and turn 5 get no reply (a deaf server)."""
    records = [talk("streaming", 1, 1000.0, hit=True), talk("streaming", 2, 1200.0, hit=False),
               talk("streaming", 3, 1300.0, hit=True), talk("streaming", 4, 1400.0),
               talk("streaming", 5, 1500.0, hit=False)]
    deaf = "input_audio_buffer_full: the input audio buffer is full"
    records += [talk("serial", 1, 2000.0, stopped=500.0), talk("serial", 2, 2200.0),
                talk("serial", 3, 2400.0), talk("serial", 4, None, error=deaf),
                talk("serial", 5, None, error=deaf)]
    records[8].gap_errors, records[8].gap_error = 250, deaf
    return records


def conversation_report() -> Report:
    records = [turn("streaming", 900.0), turn("serial", 1900.0), *conversation_records()]
    report = make_report(records=records, sweep=False)
    report.conversation = conversation_stats.summarize(records)
    report.config.conversation_rounds, report.config.conversation_turns = 1, 5
    report.config.conversation_gaps_s = list(GAPS)
    return report


def test_turn_one_later_turns_long_gap_and_failures_per_mode() -> None:
    streaming, serial = conversation_stats.summarize(conversation_records())
    assert (streaming.mode, streaming.connections, streaming.turns) == ("streaming", 1, 5)
    assert streaming.replied == 5 and streaming.failed == 0
    assert streaming.first_turn is not None and streaming.first_turn.p50 == 1000.0
    assert streaming.later_turns is not None
    assert (streaming.later_turns.n, streaming.later_turns.p50) == (4, 1350.0)
    assert streaming.later_turns.p90 == 1470.0
    assert (streaming.long_gap_turns, streaming.long_gap_replied) == (1, 1)
    assert streaming.after_long_gap is not None and streaming.after_long_gap.p50 == 1400.0
    assert (streaming.speculative_hits, streaming.speculative_reported) == (2, 4)
    assert streaming.speculative_hit_rate == 0.5
    # The same split as the compare phase: hits at 1000 and 1300, misses at 1200 and 1500;
    # the work totals were not reported (an older server).
    spec = streaming.speculation
    assert spec is not None and (spec.hits, spec.reported, spec.totals_reported) == (2, 4, 0)
    assert spec.v2v_hit is not None and (spec.v2v_hit.n, spec.v2v_hit.p50) == (2, 1150.0)
    assert spec.v2v_miss is not None and (spec.v2v_miss.n, spec.v2v_miss.p50) == (2, 1350.0)
    assert spec.wasted_llm_tokens_per_turn is None and spec.speculations_per_turn is None
    # v2v - speech_stopped (600 ms): 400, 600, 700, 800, 900.
    assert streaming.after_endpoint is not None and streaming.after_endpoint.p50 == 700.0

    assert serial.replied == 3 and serial.failed == 2
    assert serial.later_turns is not None and serial.later_turns.n == 2  # failures excluded
    assert (serial.long_gap_turns, serial.long_gap_replied) == (1, 0)
    assert serial.after_long_gap is None
    assert serial.speculative_reported == 0 and serial.speculative_hit_rate is None
    assert serial.speculation is None
    assert serial.after_endpoint is not None and serial.after_endpoint.p50 == 1600.0
    assert [(t.turn_index, t.gap_before_s, t.replied, t.v2v_p50) for t in serial.by_turn] == [
        (1, None, 1, 2000.0), (2, 1.0, 1, 2200.0), (3, 3.0, 1, 2400.0), (4, 65.0, 0, None),
        (5, 2.0, 0, None)]
    assert serial.by_turn[3].errors == ["input_audio_buffer_full: the input audio buffer is full"]


def test_several_connections_per_mode() -> None:
    records = [talk("streaming", 1, 1000.0, conn="a"), talk("streaming", 2, 1100.0, conn="a"),
               talk("streaming", 1, 3000.0, conn="b"), talk("streaming", 2, None, conn="b",
                                                           error="no reply within 60 s")]
    (summary,) = conversation_stats.summarize(records)
    assert summary.connections == 2 and summary.first_turn is not None
    assert summary.first_turn.n == 2 and summary.first_turn.p50 == 2000.0
    assert [(t.turn_index, t.turns, t.replied) for t in summary.by_turn] == [(1, 2, 2),
                                                                            (2, 2, 1)]
    assert conversation_stats.summarize([turn("streaming", 500.0)]) == []  # compare only


def test_markdown_conversation_section() -> None:
    md = rep.markdown(conversation_report())
    assert "## Conversations" in md
    assert "1 connection per mode, 5 user turns on each" in md
    assert "1, 3, 65, 2 s before turns 2, 3, ..." in md
    assert ("| mode | replied | failed | turn 1 p50 | turn 1 p90 | later turns p50 "
            "| later turns p90 | after a gap >= 60 s | speculation hits "
            "| after endpoint p50 |") in md
    assert "| streaming | 5/5 | 0 | 1000 | 1000 | 1350 | 1470 | 1400 | 2/4 (50 %) | 700 |" in md
    assert "| serial | 3/5 | 2 | 2000 | 2000 | 2300 | 2380 | no reply (0/1) | n/a | 1600 |" in md
    assert "| turn | silence before | streaming | serial |" in md
    assert "| 1 | – | 1000 | 2000 |" in md  # noqa: RUF001
    assert "| 4 | 65.0 s | 1400 | no reply |" in md
    assert ("- serial serial-1 turn 4 (lights, after 65 s of silence): input_audio_buffer_full: "
            "the input audio buffer is full; 250 error events during the silence before it "
            "(first: input_audio_buffer_full: the input audio buffer is full)") in md
    assert "- serial serial-1 turn 5 (lights, after 2 s of silence)" in md
    assert "conversation.png" in md
    # The compare phase: the derived metric and the (unreported) speculation.
    assert "| work after the endpoint (v2v - speech_stopped) | 650 |" in md
    assert "| transcript WER | speculation hits |" in md and "| – | n/a |" in md  # noqa: RUF001


def test_without_conversations_there_is_no_section() -> None:
    report = make_report(sweep=False)
    md = rep.markdown(report)
    assert "## Conversations" not in md and "- conversations: none" in md
    assert "conversation.png" not in md and plots.conversation(report) is None


def test_terminal_table_shows_conversation_and_failures() -> None:
    console = Console(record=True, width=200)
    rep.print_summary(conversation_report(), console)
    text = console.export_text()
    assert "Conversation: voice-to-voice by turn" in text
    for needle in ("turn 1 p50 / p90", "1000 / 1000", "1350 / 1470", "2300 / 2380",
                   "after a 60 s+ gap", "2/4 (50 %)", "no reply (0/1)", "n/a",
                   "serial serial-1 turn 4", "work after the endpoint"):
        assert needle in text, needle


def test_conversation_plot_and_report_round_trip(tmp_path: Path) -> None:
    report = conversation_report()
    written = rep.write_report(report, tmp_path)
    assert "conversation.png" in written and plots.planned(report) == list(written)[1:-1]
    assert_png(written["conversation.png"])
    again = Report.model_validate_json(written["report.json"].read_text())
    assert again == report
    assert again.conversation[0].speculative_hit_rate == 0.5
    raw = written["report.json"].read_text()
    assert '"after_endpoint_ms": 400.0' in raw and '"speculative_hit_rate": 0.5' in raw
