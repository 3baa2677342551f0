"""The Markdown summary, report.json and the terminal table of ``cascade bench``."""
# ruff: noqa: RUF001  (the report writes en dashes for missing numbers, times signs for ratios)

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from benchmarks.v2v import report as rep
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
    assert ("| clip | streaming v2v p50 | streaming done p50 | serial v2v p50 "
            "| serial done p50 |") in md
    assert "| long | 700 | 1600 | 2500 | 3400 |" in md
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
