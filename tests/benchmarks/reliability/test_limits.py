"""The limits part's quick variant against a live ``cascade serve``: every limit row and
every security row must pass (what CI runs of ``python -m benchmarks.reliability limits``)."""

from __future__ import annotations

from benchmarks.reliability import limits


async def test_every_limit_and_security_row_passes() -> None:
    rows = await limits.run(quick=True)
    sections = {row.section for row in rows}
    assert sections == {"limits", "security"}
    assert sum(row.section == "limits" for row in rows) == 9
    failed = [f"[{row.section}] {row.name}: {row.result}" for row in rows if not row.passed]
    assert not failed, "\n".join(failed)
