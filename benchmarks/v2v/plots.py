"""PNG plots of a ``cascade bench`` report.

Only matplotlib's object API is used (``Figure`` + ``FigureCanvasAgg``), never pyplot's
global state, so plotting is headless and safe to call from any thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from benchmarks.v2v.records import GroupSummary, Report, TurnRecord
from benchmarks.v2v.stats import percentile

LATENCY_CDF = "latency_cdf.png"
CONCURRENCY = "concurrency.png"
WATERFALL = "waterfall.png"
CONVERSATION = "conversation.png"

WATERFALL_MAX_ROWS = 24
# Waterfall segments: (label, record field that ends the segment), starting at EoS.
STAGES: tuple[tuple[str, str], ...] = (
    ("EoS → speech_stopped", "speech_stopped_ms"),
    ("→ final transcript", "final_transcript_ms"),
    ("→ first reply text", "first_text_ms"),
    ("→ first reply audio", "first_audio_ms"),
)
STAGE_COLORS = ("#9ecae1", "#4292c6", "#fdae6b", "#e6550d")
PLAYING_COLOR = "#74c476"
PLAYING_LABEL = "reply audio playing"
GAP_COLOR = "#d62728"
GAP_LABEL = "gap: playback ran dry"
SERVER_MARKERS = ("v", "^", "D", "s", "P", "X", "*")
DPI = 110


def _mode_colors(modes: Sequence[str]) -> dict[str, str]:
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
    return {m: palette[i % len(palette)] for i, m in enumerate(modes)}


def _modes(report: Report, records: Sequence[TurnRecord]) -> list[str]:
    seen = [m for m in report.config.modes if any(r.mode == m for r in records)]
    return seen + [m for m in dict.fromkeys(r.mode for r in records) if m not in seen]


def _compare(report: Report) -> list[TurnRecord]:
    return [r for r in report.records if r.phase == "compare"]


def _series(records: Sequence[TurnRecord], modes: Sequence[str]
            ) -> list[tuple[str, list[TurnRecord]]]:
    """(label, records) per mode, or per mode and transport when there are several."""
    transports = list(dict.fromkeys(r.transport for r in records))
    if len(transports) < 2:
        return [(m, [r for r in records if r.mode == m]) for m in modes]
    return [(f"{m} {t}", [r for r in records if (r.mode, r.transport) == (m, t)])
            for t in transports for m in modes]


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # attaches itself to the figure
    fig.savefig(path, dpi=DPI)
    return path


# --- latency CDF -------------------------------------------------------------------------

def _cdf_data(report: Report) -> dict[str, dict[str, list[float]]]:
    """series (mode, or mode and transport) -> metric -> sorted values (replied compare
    turns), series with any v2v only."""
    compare = _compare(report)
    out: dict[str, dict[str, list[float]]] = {}
    for label, mine in _series(compare, _modes(report, compare)):
        replied = [r for r in mine if r.replied]
        v2v = sorted(r.first_audio_ms for r in replied if r.first_audio_ms is not None)
        if not v2v:
            continue
        stopped = sorted(r.speech_stopped_ms for r in replied if r.speech_stopped_ms is not None)
        out[label] = {"first_audio_ms": v2v, "speech_stopped_ms": stopped}
    return out


def _step(ax: Axes, values: list[float], **kwargs: object) -> None:
    ys = [(i + 1) / len(values) for i in range(len(values))]
    ax.step([values[0], *values], [0.0, *ys], where="post", **kwargs)  # type: ignore[arg-type]


def latency_cdf(report: Report) -> Figure | None:
    data = _cdf_data(report)
    if not data:
        return None
    colors = _mode_colors(list(data))
    fig = Figure(figsize=(8, 4.8))
    ax = fig.add_subplot()
    for mode, series in data.items():
        v2v = series["first_audio_ms"]
        _step(ax, v2v, color=colors[mode], linewidth=2,
              label=f"{mode} voice-to-voice (p50 {percentile(v2v, 50):.0f} ms)")
        stopped = series["speech_stopped_ms"]
        if stopped:
            _step(ax, stopped, color=colors[mode], linestyle="--", linewidth=1.2,
                  label=f"{mode} speech_stopped (p50 {percentile(stopped, 50):.0f} ms)")
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_ylim(0, 1)
    ax.set_xlabel("ms after end of speech (EoS)")
    ax.set_ylabel("share of replied turns")
    ax.set_title("Voice-to-voice latency, empirical CDF (compare phase)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig


# --- concurrency sweep -------------------------------------------------------------------

def _metric(g: GroupSummary, name: str, q: str) -> float:
    stats = g.metrics.get(name)
    return math.nan if stats is None else float(getattr(stats, q))


def _level_axis(ax: Axes, levels: list[int]) -> None:
    if len(levels) >= 3 and levels[0] >= 1 and levels[-1] / levels[0] >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.set_xticks([], minor=True)


def concurrency(report: Report) -> Figure | None:
    if not report.sweep:
        return None
    levels = sorted({g.concurrency for g in report.sweep})
    modes = list(dict.fromkeys(g.mode for g in report.sweep))
    colors = _mode_colors(modes)
    fig = Figure(figsize=(8, 7))
    top, bottom = fig.subplots(2, 1, sharex=True)
    gap_ms = bottom.twinx()
    notes: list[str] = []  # the real-time limit per mode (dotted lines mark it)
    for mode in modes:
        groups = sorted((g for g in report.sweep if g.mode == mode), key=lambda g: g.concurrency)
        xs = [g.concurrency for g in groups]
        c = colors[mode]
        top.plot(xs, [_metric(g, "first_audio_ms", "p50") for g in groups], "o-", color=c,
                 label=f"{mode} v2v p50")
        top.plot(xs, [_metric(g, "first_audio_ms", "p90") for g in groups], "s--", color=c,
                 label=f"{mode} v2v p90")
        share = [100.0 * g.gap_turns / g.turns if g.turns else math.nan for g in groups]
        bottom.plot(xs, share, "o-", color=c, label=f"{mode} turns with gaps (%)")
        gap_ms.plot(xs, [_metric(g, "gap_total_ms", "p90") for g in groups], "s:", color=c,
                    label=f"{mode} gap total p90 (ms)")
        limit = report.realtime_limit.get(mode)
        if limit is not None:
            for ax in (top, bottom):
                ax.axvline(limit, color=c, linestyle=":", alpha=0.7)
        notes.append(f"{mode}: real-time up to {limit}" if limit is not None
                     else f"{mode}: not real-time even at {levels[0]}")
    top.set_ylabel("voice-to-voice (ms)")
    top.set_title("Concurrency sweep\n" + " · ".join(notes), fontsize="medium")
    top.grid(True, alpha=0.3)
    top.legend(loc="upper left", fontsize="small")
    bottom.set_ylabel("turns with gaps (%)")
    bottom.set_ylim(bottom=0)
    gap_ms.set_ylabel("gap total p90 (ms)")
    gap_ms.set_ylim(bottom=0)
    bottom.set_xlabel("simultaneous sessions")
    bottom.grid(True, alpha=0.3)
    handles = bottom.get_legend_handles_labels()[0] + gap_ms.get_legend_handles_labels()[0]
    bottom.legend(handles=handles, loc="upper left", fontsize="small")
    _level_axis(bottom, levels)
    fig.tight_layout()
    return fig


# --- per-turn waterfall ------------------------------------------------------------------

def _has_marks(r: TurnRecord) -> bool:
    return any(getattr(r, name) is not None for _, name in STAGES)


def _waterfall_rows(report: Report) -> list[TurnRecord]:
    compare = [r for r in _compare(report) if _has_marks(r)]
    series = _series(compare, _modes(report, compare))
    if not series:
        return []
    per_series = max(1, WATERFALL_MAX_ROWS // len(series))
    rows: list[TurnRecord] = []
    for _, mine in series:
        rows += sorted(mine, key=lambda r: (r.round, r.clip))[:per_series]
    return rows[:WATERFALL_MAX_ROWS]


def _draw_turn(ax: Axes, y: int, r: TurnRecord, server_marker: Callable[[str], str]) -> None:
    start = 0.0
    for (_, name), color in zip(STAGES, STAGE_COLORS, strict=True):
        mark = getattr(r, name)
        if mark is None:
            continue
        ax.barh(y, mark - start, left=start, height=0.6, color=color)
        start = max(mark, 0.0)  # an early endpoint shows left of EoS; later stages from EoS
    if r.first_audio_ms is not None and r.reply_audio_ms > 0:
        ax.barh(y, r.reply_audio_ms + r.gap_total_ms, left=r.first_audio_ms, height=0.6,
                color=PLAYING_COLOR)
        for at, length in r.gaps:
            ax.barh(y, length, left=at, height=0.6, color=GAP_COLOR)
    for key, value in (r.server or {}).items():
        if value is not None:
            ax.plot([value], [y], linestyle="none", marker=server_marker(key), color="black",
                    markersize=5)


def waterfall(report: Report) -> Figure | None:
    rows = _waterfall_rows(report)
    if not rows:
        return None
    server_keys = list(dict.fromkeys(k for r in rows for k, v in (r.server or {}).items()
                                     if v is not None))

    def server_marker(key: str) -> str:
        return SERVER_MARKERS[server_keys.index(key) % len(SERVER_MARKERS)]

    fig = Figure(figsize=(10, max(3.4, 1.6 + 0.32 * len(rows))))
    ax = fig.add_subplot()
    for y, r in enumerate(rows):
        _draw_turn(ax, y, r, server_marker)
    several = len({r.transport for r in rows}) > 1
    ax.set_yticks(range(len(rows)), [f"{r.mode}{f' {r.transport}' if several else ''} · "
                                     f"{r.clip} · {r.round}" for r in rows], fontsize="small")
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=1)
    ax.set_xlabel("ms after end of speech (EoS = 0)")
    ax.set_title("Per-turn stages (compare phase)")
    ax.grid(True, axis="x", alpha=0.3)
    handles: list[Patch | Line2D] = [Patch(color=c, label=label) for (label, _), c
                                     in zip(STAGES, STAGE_COLORS, strict=True)]
    handles.append(Patch(color=PLAYING_COLOR, label=PLAYING_LABEL))
    if any(r.gaps for r in rows):
        handles.append(Patch(color=GAP_COLOR, label=GAP_LABEL))
    handles += [Line2D([], [], linestyle="none", marker=server_marker(k), color="black",
                       label=f"server: {k}") for k in server_keys]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    return fig


# --- conversation: v2v by turn index --------------------------------------------------------

def _conversation_records(report: Report) -> list[TurnRecord]:
    return [r for r in report.records if r.phase == "conversation" and r.turn_index is not None]


def conversation(report: Report) -> Figure | None:
    """v2v of each turn of each connection against its position in the conversation; a
    turn without a reply is a red cross on the top edge, the silence before each turn is
    written under its index."""
    records = _conversation_records(report)
    if not records:
        return None
    modes = _modes(report, records)
    colors = _mode_colors(modes)
    fig = Figure(figsize=(9, 4.8))
    ax = fig.add_subplot()
    replied = [r.first_audio_ms for r in records if r.replied and r.first_audio_ms is not None]
    top = max(replied, default=1000.0) * 1.15
    failed_label = False
    for mode in modes:
        mine = [r for r in records if r.mode == mode]
        for n, conn in enumerate(dict.fromkeys(r.connection_id for r in mine)):
            turns = sorted((r for r in mine if r.connection_id == conn),
                           key=lambda r: r.turn_index or 0)
            ok = [(r.turn_index, r.first_audio_ms) for r in turns
                  if r.replied and r.turn_index is not None and r.first_audio_ms is not None]
            ax.plot([i for i, _ in ok], [v for _, v in ok], "o-", color=colors[mode],
                    alpha=0.9 if n == 0 else 0.5, label=mode if n == 0 else None)
            bad = [r.turn_index for r in turns if not r.replied and r.turn_index is not None]
            if bad:
                ax.plot(bad, [top] * len(bad), "x", color=GAP_COLOR, markersize=10,
                        markeredgewidth=2, clip_on=False,
                        label=None if failed_label else "no reply (failed turn)")
                failed_label = True
    indexes = sorted({r.turn_index for r in records if r.turn_index is not None})
    gaps: dict[int, float] = {}
    for r in records:
        if r.turn_index is not None and r.gap_before_s is not None:
            gaps[r.turn_index] = max(gaps.get(r.turn_index, 0.0), r.gap_before_s)
    ax.set_xticks(indexes, [f"{i}\n+{gaps[i]:.0f} s" if i in gaps else str(i)
                            for i in indexes])
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel("turn of the connection (silence before it)")
    ax.set_ylabel("voice-to-voice (ms after end of speech)")
    ax.set_title("Voice-to-voice by turn of a conversation (one connection per line)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig


# --- entry points ------------------------------------------------------------------------

BUILDERS: dict[str, Callable[[Report], Figure | None]] = {
    LATENCY_CDF: latency_cdf,
    CONCURRENCY: concurrency,
    WATERFALL: waterfall,
    CONVERSATION: conversation,
}


def planned(report: Report) -> list[str]:
    """File names ``write_plots`` would write for this report (those with data)."""
    out: list[str] = []
    if _cdf_data(report):
        out.append(LATENCY_CDF)
    if report.sweep:
        out.append(CONCURRENCY)
    if _waterfall_rows(report):
        out.append(WATERFALL)
    if _conversation_records(report):
        out.append(CONVERSATION)
    return out


def write_plots(report: Report, out_dir: Path) -> dict[str, Path]:
    """Write every plot that has data into ``out_dir``; file name -> path of those written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, build in BUILDERS.items():
        fig = build(report)
        if fig is not None:
            written[name] = _save(fig, out_dir / name)
    return written
