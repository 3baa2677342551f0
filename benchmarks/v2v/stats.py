"""Percentiles and per-group summaries of turn records."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from benchmarks.v2v.records import (
    LATENCY_METRICS,
    SUMMARY_METRICS,
    GroupSummary,
    MetricStats,
    SpeculationSummary,
    Transport,
    TurnRecord,
)

# The metrics ratios are given for: the latencies, and the work after the endpoint (the
# issue's yardstick for how much of the pipeline the overlap hides).
RATIO_METRICS: tuple[str, ...] = (*LATENCY_METRICS, "after_endpoint_ms")
# A group is real-time when every turn replied and at most this share of turns stuttered.
REALTIME_MAX_GAP_SHARE = 0.10


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def metric_stats(values: Iterable[float]) -> MetricStats | None:
    data = sorted(values)
    if not data:
        return None
    return MetricStats(n=len(data), p50=round(percentile(data, 50), 1),
                       p90=round(percentile(data, 90), 1), p99=round(percentile(data, 99), 1),
                       mean=round(sum(data) / len(data), 1), min=round(data[0], 1),
                       max=round(data[-1], 1))


def _mean(values: Iterable[float | None]) -> float | None:
    data = [v for v in values if v is not None]
    return round(sum(data) / len(data), 1) if data else None


def speculation_summary(records: Sequence[TurnRecord]) -> SpeculationSummary | None:
    """Hit rate, speculations started and work thrown away per turn, and voice-to-voice
    of hits against misses; None when the server reported none of it (not cascade, or
    no timings asked for)."""
    reported = [r for r in records if r.speculative_hit is not None]
    totals = [r for r in records if (r.speculations, r.wasted_llm_tokens, r.wasted_tts_ms)
              != (None, None, None)]
    if not reported and not totals:
        return None

    def v2v(hit: bool) -> MetricStats | None:
        return metric_stats(r.first_audio_ms for r in reported
                            if r.speculative_hit is hit and r.replied
                            and r.first_audio_ms is not None)

    return SpeculationSummary(
        reported=len(reported), hits=sum(bool(r.speculative_hit) for r in reported),
        totals_reported=len(totals),
        speculations_per_turn=_mean(r.speculations for r in totals),
        wasted_llm_tokens_per_turn=_mean(r.wasted_llm_tokens for r in totals),
        wasted_tts_ms_per_turn=_mean(r.wasted_tts_ms for r in totals),
        v2v_hit=v2v(True), v2v_miss=v2v(False))


def summarize(mode: str, concurrency: int, records: Sequence[TurnRecord],
              transport: Transport = "ws") -> GroupSummary:
    metrics: dict[str, MetricStats] = {}
    for name in SUMMARY_METRICS:
        values = [float(v) for r in records if r.error is None
                  if (v := getattr(r, name)) is not None]
        stats = metric_stats(values)
        if stats is not None:
            metrics[name] = stats
    replied = sum(r.replied for r in records)
    gap_turns = sum(r.gap_count > 0 for r in records)
    realtime = bool(records) and replied == len(records) and (
        gap_turns <= REALTIME_MAX_GAP_SHARE * len(records))
    wers = [r.wer for r in records if r.wer is not None]
    return GroupSummary(mode=mode, transport=transport, concurrency=concurrency,
                        turns=len(records),
                        replied=replied, errors=sum(r.error is not None for r in records),
                        gap_turns=gap_turns, realtime=realtime, metrics=metrics,
                        early_endpoints=sum(r.early_endpoint for r in records),
                        wer_mean=round(sum(wers) / len(wers), 3) if wers else None,
                        speculation=speculation_summary(records))


def group(records: Sequence[TurnRecord], phase: str) -> list[GroupSummary]:
    """One summary per (transport, mode, concurrency) of ``phase``: transports, then
    modes, in first-seen order."""
    mine = [r for r in records if r.phase == phase]
    transports = list(dict.fromkeys(r.transport for r in mine))
    modes = list(dict.fromkeys(r.mode for r in mine))
    keys = sorted({(r.transport, r.mode, r.concurrency) for r in mine},
                  key=lambda k: (transports.index(k[0]), modes.index(k[1]), k[2]))
    return [summarize(mode, n, [r for r in mine if (r.transport, r.mode, r.concurrency)
                                == (transport, mode, n)], transport)
            for transport, mode, n in keys]


def ratios(compare: Sequence[GroupSummary], slow: str = "serial", fast: str = "streaming"
           ) -> dict[str, dict[str, float]]:
    """``slow / fast`` for p50 and p90 of each latency metric (and of the work after the
    endpoint) both modes have, over the first transport's groups. Only this pair: other
    modes (semantic_vad, ...) differ in more than the pipeline, so no ratio is made up."""
    first = compare[0].transport if compare else "ws"
    by_mode = {g.mode: g for g in compare if g.transport == first}
    if slow not in by_mode or fast not in by_mode:
        return {}
    out: dict[str, dict[str, float]] = {}
    for name in RATIO_METRICS:
        a, b = by_mode[slow].metrics.get(name), by_mode[fast].metrics.get(name)
        if a is None or b is None:
            continue
        out[name] = {q: round(getattr(a, q) / getattr(b, q), 2)
                     for q in ("p50", "p90") if getattr(b, q) > 0}
    return out


def realtime_limit(sweep: Sequence[GroupSummary]) -> dict[str, int | None]:
    """Per mode: the largest concurrency below which every level stayed real-time."""
    out: dict[str, int | None] = {}
    for mode in dict.fromkeys(g.mode for g in sweep):
        limit: int | None = None
        for g in sorted((g for g in sweep if g.mode == mode), key=lambda g: g.concurrency):
            if not g.realtime:
                break
            limit = g.concurrency
        out[mode] = limit
    return out
