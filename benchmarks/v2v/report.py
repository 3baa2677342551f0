"""Write a ``cascade bench`` report: report.json, a Markdown summary, PNG plots, and a
compact rich table for the terminal."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from benchmarks.v2v import plots
from benchmarks.v2v.conversation_stats import LONG_GAP_S
from benchmarks.v2v.modes import ModeSpec
from benchmarks.v2v.records import (
    DERIVED_METRICS,
    LATENCY_METRICS,
    REPLY_METRICS,
    ConversationSummary,
    GroupSummary,
    MetricStats,
    Report,
    SpeculationSummary,
    TurnRecord,
)
from benchmarks.v2v.stats import REALTIME_MAX_GAP_SHARE, metric_stats

REPORT_JSON = "report.json"
SUMMARY_MD = "summary.md"
MISSING = "–"  # noqa: RUF001 - an en dash marks a missing number
TIMES = "×"  # noqa: RUF001 - a multiplication sign after ratios

LABELS: dict[str, str] = {
    "speech_stopped_ms": "speech_stopped",
    "final_transcript_ms": "final transcript",
    "first_text_ms": "first reply text",
    "first_audio_ms": "voice-to-voice (first audio)",
    "done_ms": "response.done",
    "after_endpoint_ms": "work after the endpoint (v2v - speech_stopped)",
    "audio_after_text_ms": "first audio after first text (audio path)",
    "reply_audio_ms": "reply audio",
    "gap_total_ms": "gap total",
    "gap_max_ms": "longest gap",
    "gap_count": "gaps per turn",
}
# The rows of the compact terminal table.
TERMINAL_METRICS: tuple[str, ...] = (
    "speech_stopped_ms", "final_transcript_ms", "first_text_ms", "first_audio_ms", "done_ms",
    "after_endpoint_ms", "gap_total_ms",
)
# Shorter row labels where the terminal table needs them.
TERMINAL_LABELS: dict[str, str] = {"after_endpoint_ms": "work after the endpoint"}
NOT_AVAILABLE = "n/a"  # the server did not report it
# The work after the endpoint that streaming may leave, as a share of serial's (p50): the
# overlap's goal is that little is left to do once the endpoint comes.
AFTER_ENDPOINT_TARGET = 0.35
# The speculation table's columns, shorter for a 120-column terminal.
SPECULATION_TERMINAL_HEADER = ("phase", "mode", "hits", "started/turn", "wasted tokens/turn",
                               "wasted TTS ms/turn", "v2v hits p50/p90 (n)",
                               "v2v misses p50/p90 (n)")
MAX_FAILURE_LINES = 8  # failed conversation turns listed under the terminal tables
PLOT_TITLES: dict[str, str] = {
    plots.LATENCY_CDF: "Voice-to-voice latency CDF",
    plots.CONCURRENCY: "Concurrency sweep",
    plots.WATERFALL: "Per-turn stage waterfall",
    plots.CONVERSATION: "Voice-to-voice by turn of a conversation",
}
TRANSPORT_NAMES: dict[str, str] = {"ws": "WebSocket", "webrtc": "WebRTC"}


# --- formatting --------------------------------------------------------------------------

def fmt_ms(value: float | None) -> str:
    """Milliseconds with no decimals; ``MISSING`` when missing."""
    return MISSING if value is None else str(round(value))


def fmt_value(metric: str, value: float | None) -> str:
    if value is None:
        return MISSING
    if metric == "gap_count":
        return f"{value:.1f}".removesuffix(".0")
    return fmt_ms(value)


def fmt_ratio(ratio: dict[str, float] | None) -> str:
    if not ratio:
        return MISSING
    return " / ".join(f"{ratio[q]:.2f}{TIMES}" if q in ratio else MISSING for q in ("p50", "p90"))


def _stat(g: GroupSummary, metric: str, q: str) -> float | None:
    stats: MetricStats | None = g.metrics.get(metric)
    return None if stats is None else float(getattr(stats, q))


def several_transports(report: Report) -> bool:
    return len({g.transport for g in report.compare}) > 1


def group_label(report: Report, g: GroupSummary) -> str:
    """The group's mode, with its transport when the compare phase used several."""
    return f"{g.mode} {g.transport}" if several_transports(report) else g.mode


def _share(g: GroupSummary) -> str:
    return MISSING if not g.turns else f"{100 * g.gap_turns / g.turns:.0f} %"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)]


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def fmt_hits(hits: int, reported: int) -> str:
    """Speculation hits over the turns the server reported on; n/a when it reported none."""
    if not reported:
        return NOT_AVAILABLE
    return f"{hits}/{reported} ({100 * hits / reported:.0f} %)"


