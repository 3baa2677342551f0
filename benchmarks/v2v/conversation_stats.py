"""Conversation turns summarized by position: turn 1 of a connection against later turns.

A server that only ever sees first turns can hide whatever goes wrong later: a buffer
that fills during silence, a prompt that outgrows the model, speculation that only works
on the first turn. So the conversation phase is read by turn index, with the turns right
after a long silence singled out, and every turn without a spoken reply counted as a
failure (with its reason), never dropped from the table.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.v2v.records import ConversationSummary, TurnIndexSummary, TurnRecord
from benchmarks.v2v.stats import metric_stats, speculation_summary

# Silences at least this long are "long": 60 s was the server's uncommitted-input limit,
# which used to make it deaf to everything after a minute of streamed silence.
LONG_GAP_S = 60.0


def _v2v(records: Sequence[TurnRecord]) -> list[float]:
    return [r.first_audio_ms for r in records if r.replied and r.first_audio_ms is not None]


def after_long_gap(record: TurnRecord) -> bool:
    return record.gap_before_s is not None and record.gap_before_s >= LONG_GAP_S


def _by_turn(records: Sequence[TurnRecord]) -> list[TurnIndexSummary]:
    rows = []
    for index in sorted({r.turn_index for r in records if r.turn_index is not None}):
        mine = [r for r in records if r.turn_index == index]
        gaps = [r.gap_before_s for r in mine if r.gap_before_s is not None]
        v2v = metric_stats(_v2v(mine))
        errors = [r.error or "no spoken reply" for r in mine if not r.replied]
        rows.append(TurnIndexSummary(turn_index=index, gap_before_s=max(gaps) if gaps else None,
                                     turns=len(mine), replied=sum(r.replied for r in mine),
                                     v2v_p50=v2v.p50 if v2v else None,
                                     errors=list(dict.fromkeys(errors))))
    return rows


def summarize_mode(mode: str, records: Sequence[TurnRecord]) -> ConversationSummary:
    first = [r for r in records if r.turn_index == 1]
    later = [r for r in records if r.turn_index is not None and r.turn_index > 1]
    long_gap = [r for r in records if after_long_gap(r)]
    reported = [r.speculative_hit for r in records if r.speculative_hit is not None]
    replied = sum(r.replied for r in records)
    return ConversationSummary(
        mode=mode, connections=len({r.connection_id for r in records}), turns=len(records),
        replied=replied, failed=len(records) - replied,
        first_turn=metric_stats(_v2v(first)), later_turns=metric_stats(_v2v(later)),
        long_gap_turns=len(long_gap), long_gap_replied=sum(r.replied for r in long_gap),
        after_long_gap=metric_stats(_v2v(long_gap)),
        speculative_hits=sum(reported), speculative_reported=len(reported),
        after_endpoint=metric_stats(r.after_endpoint_ms for r in records
                                    if r.replied and r.after_endpoint_ms is not None),
        by_turn=_by_turn(records), speculation=speculation_summary(records))


def summarize(records: Sequence[TurnRecord]) -> list[ConversationSummary]:
    """One summary per mode of the conversation phase, modes in first-seen order."""
    mine = [r for r in records if r.phase == "conversation"]
    modes = list(dict.fromkeys(r.mode for r in mine))
    return [summarize_mode(m, [r for r in mine if r.mode == m]) for m in modes]
