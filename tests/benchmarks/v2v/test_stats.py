from __future__ import annotations

import pytest

from benchmarks.v2v.records import TurnRecord
from benchmarks.v2v.stats import (
    group,
    metric_stats,
    percentile,
    ratios,
    realtime_limit,
    speculation_summary,
)


def _rec(mode: str, v2v: float | None, *, n: int = 1, phase: str = "compare",
         gaps: int = 0, error: str | None = None) -> TurnRecord:
    return TurnRecord(phase=phase, mode=mode, concurrency=n, session_index=0,  # type: ignore[arg-type]
                      round=0, clip="q", started_s=0.0, eos_s=1.0, first_audio_ms=v2v,
                      speech_stopped_ms=500.0, audio_chunks=0 if v2v is None else 3,
                      gap_count=gaps, gap_total_ms=40.0 * gaps, error=error)


def test_percentile_interpolates_between_ranks() -> None:
    data = [10.0, 20.0, 30.0, 40.0, 50.0]
    assert percentile(data, 50) == 30.0
    assert percentile(data, 90) == pytest.approx(46.0)
    assert percentile(data, 0) == 10.0 and percentile(data, 100) == 50.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_metric_stats() -> None:
    s = metric_stats([300.0, 100.0, 200.0])
    assert s is not None
    assert (s.n, s.p50, s.min, s.max, s.mean) == (3, 200.0, 100.0, 300.0, 200.0)
    assert metric_stats([]) is None


def test_group_summaries_count_replies_gaps_and_errors() -> None:
    records = [_rec("streaming", 900.0), _rec("streaming", 1100.0, gaps=1),
               _rec("serial", 1500.0), _rec("serial", None, error="no reply"),
               _rec("streaming", 5000.0, n=2, phase="sweep")]
    summaries = group(records, "compare")
    assert [(g.mode, g.concurrency) for g in summaries] == [("streaming", 1), ("serial", 1)]
    streaming, serial = summaries
    assert streaming.turns == 2 and streaming.replied == 2 and streaming.gap_turns == 1
    assert streaming.metrics["first_audio_ms"].p50 == 1000.0
    assert not streaming.realtime  # 1 of 2 turns stuttered
    assert serial.replied == 1 and serial.errors == 1 and not serial.realtime
    assert serial.metrics["first_audio_ms"].n == 1  # the failed turn adds no latency


def test_ratio_is_serial_over_streaming() -> None:
    summaries = group([_rec("streaming", 1000.0), _rec("serial", 1500.0)], "compare")
    assert ratios(summaries)["first_audio_ms"] == {"p50": 1.5, "p90": 1.5}
    # The work after the endpoint (v2v - speech_stopped 500): 1000 / 500.
    assert ratios(summaries)["after_endpoint_ms"] == {"p50": 2.0, "p90": 2.0}
    assert ratios(summaries[:1]) == {}
    # Other modes (a turn detection variant) get no ratio of their own.
    other = group([_rec("streaming", 1000.0), _rec("semantic", 600.0)], "compare")
    assert ratios(other) == {}


def test_speculation_summary_splits_hits_from_misses() -> None:
    records = [_rec("streaming", 400.0), _rec("streaming", 800.0), _rec("streaming", 900.0),
               _rec("streaming", None, error="no reply"), _rec("streaming", 300.0)]
    for rec, hit, spec in zip(records, (True, False, False, False, None),
                              ((1, 0, 0.0), (2, 12, 250.0), (0, 0, 0.0), (1, 30, 500.0),
                               None), strict=True):
        rec.speculative_hit = hit
        if spec is not None:
            rec.speculations, rec.wasted_llm_tokens, rec.wasted_tts_ms = spec
    s = speculation_summary(records)
    assert s is not None
    assert (s.reported, s.hits, s.hit_rate, s.totals_reported) == (4, 1, 0.25, 4)
    # Means over the turns that reported them, the failed one included (its work was done).
    assert (s.speculations_per_turn, s.wasted_llm_tokens_per_turn,
            s.wasted_tts_ms_per_turn) == (1.0, 10.5, 187.5)
    # v2v: replied turns only, by the reply's origin; the unreported turn is in neither.
    assert s.v2v_hit is not None and (s.v2v_hit.n, s.v2v_hit.p50) == (1, 400.0)
    assert s.v2v_miss is not None and (s.v2v_miss.n, s.v2v_miss.p50) == (2, 850.0)
    assert speculation_summary([_rec("default", 500.0)]) is None
    assert group(records, "compare")[0].speculation == s


def test_realtime_limit_is_the_last_level_before_the_first_failure() -> None:
    records = [_rec("streaming", 900.0, n=1, phase="sweep"),
               _rec("streaming", 950.0, n=2, phase="sweep"),
               _rec("streaming", 990.0, n=2, phase="sweep"),
               _rec("streaming", 2000.0, n=4, phase="sweep", gaps=2),
               _rec("streaming", 900.0, n=8, phase="sweep"),  # recovers: does not count
               _rec("serial", 3000.0, n=1, phase="sweep", gaps=1)]
    sweep = group(records, "sweep")
    assert [g.concurrency for g in sweep if g.mode == "streaming"] == [1, 2, 4, 8]
    assert realtime_limit(sweep) == {"streaming": 2, "serial": None}