def _speculation(records: Iterable[TurnRecord]) -> str:
    reported = [r.speculative_hit for r in records if r.speculative_hit is not None]
    return fmt_hits(sum(reported), len(reported))


def _ratio_header(report: Report) -> str | None:
    return "serial / streaming (p50 / p90)" if report.ratio else None


def limit_sentence(report: Report, mode: str) -> str:
    levels = sorted({g.concurrency for g in report.sweep if g.mode == mode})
    limit = report.realtime_limit.get(mode)
    if limit is None:
        first = f" ({plural(levels[0], 'simultaneous session')})" if levels else ""
        return f"{mode}: not real-time even at the first level{first}."
    top = " (the highest level tried)" if levels and limit == levels[-1] else ""
    return (f"{mode}: replies stay real-time up to {plural(limit, 'simultaneous session')}"
            f"{top}.")


# --- Markdown ----------------------------------------------------------------------------

def _machine(report: Report) -> list[str]:
    m = report.machine
    return ["## Machine", "",
            f"- date: {m.date}",
            f"- CPU: {m.cpu} ({m.cores} cores)",
            f"- memory: {m.memory_gib:.1f} GiB",
            f"- platform: {m.platform}, Python {m.python}",
            f"- commit: {m.commit or MISSING}", ""]


def _config(report: Report) -> list[str]:
    c = report.config
    server = "`cascade serve` started by the bench" if c.embedded else "external server"
    sweep = ", ".join(map(str, c.concurrency)) or "none"
    lines = ["## Configuration", "",
             f"- target: `{c.target}` ({server})",
             f"- modes: {_modes_text(c.modes, c.mode_specs)}",
             f"- transports (compare phase): "
             f"{', '.join(TRANSPORT_NAMES.get(t, t) for t in c.transports)}"
             + (f" (WebRTC calls: `{c.calls_url}`)" if c.calls_url else ""),
             f"- rounds: {c.rounds} per mode and clip",
             f"- concurrency sweep: {sweep}"
             + (f" ({plural(c.sweep_rounds, 'round')} per session)" if c.concurrency else ""),
             f"- conversations: {plural(c.conversation_rounds, 'connection')} per mode x "
             f"{plural(c.conversation_turns, 'turn')}, silences before turns 2, 3, ...: "
             f"{_gaps_text(c.conversation_gaps_s)}" if c.conversation_turns
             else "- conversations: none",
             f"- gap threshold: {fmt_ms(c.gap_threshold_ms)} ms",
             f"- silence before each clip: {fmt_ms(c.lead_ms)} ms (then silence until the "
             "reply is done, like an open microphone)"]
    if report.wall_s:
        lines.append(f"- wall time: {report.wall_s:.0f} s")
    lines.append("")
    if c.clips:
        rows = [(clip.name, clip.text or MISSING, f"{fmt_ms(clip.speech_end_ms)} ms",
                 f"{fmt_ms(clip.duration_ms)} ms") for clip in c.clips]
        lines += ["Clips:", "", *_table(("clip", "text", "speech (to last voiced sample)",
                                         "file length"), rows), ""]
    return lines


def mode_text(spec: ModeSpec) -> str:
    """What a mode sent, in words: its pipeline and turn detection."""
    pipeline = (f"cascade {spec.pipeline} pipeline" if spec.pipeline
                else "standard events only")
    detection = spec.turn_detection_config()
    rule = (f"semantic_vad, eagerness {detection['eagerness']}"
            if detection["type"] == "semantic_vad"
            else f"server_vad, {detection['silence_duration_ms']} ms of silence")
    return f"{pipeline}, {rule}"


def _modes_text(modes: Sequence[str], specs: Sequence[ModeSpec]) -> str:
    by_name = {s.name: s for s in specs}
    return ", ".join(f"{m} ({mode_text(by_name[m])})" if m in by_name else m
                     for m in modes) or MISSING


def after_endpoint_sentence(report: Report) -> str | None:
    """The work after the endpoint of streaming against serial (p50), as the share the
    overlap leaves (target: at most AFTER_ENDPOINT_TARGET of serial's)."""
    first = report.compare[0].transport if report.compare else "ws"
    by_mode = {g.mode: g for g in report.compare if g.transport == first}
    if "streaming" not in by_mode or "serial" not in by_mode:
        return None
    fast = _stat(by_mode["streaming"], "after_endpoint_ms", "p50")
    slow = _stat(by_mode["serial"], "after_endpoint_ms", "p50")
    if fast is None or slow is None or slow <= 0:
        return None
    return (f"Work after the endpoint (v2v - speech_stopped), p50: streaming {fmt_ms(fast)} "
            f"ms, serial {fmt_ms(slow)} ms; streaming / serial = {fast / slow:.2f} "
            f"(target <= {AFTER_ENDPOINT_TARGET:.2f}).")


