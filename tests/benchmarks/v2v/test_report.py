"""The Markdown summary, report.json and the terminal table of ``cascade bench``."""
# ruff: noqa: RUF001  (the report writes en dashes for missing numbers, times signs for ratios)

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from benchmarks.v2v import conversation_stats
from benchmarks.v2v import report as rep
from benchmarks.v2v.cli import mode_specs
from benchmarks.v2v.records import (
    BenchConfig,
    ClipInfo,
    MachineInfo,
    Phase,
    Report,
    TurnRecord,
)
from benchmarks.v2v.stats import group, ratios, realtime_limit


def turn(mode: str, v2v: float | None, *, phase: Phase = "compare", concurrency: int = 1,
         session: int = 0, rnd: int = 0, clip: str = "lights", gaps: int = 0,
         error: str | None = None, server: dict[str, float | None] | None = None
         ) -> TurnRecord:
    """A turn whose stage marks lead up to ``v2v`` (None: no reply at all)."""
    return TurnRecord(
        phase=phase, mode=mode, concurrency=concurrency, session_index=session,
        round=rnd, clip=clip, started_s=1.0, eos_s=3.0,
        speech_stopped_ms=250.0, final_transcript_ms=320.0,
        first_text_ms=None if v2v is None else v2v - 60,
        first_audio_ms=v2v, done_ms=None if v2v is None else v2v + 900,
        reply_audio_ms=0.0 if v2v is None else 2000.0, audio_chunks=0 if v2v is None else 10,
        gap_count=gaps, gap_total_ms=120.0 * gaps, gap_max_ms=120.0 if gaps else 0.0,
        error=error, server=server)


def make_report(*, modes: tuple[str, ...] = ("streaming", "serial"), sweep: bool = True,
                records: list[TurnRecord] | None = None) -> Report:
    """Two modes; streaming v2v 400/500/600 ms, serial 1000/1200/1400 ms; a sweep at 1, 2, 4
    where streaming is real-time up to 2 and serial not even at 1 (one turn errored)."""
    if records is None:
        planted = {"streaming": (400.0, 500.0, 600.0), "serial": (1000.0, 1200.0, 1400.0)}
        records = []
        for mode in modes:
            for rnd, v2v in enumerate(planted[mode]):
                server = {"llm_first_token_ms": v2v - 150, "tts_ms": None} if rnd == 0 else None
                records.append(turn(mode, v2v, rnd=rnd, server=server,
                                    gaps=1 if mode == "serial" and rnd == 2 else 0))
        if sweep:
            for mode in modes:
                for n in (1, 2, 4):
                    for s in range(n):
                        base = 500.0 if mode == "streaming" else 1200.0
                        gaps = 1 if n == 4 and s < 3 else 0
                        failed = mode == "serial" and n == 1
                        records.append(turn(
                            mode, None if failed else base + 100 * n + 10 * s, phase="sweep",
                            concurrency=n, session=s, gaps=gaps,
                            error="timeout" if failed else None))
    compare = group(records, "compare")
    sweep_groups = group(records, "sweep")
    clips = [ClipInfo(name="lights", text="Turn on the lights.", source="builtin",
                      duration_ms=2400.0, speech_end_ms=1830.0)]
    return Report(
        machine=MachineInfo(date="2025-01-02T03:04:05Z", cpu="Test CPU 9000", cores=16,
                            memory_gib=62.5, platform="Linux-test", python="3.11.7",
                            commit="abc1234"),
        config=BenchConfig(target="ws://127.0.0.1:8000/v1/realtime", embedded=True,
                           modes=list(modes), rounds=3, clips=clips,
                           concurrency=[1, 2, 4] if sweep else [], sweep_rounds=1,
                           gap_threshold_ms=20.0, lead_ms=500.0),
        records=records, compare=compare, ratio=ratios(compare), sweep=sweep_groups,
        realtime_limit=realtime_limit(sweep_groups), wall_s=42.0)


