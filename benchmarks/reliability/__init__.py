"""The reliability and security suite: load, soak, faults, hostile input, limits.

Each part is a module of this package with ``async def run(quick: bool) -> list[Row]``;
``python -m benchmarks.reliability PART... [--quick]`` runs them against real processes,
stores each part's rows in ``benchmarks/reliability/results/<part>.json`` and regenerates
``RELIABILITY.md`` from every stored part (``report.py``). The quick variants are what
``.ci/run`` exercises (tests/benchmarks/reliability/); the full ones are the documented
long runs whose figures the report shows.
"""

from benchmarks.reliability.rows import PARTS, Row

__all__ = ["PARTS", "Row"]
