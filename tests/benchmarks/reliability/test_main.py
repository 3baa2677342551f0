"""``python -m benchmarks.reliability``: SIGTERM stops a part and every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(180)
def test_sigterm_stops_the_part_and_its_processes(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.reliability", "load", "--quick",
         "--results", str(tmp_path / "results"), "--report", str(tmp_path / "R.md")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(started) < 2:  # the fakes, the server
            started |= _descendants(proc.pid)
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        assert len(started) >= 2, "the rig's processes never started"
        time.sleep(1.0)
        started |= _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err[-2000:]
        assert "stopped before its end" in err
        left = [pid for pid in started if _alive(pid)]
        assert not left, f"processes left running: {left}"
        assert not (tmp_path / "results").exists()  # nothing stored from a cut run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in started | _descendants(proc.pid):
            if _alive(pid):  # a failed run: its orphans, found while they were children
                os.kill(pid, signal.SIGKILL)