def test_markdown_tables_hold_the_planted_numbers() -> None:
    report = make_report()
    assert report.ratio["first_audio_ms"] == {"p50": 2.4, "p90": 2.34}
    md = rep.markdown(report)
    # streaming 400/500/600 -> p50 500, p90 580, p99 598; serial -> 1200, 1360, 1396.
    assert ("| voice-to-voice (first audio) | 500 | 580 | 598 | 1200 | 1360 | 1396 "
            "| 2.40× / 2.34× |") in md
    assert "| speech_stopped | 250 | 250 | 250 | 250 | 250 | 250 | 1.00× / 1.00× |" in md
    assert "| gaps per turn | 0 | 0 | 0 | 0 | 0.8 | 1 | – |" in md
    assert "## Streaming vs serial" in md
    assert "| streaming | 3 | 3 | 0 | 0 |" in md
    assert "| serial | 3 | 3 | 0 | 1 |" in md
    assert "Test CPU 9000 (16 cores)" in md and "abc1234" in md
    assert "| lights | Turn on the lights. | 1830 ms | 2400 ms |" in md


def test_markdown_sweep_table_and_realtime_limit() -> None:
    md = rep.markdown(make_report())
    assert "## Concurrency sweep" in md
    assert "| streaming | 2 | 2 | 2 | 705 | 709 | 0 % | 0 | yes |" in md
    assert "| streaming | 4 | 4 | 4 | 915 | 927 | 75 % | 120 | no |" in md
    assert "| serial | 1 | 1 | 0 | – | – | 0 % | – | no |" in md
    assert "streaming: replies stay real-time up to 2 simultaneous sessions." in md
    assert "serial: not real-time even at the first level (1 simultaneous session)." in md
    assert "## How to read this" in md and "10 %" in md
    for png in ("latency_cdf.png", "concurrency.png", "waterfall.png"):
        assert f"]({png})" in md


def test_markdown_without_sweep_or_second_mode() -> None:
    md = rep.markdown(make_report(modes=("streaming",), sweep=False))
    assert "Concurrency sweep" not in md
    assert "concurrency.png" not in md
    assert "## Latency" in md and "Streaming vs serial" not in md
    assert "Only one mode was measured" in md
    assert "| voice-to-voice (first audio) | 500 | 580 | 598 |" in md
    assert "serial / streaming" not in md


def test_markdown_handles_no_replies() -> None:
    report = make_report(records=[turn("streaming", None, error="refused")])
    md = rep.markdown(report)
    assert "| streaming | 1 | 0 | 1 | 0 |" in md
    assert "latency_cdf.png" not in md and "waterfall.png" in md


def test_write_report_round_trips_and_writes_everything(tmp_path: Path) -> None:
    report = make_report()
    out = tmp_path / "run" / "nested"
    written = rep.write_report(report, out)
    assert set(written) == {"report.json", "summary.md", "latency_cdf.png",
                            "concurrency.png", "waterfall.png"}
    for path in written.values():
        assert path.parent == out and path.stat().st_size > 0
    assert Report.model_validate_json(written["report.json"].read_text()) == report
    assert written["summary.md"].read_text() == rep.markdown(report, list(written)[1:-1])


def test_terminal_table_renders() -> None:
    report = make_report()
    console = Console(record=True, width=120)
    rep.print_summary(report, console)
    text = console.export_text()
    for needle in ("streaming p50", "serial p90", "voice-to-voice (first audio)", "500", "1200",
                   "2.40× / 2.34×", "Concurrency sweep", "915", "3/3"):
        assert needle in text, needle
    assert len(rep.terminal_table(make_report(sweep=False))) == 1


def test_per_clip_table_early_endpoints_and_transcript_wer() -> None:
    records = [turn("streaming", 500.0, clip="lights"), turn("serial", 1500.0, clip="lights"),
               turn("streaming", 700.0, clip="long"), turn("serial", 2500.0, clip="long")]
    records[0].wer, records[2].wer = 0.0, 0.5
    records[3].early_endpoint = True
    md = rep.markdown(make_report(records=records, sweep=False))
    assert "| streaming | 2 | 2 | 0 | 0 | 0 | 25.0 % |" in md
    assert "| serial | 2 | 2 | 0 | 0 | 1 | – |" in md
    assert ("| clip | streaming v2v p50 | streaming done p50 | streaming ended early "
            "| serial v2v p50 | serial done p50 | serial ended early |") in md
    assert "| long | 700 | 1600 | 0/1 | 2500 | 3400 | 1/1 |" in md
    # One clip: no per-clip table.
    assert "Per clip" not in rep.markdown(make_report(sweep=False))