def _compare_section(report: Report) -> list[str]:
    groups = report.compare
    modes = [g.mode for g in groups]
    labels = [group_label(report, g) for g in groups]
    title = "Streaming vs serial" if {"streaming", "serial"} <= set(modes) else "Latency"
    lines = [f"## {title}", ""]
    if not groups:
        return [*lines, "No compare-phase turns were recorded.", ""]
    lines += ["Milliseconds after end of speech (reply metrics: ms, gaps: count per turn).", ""]
    if several_transports(report):
        lines += [f"The serial / streaming ratio is over the "
                  f"{TRANSPORT_NAMES.get(groups[0].transport, groups[0].transport)} turns.", ""]
    ratio_header = _ratio_header(report)
    header = ["metric"] + [f"{m} {q}" for m in labels for q in ("p50", "p90", "p99")]
    if ratio_header:
        header.append(ratio_header)
    rows: list[list[str]] = []
    for metric in LATENCY_METRICS + DERIVED_METRICS + REPLY_METRICS:
        if not any(metric in g.metrics for g in groups):
            continue
        row = [LABELS[metric]] + [fmt_value(metric, _stat(g, metric, q))
                                  for g in groups for q in ("p50", "p90", "p99")]
        if ratio_header:
            row.append(fmt_ratio(report.ratio.get(metric)))
        rows.append(row)
    lines += [*_table(header, rows), ""]
    sentence = after_endpoint_sentence(report)
    if sentence:
        lines += [sentence, ""]
    if len(set(modes)) < 2:
        lines += ["Only one mode was measured, so there is no comparison.", ""]
    counts = [(group_label(report, g), str(g.turns), str(g.replied), str(g.errors),
               str(g.gap_turns), str(g.early_endpoints),
               MISSING if g.wer_mean is None else f"{100 * g.wer_mean:.1f} %",
               _speculation(r for r in report.records if r.phase == "compare"
                            and (r.mode, r.transport) == (g.mode, g.transport)))
              for g in groups]
    lines += [*_table(("mode", "turns", "replied", "errors", "turns with gaps",
                       "ended early", "transcript WER", "speculation hits"), counts), ""]
    return [*lines, *_per_clip(report)]


def _clip_cells(report: Report, clip: str, g: GroupSummary) -> tuple[str, str, str]:
    """(v2v p50, done p50, ended early) of one clip in one group. *Ended early* counts
    every turn of the clip (the server's speech_stopped came before the clip's end of
    speech, e.g. in the planted pause), replied or not."""
    mine = [r for r in report.records if r.phase == "compare" and r.clip == clip
            and (r.mode, r.transport) == (g.mode, g.transport)]
    if not mine:
        return MISSING, MISSING, MISSING
    replied = [r for r in mine if r.replied]
    v2v = metric_stats(r.first_audio_ms for r in replied if r.first_audio_ms is not None)
    done = metric_stats(r.done_ms for r in replied if r.done_ms is not None)
    early = sum(r.early_endpoint for r in mine)
    return (fmt_ms(v2v.p50 if v2v else None), fmt_ms(done.p50 if done else None),
            f"{early}/{len(mine)}")


def _clips(report: Report) -> list[str]:
    """The compare phase's clips, in first-seen order (none unless there are several)."""
    clips = list(dict.fromkeys(r.clip for r in report.records if r.phase == "compare"))
    return clips if len(clips) > 1 else []


def _per_clip(report: Report) -> list[str]:
    """v2v, reply end and early endpoints per clip and mode: short questions and long
    turns differ, and a turn detection is judged on the clip with the pause."""
    clips = _clips(report)
    if not clips:
        return []
    groups = report.compare
    rows = [[clip, *(c for g in groups for c in _clip_cells(report, clip, g))]
            for clip in clips]
    header = ["clip"] + [f"{group_label(report, g)} {what}" for g in groups
                         for what in ("v2v p50", "done p50", "ended early")]
    return ["Per clip (*ended early*: turns the server ended before the clip's end of "
            "speech):", "", *_table(header, rows), ""]


