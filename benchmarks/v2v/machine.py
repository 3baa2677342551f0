"""Where a report's numbers were measured."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

from benchmarks.v2v.records import MachineInfo


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return 0.0


def _commit() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or None
    return None


def machine_info() -> MachineInfo:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return MachineInfo(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        cpu=_cpu_model(), cores=cores or 1, memory_gib=_memory_gib(),
        platform=platform.platform(), python=sys.version.split()[0], commit=_commit())