def test_barge_in_section_and_terminal_table() -> None:
    records = [turn("streaming", 500.0), turn("serial", 1500.0)]
    for mode, noticed, cancelled, truncated in (("streaming", 60.0, 220.0, True),
                                                ("streaming", 80.0, 260.0, True),
                                                ("serial", 90.0, 300.0, False)):
        rec = turn(mode, 700.0, phase="barge_in")
        rec.barge_in_ms, rec.barge_in_cancel_ms = noticed, cancelled
        rec.barge_in_audio_after_ms, rec.truncated = 100.0, truncated
        rec.client_truncate = noticed == 80.0
        records.append(rec)
    failed = turn("serial", 700.0, phase="barge_in", error="the reply ended before the "
                  "interruption")
    records.append(failed)
    report = make_report(records=records, sweep=False)
    report.barge_in = group(records, "barge_in")
    md = rep.markdown(report)
    assert "## Barge-in" in md
    assert "| streaming | 2/2 | 70 | 78 | 240 | 256 | 100 | 2/2 (1 asked by the client) |" in md
    assert "| serial | 1/2 | 90 | 90 | 300 | 300 | 100 | 0/2 |" in md
    assert "Failures: the reply ended before the interruption." in md
    console = Console(record=True, width=160)
    rep.print_summary(report, console)
    assert "Barge-in" in console.export_text()
    assert "## Barge-in" not in rep.markdown(make_report(sweep=False))


def _two_transports() -> Report:
    """streaming/serial over ws (500/1500, 600/1600) and over webrtc (+120 ms each, the
    endpoint 80 ms later, first audio 180 ms after the first text instead of 60 ms), one
    webrtc serial turn failed, one webrtc streaming turn with a gap."""
    records = []
    for rnd, (fast, slow) in enumerate(((500.0, 1500.0), (600.0, 1600.0))):
        for transport, extra in (("ws", 0.0), ("webrtc", 120.0)):
            for mode, v2v in (("streaming", fast), ("serial", slow)):
                rec = turn(mode, v2v + extra, rnd=rnd)
                if transport == "webrtc":  # heard 80 ms later; audio 120 ms after its text
                    rec.transport, rec.speech_stopped_ms = "webrtc", 330.0
                    rec.first_text_ms = v2v - 60
                records.append(rec)
    records[3].gap_count = 1  # round 0, webrtc serial
    records[7] = turn("serial", None, rnd=1, error="HTTP 404")  # round 1, webrtc serial
    records[7].transport = "webrtc"
    records[6].gap_count, records[6].gaps = 1, [(900.0, 80.0)]  # round 1, webrtc streaming
    report = make_report(records=records, sweep=False)
    report.config.transports = ["ws", "webrtc"]
    report.config.calls_url = "http://127.0.0.1:8000/v1/realtime/calls"
    return report


def test_transports_side_by_side() -> None:
    report = _two_transports()
    assert [(g.transport, g.mode) for g in report.compare] == [
        ("ws", "streaming"), ("ws", "serial"), ("webrtc", "streaming"), ("webrtc", "serial")]
    # The serial / streaming ratio is over the first transport's turns only.
    assert report.ratio["first_audio_ms"]["p50"] == round(1550 / 550, 2)
    md = rep.markdown(report)
    assert "- transports (compare phase): WebSocket, WebRTC (WebRTC calls: " in md
    assert "## WebSocket vs WebRTC" in md
    assert ("| streaming | 550 | 590 | 670 | 710 | +120 | 250 / 330 | 60 / 180 | 2/2 / 2/2 "
            "| 0 / 1 |") in md
    assert ("| serial | 1550 | 1590 | 1620 | 1620 | +70 | 250 / 330 | 60 / 180 | 2/2 / 1/2 "
            "| 0 / 1 |") in md
    assert "| first audio after first text (audio path) | 60 | 60 | 60 |" in md
    assert ("| metric | streaming ws p50 | streaming ws p90 | streaming ws p99 "
            "| serial ws p50 |") in md
    assert "| serial webrtc | 2 | 1 | 1 | 1 |" in md
    console = Console(record=True, width=200)
    rep.print_summary(report, console)
    text = console.export_text()
    assert "WebSocket vs WebRTC" in text and "+120" in text and "streaming webrtc p50" in text
    # Records carry their transport through report.json.
    again = Report.model_validate_json(report.model_dump_json())
    assert [r.transport for r in again.records][:4] == ["ws", "ws", "webrtc", "webrtc"]


def test_one_transport_keeps_the_old_layout() -> None:
    md = rep.markdown(make_report())
    assert "WebSocket vs WebRTC" not in md and "streaming ws" not in md
    assert "- transports (compare phase): WebSocket\n" in md


