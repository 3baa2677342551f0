"""Known vulnerabilities of the locked dependencies (deploy/requirements.lock).

    .venv/bin/python deploy/audit.py [--lock deploy/requirements.lock]
                                     [--ignore deploy/audit-ignore.txt] [--json-api URL]

Every locked package (all of them, whatever their markers) is looked up in the package
index's JSON API, the vulnerability data PyPI publishes (from the OSV database):

- A pin at the project's newest release: the project's ``vulnerabilities`` list is exactly
  that release's.
- An older pin: its own release's list (``/NAME/VERSION/json``) where the index serves it;
  where it does not, the newest release's open vulnerabilities are counted against the
  pin too (conservative), and the report says that fixes released after the pin are not
  visible ("behind").

Exit status 1 when a vulnerability is found that ``deploy/audit-ignore.txt`` does not
list (by any of its ids or aliases), each with the reason it is accepted; 2 when the data
cannot be fetched (an audit that saw nothing must not pass). pip-audit's PyPI service
reads only the per-release endpoint, and OSV's API is not reachable from CI's machines.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)\s*(?:;\s*(.*?))?\s*\\?$")
_IGNORE = re.compile(r"^(\S+)\s+(\S+)\s+(\S.*)$")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Locked:
    name: str
    version: str
    marker: str | None
    hashes: int


def parse_lock(text: str) -> list[Locked]:
    """The entries of a ``uv pip compile --generate-hashes`` file."""
    entries: list[Locked] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = _ENTRY.match(line)
        if match is None:
            continue
        hashes = 0
        for following in lines[i + 1:]:
            if not following.strip().startswith("--hash=sha256:"):
                break
            hashes += 1
        entries.append(Locked(norm(match.group(1)), match.group(2), match.group(3), hashes))
    return entries


@dataclass(frozen=True)
class Ignored:
    id: str
    package: str
    reason: str


def parse_ignore(text: str) -> list[Ignored]:
    """``ID PACKAGE REASON...`` lines; ``#`` starts a comment line. A line without a
    reason is an error: every accepted vulnerability says why."""
    out: list[Ignored] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _IGNORE.match(line)
        if match is None:
            raise ValueError(f"line {number}: expected 'ID PACKAGE REASON', got {line!r}")
        out.append(Ignored(match.group(1), norm(match.group(2)), match.group(3)))
    return out


@dataclass(frozen=True)
class Vuln:
    id: str
    aliases: tuple[str, ...]
    fixed_in: tuple[str, ...]
    details: str

    @property
    def ids(self) -> set[str]:
        return {self.id, *self.aliases}


@dataclass
class Finding:
    package: Locked
    latest: str
    exact: bool  # the data is the pinned release's own
    vulns: list[Vuln] = field(default_factory=list)

    @property
    def behind(self) -> bool:
        return self.package.version != self.latest


def _vulns(data: dict[str, Any]) -> list[Vuln]:
    out = []
    for v in data.get("vulnerabilities") or []:
        if v.get("withdrawn"):
            continue
        details = str(v.get("summary") or v.get("details") or "").replace("\n", " ")
        out.append(Vuln(str(v["id"]), tuple(str(a) for a in v.get("aliases") or ()),
                        tuple(str(f) for f in v.get("fixed_in") or ()), details))
    return out


Fetch = Callable[[str], "dict[str, Any] | None"]  # path under the JSON API -> JSON or None


def audit_one(entry: Locked, fetch: Fetch) -> Finding:
    project = fetch(f"{entry.name}/json")
    if project is None:
        raise LookupError(f"{entry.name}: not in the index's JSON API")
    latest = str(project["info"]["version"])
    if latest == entry.version:
        return Finding(entry, latest, True, _vulns(project))
    release = fetch(f"{entry.name}/{entry.version}/json")
    if release is not None:
        return Finding(entry, latest, True, _vulns(release))
    return Finding(entry, latest, False, _vulns(project))


def http_fetch(root: str, timeout_s: float = 20.0, tries: int = 3) -> Fetch:
    def fetch(path: str) -> dict[str, Any] | None:
        for attempt in range(tries):
            try:
                with urllib.request.urlopen(f"{root.rstrip('/')}/{path}",
                                            timeout=timeout_s) as resp:
                    body: dict[str, Any] = json.load(resp)
                    return body
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                if attempt == tries - 1:
                    raise
            except (urllib.error.URLError, TimeoutError):
                if attempt == tries - 1:
                    raise
            time.sleep(1.0 + attempt)
        return None
    return fetch


def default_json_api() -> str:
    """The JSON API of pip's default index (the one uv and pip resolve the lock from)."""
    from pip._internal.models.index import PyPI

    return str(PyPI.pypi_url)


