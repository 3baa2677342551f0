"""``python -m benchmarks.reliability PART... [--quick]``: run parts, store, regenerate."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import platform
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import cast

from benchmarks.reliability.report import RESULTS, write_report
from benchmarks.reliability.rows import PARTS, Row


async def _until_terminated(run: Callable[[bool], Coroutine[None, None, list[Row]]],
                            quick: bool) -> list[Row]:
    """The part; SIGTERM cancels it, so its ``finally`` blocks stop every process it
    started (the orchestrator, fakes, Redis, ...) before this one exits."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run(quick)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability",
                                     description=__doc__)
    parser.add_argument("parts", nargs="*", choices=[*PARTS, "all", "report"],
                        default=["report"],
                        help="parts to run ('all': every part; 'report': only regenerate "
                             "RELIABILITY.md from stored results)")
    parser.add_argument("--quick", action="store_true",
                        help="the short variant CI runs (figures not stored)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", type=Path, default=Path("RELIABILITY.md"))
    args = parser.parse_args(argv)
    parts = list(PARTS) if "all" in args.parts else [p for p in args.parts if p != "report"]
    failed = 0
    for part in parts:
        module = importlib.import_module(PARTS[part])
        run = cast(Callable[[bool], Coroutine[None, None, list[Row]]], module.run)
        started = time.time()
        try:
            rows = asyncio.run(_until_terminated(run, args.quick))
        except (asyncio.CancelledError, KeyboardInterrupt):
            print(f"part {part} stopped before its end: nothing stored", file=sys.stderr)
            return 143
        for row in rows:
            mark = "ok  " if row.passed else "FAIL"
            print(f"{mark} [{row.section}] {row.name}: {row.result}", flush=True)
        failed += sum(not row.passed for row in rows)
        if not args.quick:
            args.results.mkdir(parents=True, exist_ok=True)
            record = {"part": part, "started": started, "seconds": round(time.time() - started),
                      "machine": f"{platform.machine()} {platform.node()}",
                      "rows": [row.model_dump() for row in rows]}
            (args.results / f"{part}.json").write_text(json.dumps(record, indent=1) + "\n")
    if not args.quick:
        write_report(args.results, args.report)
        print(f"wrote {args.report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