def _three_modes() -> Report:
    """streaming, serial and semantic over two clips; semantic ends the pause clip early
    once (of two turns) and answers sooner; one serial turn of the pause clip failed."""
    records = []
    for rnd in range(2):
        for clip, fast in (("lights", 500.0), ("pause", 700.0)):
            records += [turn("streaming", fast, rnd=rnd, clip=clip),
                        turn("serial", fast + 1000, rnd=rnd, clip=clip),
                        turn("semantic", fast - 200, rnd=rnd, clip=clip)]
    records[-1].early_endpoint = True  # round 1, pause, semantic
    records[-2] = turn("serial", None, rnd=1, clip="pause", error="no reply")
    report = make_report(records=records, sweep=False)
    report.config.modes = ["streaming", "serial", "semantic"]
    report.config.mode_specs = mode_specs(report.config.modes, "auto")
    return report


def test_a_turn_detection_mode_is_its_own_column_without_a_ratio() -> None:
    report = _three_modes()
    assert [g.mode for g in report.compare] == ["streaming", "serial", "semantic"]
    assert [g.early_endpoints for g in report.compare] == [0, 0, 1]
    # The ratio stays serial over streaming; the work after the endpoint has one too.
    assert set(report.ratio) == {"speech_stopped_ms", "final_transcript_ms", "first_text_ms",
                                 "first_audio_ms", "done_ms", "after_endpoint_ms"}
    assert report.ratio["first_audio_ms"] == {"p50": round(1500 / 600, 2),
                                              "p90": round(1660 / 700, 2)}
    assert report.ratio["after_endpoint_ms"] == {"p50": round(1250 / 350, 2),
                                                 "p90": round(1410 / 450, 2)}
    md = rep.markdown(report)
    assert ("- modes: streaming (cascade streaming pipeline, server_vad, 500 ms of silence), "
            "serial (cascade serial pipeline, server_vad, 500 ms of silence), semantic "
            "(cascade streaming pipeline, semantic_vad, eagerness auto)") in md
    assert ("| metric | streaming p50 | streaming p90 | streaming p99 | serial p50 "
            "| serial p90 | serial p99 | semantic p50 | semantic p90 | semantic p99 "
            "| serial / streaming (p50 / p90) |") in md
    # streaming 500/700 x 2, serial 1500/1700/1500 (one failed), semantic 300/500 x 2.
    assert ("| voice-to-voice (first audio) | 600 | 700 | 700 | 1500 | 1660 | 1696 | 400 "
            "| 500 | 500 | 2.50× / 2.37× |") in md
    assert ("| work after the endpoint (v2v - speech_stopped) | 350 | 450 | 450 | 1250 "
            "| 1410 | 1446 | 150 | 250 | 250 | 3.57× / 3.13× |") in md
    assert ("Work after the endpoint (v2v - speech_stopped), p50: streaming 350 ms, serial "
            "1250 ms; streaming / serial = 0.28 (target <= 0.35).") in md
    assert "| semantic | 4 | 4 | 0 | 0 | 1 |" in md
    assert ("| clip | streaming v2v p50 | streaming done p50 | streaming ended early "
            "| serial v2v p50 | serial done p50 | serial ended early | semantic v2v p50 "
            "| semantic done p50 | semantic ended early |") in md
    # Every turn counts for "ended early"; only replied ones for the latencies.
    assert "| pause | 700 | 1600 | 0/2 | 1700 | 2600 | 0/2 | 500 | 1400 | 1/2 |" in md
    console = Console(record=True, width=120)
    rep.print_summary(report, console)
    text = console.export_text()
    for needle in ("semantic p50 / p90", "serial/streaming", "600 / 700", "400 / 500",
                   "2.50× / 2.37×", "3/4", "Per clip: v2v p50 (ms)", "500 · 1/2",
                   "1700 · 0/2", "streaming / serial = 0.28"):
        assert needle in text, needle
    again = Report.model_validate_json(report.model_dump_json())
    assert again == report and again.config.mode_specs[2].turn_detection == "semantic_vad"


def test_no_ratio_without_both_pipelines() -> None:
    records = [turn("streaming", 500.0), turn("semantic", 300.0)]
    report = make_report(records=records, sweep=False)
    assert report.ratio == {}
    md = rep.markdown(report)
    assert "serial / streaming" not in md and "streaming / serial" not in md


