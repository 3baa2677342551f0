"""Renders RELIABILITY.md from the stored results of every part (results/<part>.json)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.reliability.rows import PARTS, Row

RESULTS = Path(__file__).parent / "results"

TITLES = {"load": "Load held by one orchestrator process",
          "soak": "Soak",
          "faults": "Faults survived",
          "fuzz": "Hostile input (fuzzed)",
          "limits": "Limits enforced",
          "security": "Security"}

HEADER = """# Reliability and security

Every figure below is measured by `python -m benchmarks.reliability` (package
`benchmarks/reliability/`) against real processes on loopback, and this file is regenerated
from its stored results (`benchmarks/reliability/results/*.json`): do not edit it by hand.
Run everything with `python -m benchmarks.reliability all` (the soak alone takes 30 min);
the quick variants of each part run in `.ci/run` (`tests/benchmarks/reliability/`).
"""


def load_rows(results: Path) -> dict[str, tuple[dict[str, object], list[Row]]]:
    parts: dict[str, tuple[dict[str, object], list[Row]]] = {}
    for part in PARTS:
        path = results / f"{part}.json"
        if path.exists():
            record = json.loads(path.read_text())
            parts[part] = (record, [Row.model_validate(r) for r in record["rows"]])
    return parts


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(results: Path) -> str:
    parts = load_rows(results)
    by_section: dict[str, list[tuple[str, Row]]] = {s: [] for s in TITLES}
    for record, rows in parts.values():
        when = time.strftime("%Y-%m-%d", time.gmtime(float(str(record["started"]))))
        for row in rows:
            by_section[row.section].append((when, row))
    out = [HEADER]
    for section, title in TITLES.items():
        rows_of = by_section[section]
        out.append(f"\n## {title}\n")
        if not rows_of:
            out.append("_Not measured yet._\n")
            continue
        out.append("| check | result | pass | measured | reproduce |")
        out.append("|---|---|---|---|---|")
        for when, row in rows_of:
            out.append(f"| {_cell(row.name)} | {_cell(row.result)} | "
                       f"{'yes' if row.passed else '**no**'} | {when} | `{_cell(row.command)}` |")
        notes = [(row.name, row.note) for _, row in rows_of if row.note]
        if notes:
            out.append("")
            out.extend(f"- **{_cell(name)}**: {note}" for name, note in notes)
    missing = [p for p in PARTS if p not in parts]
    if missing:
        out.append(f"\nParts never run yet: {', '.join(missing)}.")
    return "\n".join(out) + "\n"


def write_report(results: Path, report: Path) -> None:
    report.write_text(render(results))
