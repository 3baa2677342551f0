"""deploy/audit.py decides on canned index answers (CI runs it against the real index)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.audit import load_audit

ROOT = Path(__file__).resolve().parents[2]


audit = load_audit()


def vuln(id_: str, *aliases: str, fixed: tuple[str, ...] = (), withdrawn: bool = False
         ) -> dict[str, Any]:
    return {"id": id_, "aliases": list(aliases), "fixed_in": list(fixed),
            "details": f"{id_} details", "summary": None,
            "withdrawn": "2026-01-01" if withdrawn else None}


INDEX: dict[str, dict[str, Any]] = {
    # at its newest release, with one open vulnerability and one withdrawn
    "alpha/json": {"info": {"version": "1.0"},
                   "vulnerabilities": [vuln("GHSA-a", "CVE-1"), vuln("GHSA-w", withdrawn=True)]},
    # behind; its own release's data is served
    "beta/json": {"info": {"version": "3.0"}, "vulnerabilities": []},
    "beta/2.0/json": {"info": {"version": "2.0"},
                      "vulnerabilities": [vuln("PYSEC-b", fixed=("2.1",))]},
    # behind; only the newest release's data is served
    "gamma/json": {"info": {"version": "5.0"}, "vulnerabilities": [vuln("GHSA-g")]},
    "clean/json": {"info": {"version": "1.0"}},
}


def fetch(path: str) -> dict[str, Any] | None:
    return INDEX.get(path)


LOCK = """# generated
alpha==1.0 \\
    --hash=sha256:00
beta==2.0 ; python_full_version < '3.12' \\
    --hash=sha256:11
gamma==4.0 \\
    --hash=sha256:22
clean==1.0 \\
    --hash=sha256:33
"""


def test_findings_per_package() -> None:
    report = audit.audit(audit.parse_lock(LOCK), fetch, [])
    found = {f.package.name: ([v.id for v in f.vulns], f.exact, f.behind)
             for f in report.findings}
    assert found == {"alpha": (["GHSA-a"], True, False),  # withdrawn entries dropped
                     "beta": (["PYSEC-b"], True, True),
                     "gamma": (["GHSA-g"], False, True),  # counted conservatively
                     "clean": ([], True, False)}
    assert len(report.unaccepted()) == 3


def test_ignore_list_accepts_by_id_or_alias_per_package_and_flags_stale_lines() -> None:
    ignored = audit.parse_ignore(
        "# comment\nCVE-1 alpha reason one\nPYSEC-b beta reason two\n"
        "GHSA-g other-package wrong package\nGHSA-old alpha fixed long ago\n")
    report = audit.audit(audit.parse_lock(LOCK), fetch, ignored)
    assert [(f.package.name, v.id) for f, v in report.unaccepted()] == [("gamma", "GHSA-g")]
    assert sorted(i.id for i in report.stale()) == ["GHSA-g", "GHSA-old"]
    text = "\n".join(report.lines())
    assert "VULNERABLE gamma==4.0 GHSA-g" in text
    assert "accepted   alpha==1.0 GHSA-a: reason one" in text
    assert "gamma 4.0 < 5.0" in text


def test_ignore_lines_need_a_reason() -> None:
    with pytest.raises(ValueError, match="line 2"):
        audit.parse_ignore("# c\nGHSA-x pkg\n")


def test_a_package_missing_from_the_index_is_an_error() -> None:
    with pytest.raises(LookupError):
        audit.audit(audit.parse_lock("nowhere==1.0 \\\n    --hash=sha256:00\n"), fetch, [])


def test_the_committed_ignore_list_parses_and_names_locked_packages() -> None:
    ignored = audit.parse_ignore((ROOT / "deploy" / "audit-ignore.txt").read_text())
    locked = {e.name for e in audit.parse_lock((ROOT / "deploy" / "requirements.lock")
                                               .read_text())}
    assert all(i.package in locked and len(i.reason) > 40 for i in ignored), ignored


def test_main_exits_2_when_the_data_cannot_be_fetched(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("alpha==1.0 \\\n    --hash=sha256:00\n")
    # A closed loopback port: nothing answers.
    assert audit.main(["--lock", str(lock), "--ignore", str(tmp_path / "none"),
                       "--json-api", "http://127.0.0.1:9/pypi"]) == 2