def _speculating(mode: str, v2v: float, hit: bool | None,
                 totals: tuple[int, int, float] | None = None, *,
                 phase: Phase = "compare") -> TurnRecord:
    rec = turn(mode, v2v, phase=phase)
    rec.speculative_hit = hit
    if totals is not None:
        rec.speculations, rec.wasted_llm_tokens, rec.wasted_tts_ms = totals
    return rec


def speculation_report() -> Report:
    """streaming: hits at 400 and 500 ms, misses at 900 (a speculation thrown away) and
    1100 ms (none started), with the work totals; serial: an older server (hit flag only,
    two misses at 1500 ms); a conversation turn that hit at 700 ms."""
    records = [_speculating("streaming", 400.0, True, (1, 0, 0.0)),
               _speculating("streaming", 500.0, True, (2, 10, 200.0)),
               _speculating("streaming", 900.0, False, (1, 20, 400.0)),
               _speculating("streaming", 1100.0, False, (0, 0, 0.0)),
               _speculating("serial", 1500.0, False), _speculating("serial", 1500.0, False),
               _speculating("streaming", 700.0, True, (1, 3, 60.0), phase="conversation")]
    records[-1].turn_index, records[-1].connection_id = 1, "streaming-1"
    report = make_report(records=records, sweep=False)
    report.conversation = conversation_stats.summarize(records)
    return report


def test_speculation_hits_against_misses_and_wasted_work() -> None:
    report = speculation_report()
    streaming, serial = report.compare
    s = streaming.speculation
    assert s is not None
    assert (s.reported, s.hits, s.hit_rate, s.totals_reported) == (4, 2, 0.5, 4)
    assert (s.speculations_per_turn, s.wasted_llm_tokens_per_turn,
            s.wasted_tts_ms_per_turn) == (1.0, 7.5, 150.0)
    assert s.v2v_hit is not None and (s.v2v_hit.n, s.v2v_hit.p50, s.v2v_hit.p90) == (
        2, 450.0, 490.0)
    assert s.v2v_miss is not None and (s.v2v_miss.n, s.v2v_miss.p50, s.v2v_miss.p90) == (
        2, 1000.0, 1080.0)
    # An older server: the hit flag without the work totals.
    o = serial.speculation
    assert o is not None and (o.reported, o.hits, o.hit_rate, o.totals_reported) == (
        2, 0, 0.0, 0)
    assert (o.speculations_per_turn, o.wasted_llm_tokens_per_turn,
            o.wasted_tts_ms_per_turn, o.v2v_hit) == (None, None, None, None)
    assert o.v2v_miss is not None and o.v2v_miss.n == 2
    talk = report.conversation[0].speculation
    assert talk is not None and (talk.hits, talk.reported, talk.wasted_tts_ms_per_turn) == (
        1, 1, 60.0)
    md = rep.markdown(report)
    assert "## Speculation" in md
    assert ("| phase | mode | hits | started per turn | wasted LLM tokens per turn "
            "| wasted TTS ms per turn | v2v hits p50 / p90 | v2v misses p50 / p90 |") in md
    assert ("| compare | streaming | 2/4 (50 %) | 1 | 7.5 | 150 | 450 / 490 (n=2) "
            "| 1000 / 1080 (n=2) |") in md
    assert "| compare | serial | 0/2 (0 %) | n/a | n/a | n/a | – | 1500 / 1500 (n=2) |" in md
    assert ("| conversation | streaming | 1/1 (100 %) | 1 | 3 | 60 | 700 / 700 (n=1) | – |"
            in md)
    console = Console(record=True, width=120)
    rep.print_summary(report, console)
    text = console.export_text()
    for needle in ("Speculation (cascade.turn.timings", "2/4 (50 %)", "7.5", "450/490 (2)",
                   "1000/1080 (2)", "1500/1500 (2)", "700/700 (1)"):
        assert needle in text, needle
    raw = report.model_dump_json()
    assert '"hit_rate":0.5' in raw and '"wasted_llm_tokens":20' in raw
    assert Report.model_validate_json(raw) == report


def test_without_speculation_reports_it_says_so() -> None:
    report = make_report(sweep=False)
    assert all(g.speculation is None for g in report.compare)
    md = rep.markdown(report)
    assert "## Speculation" in md and "The server reported no speculation" in md
    console = Console(record=True, width=120)
    rep.print_summary(report, console)
    assert "Speculation" not in console.export_text()