TRANSPORT_HEADER = ("mode", "WebSocket v2v p50", "WebSocket v2v p90", "WebRTC v2v p50",
                    "WebRTC v2v p90", "WebRTC - WebSocket p50",
                    "speech_stopped p50 (ws / webrtc)", "audio after text p50 (ws / webrtc)",
                    "replied (ws / webrtc)", "gap turns (ws / webrtc)")


def _delta(a: float | None, b: float | None) -> str:
    return MISSING if a is None or b is None else f"{b - a:+.0f}"


def _transport_rows(report: Report) -> list[tuple[str, ...]]:
    """Per mode: v2v over the WebSocket and over WebRTC side by side (compare phase)."""
    if not several_transports(report):
        return []
    by_key = {(g.transport, g.mode): g for g in report.compare}
    rows: list[tuple[str, ...]] = []
    for mode in dict.fromkeys(g.mode for g in report.compare):
        pair = (by_key.get(("ws", mode)), by_key.get(("webrtc", mode)))
        ws50, ws90, rtc50, rtc90 = (None if g is None else _stat(g, "first_audio_ms", q)
                                    for g in pair for q in ("p50", "p90"))

        def both(text: Callable[[GroupSummary], str],
                 pair: tuple[GroupSummary | None, ...] = pair) -> str:
            return " / ".join(MISSING if g is None else text(g) for g in pair)

        rows.append((mode, fmt_ms(ws50), fmt_ms(ws90), fmt_ms(rtc50), fmt_ms(rtc90),
                     _delta(ws50, rtc50),
                     both(lambda g: fmt_ms(_stat(g, "speech_stopped_ms", "p50"))),
                     both(lambda g: fmt_ms(_stat(g, "audio_after_text_ms", "p50"))),
                     both(lambda g: f"{g.replied}/{g.turns}"), both(lambda g: str(g.gap_turns))))
    return rows


def _transport_section(report: Report) -> list[str]:
    rows = _transport_rows(report)
    if not rows:
        return []
    return ["## WebSocket vs WebRTC", "",
            "The same clips, modes and rounds over both transports, turns interleaved "
            "(compare phase). Voice-to-voice, ms after end of speech. Over WebRTC the reply "
            "is heard on the received audio track: v2v is the first audible frame after the "
            "reply started, so it includes Opus encode/decode and the receiver's jitter "
            "buffer (aiortc: a fixed 80 ms); gaps are silence the server's track sent inside "
            "the reply. Where the transports differ, within each turn: the way in "
            "(*speech_stopped*: the server's VAD hears the audio after Opus and its own "
            "receive buffer) and the way out (*audio after text*: first audio minus first "
            "reply text, which a server sends together with it); these hold on a busy "
            "machine, where the LLM's time swings the absolute numbers.", "",
            *_table(TRANSPORT_HEADER, rows), ""]


def _stats_cell(stats: MetricStats | None, q: str) -> str:
    return fmt_ms(None if stats is None else float(getattr(stats, q)))


def _long_gap_cell(c: ConversationSummary) -> str:
    if not c.long_gap_turns:
        return MISSING
    if not c.long_gap_replied:
        return f"no reply (0/{c.long_gap_turns})"
    cell = _stats_cell(c.after_long_gap, "p50")
    if c.long_gap_replied < c.long_gap_turns:
        cell += f" ({c.long_gap_replied}/{c.long_gap_turns} replied)"
    return cell


def _conversation_rows(report: Report) -> list[tuple[str, ...]]:
    return [(c.mode, f"{c.replied}/{c.turns}", str(c.failed),
             _stats_cell(c.first_turn, "p50"), _stats_cell(c.first_turn, "p90"),
             _stats_cell(c.later_turns, "p50"), _stats_cell(c.later_turns, "p90"),
             _long_gap_cell(c), fmt_hits(c.speculative_hits, c.speculative_reported),
             _stats_cell(c.after_endpoint, "p50"))
            for c in report.conversation]


CONVERSATION_HEADER = ("mode", "replied", "failed", "turn 1 p50", "turn 1 p90",
                       "later turns p50", "later turns p90",
                       f"after a gap >= {LONG_GAP_S:.0f} s", "speculation hits",
                       "after endpoint p50")
# The same numbers, narrow enough for a 120-column terminal (p50 / p90 in one cell).
CONVERSATION_TERMINAL_HEADER = ("mode", "replied", "failed", "turn 1 p50 / p90",
                                "later turns p50 / p90", f"after a {LONG_GAP_S:.0f} s+ gap",
                                "speculation hits", "after endpoint p50")


