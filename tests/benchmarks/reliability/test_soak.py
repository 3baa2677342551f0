"""The quick soak: sessions with turns, barge-ins and resumes, then the leak count."""

from __future__ import annotations

from benchmarks.reliability import soak


async def test_quick_soak_keeps_memory_flat_and_leaks_nothing() -> None:
    memory, leaks, turns = await soak.run(quick=True)
    assert len(memory.figures["samples"]) >= 5
    assert memory.figures["per_session_mb"] > 0
    assert memory.passed, memory.result  # RSS within +-10 % between the first and last third
    end, idle = leaks.figures["end"], leaks.figures["idle"]
    assert end["sessions"] == 0 and end["tasks"] == idle["tasks"], leaks.result
    assert leaks.passed, leaks.result
    assert turns.figures["answered"] >= 1 and turns.figures["reconnects"] >= 0
    assert turns.passed, turns.note
    # the sessions bound their conversations (keep_items 4): deletes went through
    assert turns.figures["items_deleted"] > 0
    assert not turns.figures["errors"], turns.figures["errors"]
