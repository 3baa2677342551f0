"""Per-stage latency benchmarks: ``cascade bench-stages`` runs them all on the embedded
CPU defaults and writes one JSON report. Each stage module exposes
``bench(repeats) -> dict[str, float]`` and runs alone with ``python -m benchmarks.stages.X``.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import time
from datetime import UTC, datetime
from typing import Any

STAGE_BENCHMARKS = ("asr", "llm", "tts", "vad", "turn")


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def run_all(out_dir: str, repeats: int = 3, only: tuple[str, ...] = STAGE_BENCHMARKS) -> int:
    os.makedirs(out_dir, exist_ok=True)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "repeats": repeats,
        "stages": {},
    }
    failed = 0
    for name in only:
        started = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.stages.{name}")
            result: dict[str, Any] = dict(module.bench(repeats))
        except Exception as exc:  # report and continue: one broken stage keeps the others
            failed += 1
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result["bench_wall_s"] = round(time.perf_counter() - started, 1)
        report["stages"][name] = result
        print(f"{name:>4}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in result.items()), flush=True)
    path = os.path.join(out_dir, "stages.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"report: {path}")
    return 1 if failed else 0


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
