"""The quick fault run (benchmarks/reliability/faults.py) against real processes: an
orchestrator killed with live sessions, Redis restarted, TTS replicas reset mid-reply, a
client vanishing mid-reply, one that stops reading and one reconnecting in a loop.
Every row must pass."""

from __future__ import annotations

from benchmarks.reliability import faults


async def test_quick_faults_every_row_passes() -> None:
    rows = await faults.run(quick=True)
    names = [row.name for row in rows]
    assert len(rows) == 6, names
    failed = [f"{row.name}: {row.result} {row.note}" for row in rows if not row.passed]
    assert not failed, "\n".join(failed)
    kill, restart = rows[0].figures, rows[1].figures
    assert kill["items_lost"] == 0 and kill["items_seen"] >= faults.QUICK.sessions
    assert len(kill["recovery_s"]) == faults.QUICK.sessions
    assert restart["items_lost"] == 0 and restart["missing_on_resume"] == 0
    assert rows[2].figures["next_turn"] == "completed"