def _terminal_conversation_row(row: tuple[str, ...]) -> tuple[str, ...]:
    mode, replied, failed, first50, first90, later50, later90, *rest = row
    return (mode, replied, failed, f"{first50} / {first90}", f"{later50} / {later90}", *rest)


def _gaps_text(gaps: Sequence[float]) -> str:
    return ", ".join(f"{g:g}" for g in gaps) + " s" if gaps else MISSING


def _turn_cell(report: Report, mode: str, index: int) -> str:
    c = next((c for c in report.conversation if c.mode == mode), None)
    row = None if c is None else next((t for t in c.by_turn if t.turn_index == index), None)
    if row is None:
        return MISSING
    if not row.replied:
        return "no reply"
    cell = fmt_ms(row.v2v_p50)
    return cell if row.replied == row.turns else f"{cell} ({row.replied}/{row.turns})"


def _silence_before(report: Report, index: int) -> str:
    gaps = [t.gap_before_s for c in report.conversation for t in c.by_turn
            if t.turn_index == index and t.gap_before_s is not None]
    return f"{max(gaps):.1f} s" if gaps else MISSING


def _conversation_failures(report: Report) -> list[str]:
    lines = []
    for r in report.records:
        if r.phase != "conversation" or r.replied:
            continue
        gap = "" if r.gap_before_s is None else f", after {r.gap_before_s:.0f} s of silence"
        line = (f"- {r.mode} {r.connection_id} turn {r.turn_index} ({r.clip}{gap}): "
                f"{r.error or 'no spoken reply'}")
        if r.gap_errors:
            line += (f"; {plural(r.gap_errors, 'error event')} during the silence before it"
                     f" (first: {r.gap_error})")
        lines.append(line)
    return lines


def _conversation_section(report: Report) -> list[str]:
    if not report.conversation:
        return []
    c = report.config
    modes = [s.mode for s in report.conversation]
    indexes = sorted({t.turn_index for s in report.conversation for t in s.by_turn})
    by_turn = [[str(i), _silence_before(report, i), *(_turn_cell(report, m, i) for m in modes)]
               for i in indexes]
    failures = _conversation_failures(report)
    return ["## Conversations", "",
            f"{plural(c.conversation_rounds, 'connection')} per mode, "
            f"{plural(c.conversation_turns, 'user turn')} on each; between turns the client "
            "keeps streaming silence in real time, like an open microphone "
            f"({_gaps_text(c.conversation_gaps_s)} before turns 2, 3, ...). Voice-to-voice, "
            "ms after end of speech; turn 1 is the connection's first turn. A turn without "
            "a spoken reply is a failure, with the server's reason below. *speculation "
            "hits*: replies the server started speculatively and kept "
            "(`cascade.turn.timings`; n/a: not reported). *after endpoint*: v2v minus the "
            "client-seen `speech_stopped`, the server's work after it decided the turn "
            "was over.", "",
            *_table(CONVERSATION_HEADER, _conversation_rows(report)), "",
            "By turn (v2v p50, ms; *no reply*: the turn failed):", "",
            *_table(["turn", "silence before", *modes], by_turn), "",
            *(["Failed turns:", "", *failures, ""] if failures else [])]


def _sweep_section(report: Report) -> list[str]:
    if not report.sweep:
        return []
    rows = [(g.mode, str(g.concurrency), str(g.turns), str(g.replied),
             fmt_ms(_stat(g, "first_audio_ms", "p50")), fmt_ms(_stat(g, "first_audio_ms", "p90")),
             _share(g), fmt_ms(_stat(g, "gap_total_ms", "p90")), "yes" if g.realtime else "no")
            for g in report.sweep]
    header = ("mode", "sessions", "turns", "replied", "v2v p50", "v2v p90", "turns with gaps",
              "gap total p90", "real-time")
    modes = list(dict.fromkeys(g.mode for g in report.sweep))
    return ["## Concurrency sweep", "", *_table(header, rows), "",
            *[f"- {limit_sentence(report, m)}" for m in modes], ""]


def _barge_in_rows(report: Report) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for g in report.barge_in:
        recs = [r for r in report.records if r.phase == "barge_in" and r.mode == g.mode]
        truncated = sum(bool(r.truncated) for r in recs)
        by_client = sum(bool(r.truncated and r.client_truncate) for r in recs)
        rows.append((g.mode, f"{g.turns - g.errors}/{g.turns}",
                     fmt_ms(_stat(g, "barge_in_ms", "p50")), fmt_ms(_stat(g, "barge_in_ms", "p90")),
                     fmt_ms(_stat(g, "barge_in_cancel_ms", "p50")),
                     fmt_ms(_stat(g, "barge_in_cancel_ms", "p90")),
                     fmt_ms(_stat(g, "barge_in_audio_after_ms", "p50")),
                     f"{truncated}/{len(recs)}"
                     + (f" ({by_client} asked by the client)" if by_client else "")))
    return rows


