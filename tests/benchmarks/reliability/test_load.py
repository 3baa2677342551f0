"""The quick load run: fake stages + one real ``cascade serve``, sessions taking turns."""

from __future__ import annotations

from benchmarks.reliability import load


async def test_quick_load_answers_every_turn_and_measures_lag() -> None:
    rows = await load.run(quick=True)
    step, summary = rows[0], rows[-1]
    figures = step.figures
    assert figures["alive"], "the orchestrator died under load"
    assert figures["live"] == load.QUICK_SESSIONS
    assert figures["lag_samples"] > 0 and figures["lag_p99_ms"] >= figures["lag_p50_ms"] >= 0
    assert figures["answered"] >= 1
    assert figures["unanswered"] == 0 and figures["failed"] == 0, step.result
    assert figures["connect_failures"] == 0 and figures["reconnect_failures"] == 0
    assert figures["frames"] > 0 and figures["rss_mb"] > 0
    assert figures["cpu"]["orchestrator"] > 0
    assert step.passed, step.note
    assert summary.passed, summary.result
