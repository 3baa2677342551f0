"""Where one orchestrator process spends its time under load: py-spy on a live rig.

    python -m benchmarks.reliability.profile [--sessions 20] [--seconds 20] [--raw FILE]

The same rig as the load part (``cascade serve`` on fake stages, pinned to its own core
where there are two or more; ``CASCADE_LOAD_PIN=0``: not) carries ``--sessions`` talking
sessions from ``loadgen.py``; after a warm-up py-spy (the ``bench`` extra) samples every
thread of the orchestrator for ``--seconds``. Printed: the orchestrator's CPU and
event-loop lag over the window, each thread's share of the samples, and the event loop's
time as a tree of what it ran (callbacks and tasks, then their callees), down to
``--min-percent``. ``--raw`` keeps py-spy's collapsed stacks (one per line, ``;``-joined
frames and a count) for other tools, such as a flame-graph renderer.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from benchmarks.reliability.load import cpu_split
from benchmarks.reliability.loadgen import LoadGen
from benchmarks.reliability.procs import CpuMeter, Rig

_PATH = re.compile(r" \(([^)]*/)?([^/)]+?)(:\d+)?\)$")
# Where what the event loop runs (a callback or a task step) starts in a stack: asyncio's
# loop calls it from Handle._run; uvloop's C loop leaves no frame between the runner's
# and the callback's own.
_ENTRIES = ("Handle._run (events.py)", "Runner.run (runners.py)")

class Node:
    """A call-tree node: samples spent in it (and below), its callees by name."""

    def __init__(self) -> None:
        self.samples = 0
        self.children: dict[str, Node] = {}

    def render(self, total: int, min_percent: float, depth: int = 0) -> list[str]:
        out: list[str] = []
        for name, child in sorted(self.children.items(), key=lambda kv: -kv[1].samples):
            share = 100.0 * child.samples / max(1, total)
            if share >= min_percent:
                out.append(f"{'  ' * depth}{share:5.1f}% {name}")
                out += child.render(total, min_percent, depth + 1)
        return out


def frame_name(frame: str) -> str:
    """``func (/long/path/file.py:12)`` -> ``func (file.py)``."""
    return _PATH.sub(r" (\2)", frame)


def main_thread_tree(raw: str) -> tuple[Counter[str], Node]:
    """(samples per thread, the main thread's call tree from what the loop ran)."""
    threads: Counter[str] = Counter()
    root = Node()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        threads[re.sub(r"\s*\(\d+\)", "", frames[0]).strip()] += n
        if "MainThread" not in frames[0]:
            continue
        root.samples += n
        names = [frame_name(f) for f in frames[1:]]
        starts = [i for i, name in enumerate(names) if name in _ENTRIES]
        path = names[starts[-1] + 1:] if starts else []
        path = path or ["(the loop itself)"]
        node = root
        for name in path[:12]:
            node = node.children.setdefault(name, Node())
            node.samples += n
    return threads, root


def find_py_spy() -> str:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed: pip install 'cascade[bench]'")
    return spy


async def profile(spy: str, sessions: int, seconds: float, raw_path: Path,
                  warmup_s: float) -> str:
    """Samples the loaded orchestrator into ``raw_path``; returns the run's headline."""
    orch_cpus, other_cpus = cpu_split()
    rig = Rig(orchestrator_cpus=orch_cpus, others_cpus=other_cpus)
    try:
        await rig.start(max_sessions=sessions + 20)
        assert rig.orch is not None
        gen = LoadGen(rig.ws_url, seed=13)
        try:
            await gen.add(sessions, spread_s=min(5.0, 0.05 * sessions))
            await asyncio.sleep(warmup_s)
            gen.reset()
            meter = CpuMeter(rig.orch.pid)
            meter.start()
            before = await rig.scrape()
            proc = await asyncio.create_subprocess_exec(
                spy, "record", "--pid", str(rig.orch.pid), "--duration", str(int(seconds)),
                "--rate", "100", "--threads", "--format", "raw", "--output", str(raw_path),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
            after = await rig.scrape()
            stats = gen.reset()
        finally:
            await gen.stop()
        lag = after.lag.since(before.lag)
        head = (f"{sessions} sessions, {seconds:.0f} s: orchestrator CPU {meter.read():.2f} "
                f"cores, loop lag p50 {lag.quantile(0.5) * 1000:.1f} / p99 "
                f"{lag.quantile(0.99) * 1000:.1f} ms, turns {stats.answered}/"
                f"{stats.answered + stats.unanswered} answered, pinned {rig.pinned}")
    finally:
        await rig.stop()
    return head


def report(head: str, raw: str, min_percent: float) -> str:
    threads, tree = main_thread_tree(raw)
    all_samples = sum(threads.values())
    lines = [head, "", "samples per thread (idle waits included):"]
    lines += [f"  {100.0 * n / max(1, all_samples):5.1f}% {name}"
              for name, n in threads.most_common()]
    lines += ["", "the event loop (main thread), by what it ran:"]
    return "\n".join(lines + tree.render(tree.samples, min_percent))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability.profile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--min-percent", type=float, default=1.0)
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        raw = args.raw or Path(tmp) / "stacks.txt"
        head = asyncio.run(profile(find_py_spy(), args.sessions, args.seconds, raw,
                                   args.warmup))
        print(report(head, raw.read_text(), args.min_percent))


if __name__ == "__main__":
    main()