BARGE_IN_HEADER = ("mode", "interrupted", "noticed p50", "noticed p90", "cancelled p50",
                   "cancelled p90", "audio after p50", "truncated")


def _barge_in_section(report: Report) -> list[str]:
    if not report.barge_in:
        return []
    errors = [r.error for r in report.records if r.phase == "barge_in" and r.error]
    return ["## Barge-in", "",
            "The user talks over the reply 1 s into it. Milliseconds from the first voiced "
            "frame of the interruption: *noticed* = `input_audio_buffer.speech_started` (a "
            "client stops playback there), *cancelled* = the interrupted reply's "
            "`response.done`; *audio after* = reply audio still received after "
            "speech_started (sent, then thrown away); *truncated* = the assistant item was "
            "cut to what was heard (`conversation.item.truncated`): by the server when it "
            "cancels, or at the client's `conversation.item.truncate` when the server had "
            "already sent the whole reply (no cancel time then).", "",
            *_table(BARGE_IN_HEADER, _barge_in_rows(report)), "",
            *([f"Failures: {'; '.join(sorted(set(errors)))}.", ""] if errors else [])]


def _v2v_cell(stats: MetricStats | None) -> str:
    if stats is None:
        return MISSING
    return f"{fmt_ms(stats.p50)} / {fmt_ms(stats.p90)} (n={stats.n})"


def _mean_cell(value: float | None, ms: bool = False) -> str:
    if value is None:
        return NOT_AVAILABLE
    return fmt_ms(value) if ms else f"{value:.1f}".removesuffix(".0")


V2vCell = Callable[[MetricStats | None], str]


def _speculation_cells(s: SpeculationSummary | None, v2v: V2vCell) -> tuple[str, ...]:
    if s is None:
        return (NOT_AVAILABLE,) * 6
    return (fmt_hits(s.hits, s.reported), _mean_cell(s.speculations_per_turn),
            _mean_cell(s.wasted_llm_tokens_per_turn), _mean_cell(s.wasted_tts_ms_per_turn, True),
            v2v(s.v2v_hit), v2v(s.v2v_miss))


SPECULATION_HEADER = ("phase", "mode", "hits", "started per turn", "wasted LLM tokens per turn",
                      "wasted TTS ms per turn", "v2v hits p50 / p90", "v2v misses p50 / p90")


def speculation_rows(report: Report, v2v: V2vCell = _v2v_cell) -> list[tuple[str, ...]]:
    """Per compare group and per conversation mode: what speculation did."""
    rows = [("compare", group_label(report, g), *_speculation_cells(g.speculation, v2v))
            for g in report.compare]
    rows += [("conversation", c.mode, *_speculation_cells(c.speculation, v2v))
             for c in report.conversation]
    return rows


def _any_speculation(report: Report) -> bool:
    return any(g.speculation is not None for g in report.compare) or any(
        c.speculation is not None for c in report.conversation)


def _speculation_section(report: Report) -> list[str]:
    if not report.compare and not report.conversation:
        return []
    lines = ["## Speculation", ""]
    if not _any_speculation(report):
        return [*lines, "The server reported no speculation (`cascade.turn.timings` not "
                "sent: not cascade, or a mode with standard events only).", ""]
    return [*lines,
            "From cascade's `cascade.turn.timings`, per mode. *hits*: replies that were the "
            "speculative one, over the turns that said; *started per turn*: speculative "
            "replies started during the user turn (cancelled ones included); *wasted*: the "
            "LLM tokens and the TTS audio of the discarded ones, mean per turn (n/a: an "
            "older server that does not report them); v2v of the turns whose reply was a "
            "speculative hit against the others (misses: a discarded speculation or none "
            "started), ms after end of speech, n turns each.", "",
            *_table(SPECULATION_HEADER, speculation_rows(report)), ""]


