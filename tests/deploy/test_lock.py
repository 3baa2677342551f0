"""deploy/requirements.lock: in step with pyproject.toml, hashed, and what is installed.

The lock cannot be re-resolved here (that needs the package index), so its agreement
with pyproject.toml is checked pin by pin: every pin that deploy/install.sh installs
(core, embedded, bench, dev, the no-deps model packages) is in the lock at the same
version. Regenerate with ``bash deploy/lock.sh`` after changing a pin.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import Marker

from tests.support.audit import load_audit

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "deploy" / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
REQUIREMENTS = ROOT / "deploy" / "images" / "requirements.py"
REGENERATE = "run `bash deploy/lock.sh` and commit deploy/requirements.lock"
audit = load_audit()
Locked = audit.Locked
norm = audit.norm
parse_lock = audit.parse_lock


def pins(*args: str) -> dict[str, str]:
    """name -> version of deploy/images/requirements.py's output (pyproject's pins)."""
    out = subprocess.run([sys.executable, str(REQUIREMENTS), str(PYPROJECT), *args],
                         check=True, capture_output=True, text=True).stdout
    found: dict[str, str] = {}
    for line in filter(None, out.splitlines()):
        name, sep, version = line.partition("==")
        assert sep, f"{line!r} is not pinned with =="
        found[norm(name.split("[")[0])] = version.strip()
    return found


@pytest.fixture(scope="module")
def locked() -> list[Locked]:
    return parse_lock(LOCK.read_text())


def test_parse_lock_reads_names_versions_markers_and_hashes() -> None:
    text = ("# header\nFoo_Bar==1.2 ; python_full_version < '3.12' \\\n"
            "    --hash=sha256:aa \\\n    --hash=sha256:bb\n    # via x\nbaz==3 \\\n"
            "    --hash=sha256:cc\nqux==4\n")
    assert parse_lock(text) == [Locked("foo-bar", "1.2", "python_full_version < '3.12'", 2),
                                Locked("baz", "3", None, 1), Locked("qux", "4", None, 0)]


def test_every_pyproject_pin_is_locked_at_its_version(locked: list[Locked]) -> None:
    versions: dict[str, set[str]] = {}
    for entry in locked:
        versions.setdefault(entry.name, set()).add(entry.version)
    wanted = pins("deps", "embedded", "bench", "dev") | pins("models", "vad", "llm")
    assert len(wanted) > 30  # the script answered with the real pin list
    stale = {name: (version, sorted(versions.get(name, ())))
             for name, version in wanted.items() if versions.get(name) != {version}}
    assert not stale, f"pyproject pin -> lock versions differ: {stale}; {REGENERATE}"


def test_every_entry_is_hashed_and_listed_once(locked: list[Locked]) -> None:
    assert len(locked) > 100  # the transitive closure, not just the direct pins
    unhashed = [e.name for e in locked if e.hashes == 0]
    assert not unhashed, f"entries without --hash: {unhashed}; {REGENERATE}"
    # A name appears twice only as a marker fork (one version per Python range).
    seen: dict[str, list[Locked]] = {}
    for entry in locked:
        seen.setdefault(entry.name, []).append(entry)
    for name, entries in seen.items():
        if len(entries) > 1:
            assert all(e.marker for e in entries), f"{name} locked twice without markers"


def test_install_sh_installs_the_lock() -> None:
    install = (ROOT / "deploy" / "install.sh").read_text()
    assert re.search(r"--require-hashes --no-deps \\\n\s+-r deploy/requirements.lock", install)
    assert "--no-deps -e ." in install


def test_the_environment_has_the_locked_versions(locked: list[Locked]) -> None:
    """What deploy/install.sh installed here (CI: a fresh machine) is the locked set: every
    entry whose marker applies to this Python is installed at the locked version."""
    wrong: dict[str, tuple[str, str]] = {}
    for entry in locked:
        if entry.marker and not Marker(entry.marker).evaluate():
            continue
        try:
            have = importlib.metadata.version(entry.name)
        except importlib.metadata.PackageNotFoundError:
            have = "missing"
        if have != entry.version:
            wrong[entry.name] = (entry.version, have)
    assert not wrong, f"locked -> installed: {wrong}; run `bash deploy/install.sh`"