@dataclass
class Report:
    findings: list[Finding]
    ignored: list[Ignored]

    def unaccepted(self) -> list[tuple[Finding, Vuln]]:
        accepted = {(i.package, i.id) for i in self.ignored}
        return [(f, v) for f in self.findings for v in f.vulns
                if not any((f.package.name, i) in accepted for i in v.ids)]

    def accepted(self) -> list[tuple[Finding, Vuln, Ignored]]:
        out = []
        for f in self.findings:
            for v in f.vulns:
                match = next((i for i in self.ignored
                              if i.package == f.package.name and i.id in v.ids), None)
                if match is not None:
                    out.append((f, v, match))
        return out

    def stale(self) -> list[Ignored]:
        """Ignore entries that no finding needs any more (fixed, withdrawn, unlocked)."""
        used = {id(i) for _, _, i in self.accepted()}
        return [i for i in self.ignored if id(i) not in used]

    def lines(self) -> list[str]:
        out = []
        for f, v in self.unaccepted():
            fixed = ", ".join(v.fixed_in) or "no fixed release"
            out.append(f"VULNERABLE {f.package.name}=={f.package.version} {v.id} "
                       f"({', '.join(v.aliases)}; fixed in: {fixed}): {v.details[:200]}")
        for f, v, i in self.accepted():
            out.append(f"accepted   {f.package.name}=={f.package.version} {v.id}: {i.reason}")
        for i in self.stale():
            out.append(f"stale      {i.id} ({i.package}) matches nothing: remove it from the "
                       "ignore list")
        behind = [f for f in self.findings if f.behind and not f.exact]
        if behind:
            out.append("behind     (newer releases exist; fixes made after the pin are not "
                       "visible in the data served here): "
                       + ", ".join(f"{f.package.name} {f.package.version} < {f.latest}"
                                   for f in behind))
        vulns = sum(len(f.vulns) for f in self.findings)
        out.append(f"audit: {len(self.findings)} packages, {vulns} known vulnerabilities, "
                   f"{len(self.unaccepted())} not accepted")
        return out


def audit(entries: Sequence[Locked], fetch: Fetch, ignored: list[Ignored],
          workers: int = 8) -> Report:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        findings = list(pool.map(lambda e: audit_one(e, fetch), entries))
    return Report(findings, ignored)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", type=Path, default=ROOT / "deploy" / "requirements.lock")
    parser.add_argument("--ignore", type=Path, default=ROOT / "deploy" / "audit-ignore.txt")
    parser.add_argument("--json-api", help="the index's JSON API root (default: pip's "
                        "default index)")
    args = parser.parse_args(argv)
    entries = parse_lock(args.lock.read_text())
    ignored = parse_ignore(args.ignore.read_text()) if args.ignore.exists() else []
    started = time.monotonic()
    try:
        report = audit(entries, http_fetch(args.json_api or default_json_api()), ignored)
    except (OSError, LookupError, ValueError, KeyError) as exc:
        print(f"audit: cannot fetch the vulnerability data: {exc}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    print(f"audit: {time.monotonic() - started:.1f} s")
    return 1 if report.unaccepted() else 0


if __name__ == "__main__":
    sys.exit(main())