def _how_to_read() -> list[str]:
    share = f"{REALTIME_MAX_GAP_SHARE:.0%}".replace("%", " %")
    return [
        "## How to read this", "",
        "- **EoS** (end of speech) is the moment the client sent the 20 ms audio frame that "
        "holds the clip's last voiced sample. Every latency is measured from it.",
        "- **voice-to-voice (v2v)** = first reply audio received - EoS. Over WebRTC, EoS is "
        "the moment that frame was handed to the outbound audio track, and the first reply "
        "audio is the first audible frame the received track delivers (after Opus and the "
        "jitter buffer), i.e. what a WebRTC listener hears.",
        "- **speech_stopped** delay is the server's endpointing: how long it took to decide "
        "the user had finished (negative: it cut in before the real end of speech).",
        "- **gaps**: moments playback would run dry. The simulated client starts playing on "
        "the first audio chunk and plays in real time; whenever the next chunk is late, the "
        "listener hears silence. Over WebRTC the server's track paces the audio itself: a "
        "gap is silence it sent (its buffer ran dry) or frames that never came, inside the "
        "reply.",
        f"- **real-time**: every turn got a reply and at most {share} of turns had a gap.",
        "- **work after the endpoint** = v2v - speech_stopped: what the server spends once "
        "it has decided the user finished (final transcript, LLM first token, first phrase "
        "of speech); the endpoint itself is the speech_stopped delay.",
        "- **modes**: streaming and serial are cascade's two pipelines with server_vad "
        "(500 ms of silence ends the turn); semantic is the streaming pipeline with "
        "semantic_vad (an end-of-turn model may end the turn after a shorter pause, or wait "
        "longer when the sentence sounds unfinished); it changes the endpoint, not the "
        "pipeline, so the ratio column stays serial over streaming. *ended "
        "early*: the server's speech_stopped came before the clip's real end of speech "
        "(the pause clip holds a 400 ms mid-sentence pause).",
        "- **speculation**: a reply started on the transcript so far, before the endpoint; "
        "a hit is released at the endpoint when the final transcript matches, a miss is "
        "thrown away (its tokens and audio are the *wasted* work).",
        "- **conversations**: turn 1 is a connection's first turn; later turns come after "
        f"gaps of streamed silence (\"after a gap >= {LONG_GAP_S:.0f} s\": the turn right "
        "after a silence longer than a minute). Failed turns stay in the counts.",
        "",
    ]


def _plots_section(images: Sequence[str]) -> list[str]:
    if not images:
        return []
    lines = ["## Plots", ""]
    for name in images:
        lines += [f"![{PLOT_TITLES.get(name, name)}]({name})", ""]
    return lines


def markdown(report: Report, images: Sequence[str] | None = None) -> str:
    """The Markdown summary. ``images``: PNG file names to link (default: every plot that
    ``plots.write_plots`` writes for this report)."""
    if images is None:
        images = plots.planned(report)
    lines = ["# cascade bench: voice-to-voice latency", "",
             *_machine(report), *_config(report), *_compare_section(report),
             *_transport_section(report),
             *_conversation_section(report), *_speculation_section(report),
             *_barge_in_section(report),
             *_sweep_section(report), *_how_to_read(), *_plots_section(images)]
    return "\n".join(lines).rstrip() + "\n"


# --- terminal ----------------------------------------------------------------------------

def _latency_table(report: Report) -> Table:
    """p50 and p90 per group and metric, and the serial / streaming ratio. With more than
    two groups (a third mode, two transports) each group's p50 / p90 share a cell, so the
    table still fits 120 columns."""
    groups = report.compare
    joined = len(groups) > 2
    latency = Table(title="Latency after end of speech (ms)", title_justify="left")
    latency.add_column("metric")
    for g in groups:
        for q in ("p50 / p90",) if joined else ("p50", "p90"):
            latency.add_column(escape(f"{group_label(report, g)} {q}"), justify="right")
    if report.ratio:
        latency.add_column("serial/streaming", justify="right")
    for metric in TERMINAL_METRICS:
        if not any(metric in g.metrics for g in groups):
            continue
        pairs = [(fmt_value(metric, _stat(g, metric, "p50")),
                  fmt_value(metric, _stat(g, metric, "p90"))) for g in groups]
        cells = ([f"{a} / {b}" for a, b in pairs] if joined
                 else [c for pair in pairs for c in pair])
        if report.ratio:
            cells.append(fmt_ratio(report.ratio.get(metric)))
        label = TERMINAL_LABELS.get(metric, LABELS[metric])
        if metric == "first_audio_ms":
            label, cells = f"[bold]{label}[/bold]", [f"[bold]{c}[/bold]" for c in cells]
        latency.add_row(label, *cells)
    replied = [f"{g.replied}/{g.turns}" for g in groups]
    latency.add_row("replied / turns",
                    *(replied if joined else [c for r in replied for c in (r, "")]),
                    *([""] if report.ratio else []))
    return latency


def _terminal_v2v(stats: MetricStats | None) -> str:
    if stats is None:
        return MISSING
    return f"{fmt_ms(stats.p50)}/{fmt_ms(stats.p90)} ({stats.n})"


def terminal_table(report: Report) -> list[Table]:
    """A compact latency table per mode (p50/p90, ratio) and, with a sweep, a sweep table."""
    tables: list[Table] = []
    groups = report.compare
    if groups:
        tables.append(_latency_table(report))
        clips = _clips(report)
        if clips:
            per_clip = Table(title="Per clip: v2v p50 (ms) · turns ended early",
                             title_justify="left")
            per_clip.add_column("clip")
            for g in groups:
                per_clip.add_column(escape(group_label(report, g)), justify="right")
            for clip in clips:
                by_group = [_clip_cells(report, clip, g) for g in groups]
                per_clip.add_row(escape(clip),
                                 *(f"{v2v} · {early}" for v2v, _, early in by_group))
            tables.append(per_clip)
    transport_rows = _transport_rows(report)
    if transport_rows:
        side = Table(title="WebSocket vs WebRTC: voice-to-voice (ms after end of speech)",
                     title_justify="left")
        for name in TRANSPORT_HEADER:
            side.add_column(escape(name), justify="left" if name == "mode" else "right")
        for row in transport_rows:
            side.add_row(*(escape(c) for c in row))
        tables.append(side)
    if report.conversation:
        talk = Table(title="Conversation: voice-to-voice by turn (ms after end of speech)",
                     title_justify="left")
        for name in CONVERSATION_TERMINAL_HEADER:
            talk.add_column(escape(name), justify="left" if name == "mode" else "right")
        for row, summary in zip(_conversation_rows(report), report.conversation, strict=True):
            cells = [escape(c) for c in _terminal_conversation_row(row)]
            if summary.failed:
                cells[2] = f"[red]{cells[2]}[/red]"
            talk.add_row(*cells)
        tables.append(talk)
    if _any_speculation(report):
        spec = Table(title="Speculation (cascade.turn.timings; v2v in ms after end of speech)",
                     title_justify="left")
        for name in SPECULATION_TERMINAL_HEADER:
            spec.add_column(escape(name), justify="left" if name in ("phase", "mode")
                            else "right")
        for row in speculation_rows(report, _terminal_v2v):
            spec.add_row(*(escape(c) for c in row))
        tables.append(spec)
    if report.barge_in:
        barge = Table(title="Barge-in (ms from the interrupting speech)", title_justify="left")
        for name in BARGE_IN_HEADER:
            barge.add_column(name, justify="left" if name == "mode" else "right")
        for row in _barge_in_rows(report):
            barge.add_row(*(escape(c) for c in row))
        tables.append(barge)
    if report.sweep:
        sweep = Table(title="Concurrency sweep", title_justify="left")
        for name in ("mode", "sessions", "replied", "v2v p50", "v2v p90", "gap turns",
                     "gap p90", "real-time"):
            sweep.add_column(name, justify="left" if name == "mode" else "right")
        for g in report.sweep:
            sweep.add_row(escape(g.mode), str(g.concurrency), f"{g.replied}/{g.turns}",
                          fmt_ms(_stat(g, "first_audio_ms", "p50")),
                          fmt_ms(_stat(g, "first_audio_ms", "p90")), _share(g),
                          fmt_ms(_stat(g, "gap_total_ms", "p90")),
                          "[green]yes[/green]" if g.realtime else "[red]no[/red]")
        tables.append(sweep)
    return tables


def print_summary(report: Report, console: Console | None = None) -> None:
    """Print the terminal tables (the caller prints the real-time limit and file paths)."""
    console = console or Console()
    for table in terminal_table(report):
        console.print(table)
    sentence = after_endpoint_sentence(report)
    if sentence:
        console.print(escape(sentence))
    failures = _conversation_failures(report)
    for line in failures[:MAX_FAILURE_LINES]:
        console.print(f"[red]{escape(line)}[/red]")
    if len(failures) > MAX_FAILURE_LINES:
        console.print(f"[red]... {len(failures) - MAX_FAILURE_LINES} more in summary.md[/red]")


# --- files -------------------------------------------------------------------------------

def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    """Write report.json, the PNG plots and summary.md into ``out_dir`` (created).

    Returns file name -> path of every file written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / REPORT_JSON
    json_path.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    written = {REPORT_JSON: json_path}
    images = plots.write_plots(report, out_dir)
    written.update(images)
    md_path = out_dir / SUMMARY_MD
    md_path.write_text(markdown(report, list(images)), encoding="utf-8")
    written[SUMMARY_MD] = md_path
    return written
