"""Event-loop lag and leak-counting gauges, sampled by one light task per process.

The probe sleeps ``interval_s`` and records how much later than asked it woke up: the
time the loop spent running other callbacks, which every session's 20 ms frames and paced
audio wait behind as well (``cascade_event_loop_lag_seconds``; the last second's worst in
``cascade_event_loop_lag_max_seconds``). Once a second it also counts the loop's asyncio
tasks (``cascade_asyncio_tasks``); open sockets (``cascade_open_sockets``) are counted from
``/proc/self/fd`` when /metrics is scraped. prometheus_client's process collector already
exports ``process_open_fds`` and ``process_resident_memory_bytes``. Cost: 20 timer wakeups
a second and one ``all_tasks()`` a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from orchestrator.metrics import ASYNCIO_TASKS, EVENT_LOOP_LAG, EVENT_LOOP_LAG_MAX, OPEN_SOCKETS

_FD_DIR = "/proc/self/fd"


def count_sockets(fd_dir: str = _FD_DIR) -> int:
    """File descriptors of this process that are sockets (-1 where /proc is missing)."""
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return -1
    count = 0
    for name in names:
        with contextlib.suppress(OSError):  # closed between the listing and the read
            if os.readlink(os.path.join(fd_dir, name)).startswith("socket:"):
                count += 1
    return count


OPEN_SOCKETS.set_function(lambda: float(count_sockets()))


class LoopLagMonitor:
    def __init__(self, interval_s: float = 0.05, tasks_every_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.tasks_every_s = tasks_every_s
        self._task: asyncio.Task[None] | None = None
        self.samples = 0
        self.worst_s = 0.0  # since start

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def _run(self) -> None:
        clock = time.monotonic
        window_end = clock() + self.tasks_every_s
        window_max = 0.0
        while True:
            before = clock()
            await asyncio.sleep(self.interval_s)
            now = clock()
            lag = max(0.0, now - before - self.interval_s)
            EVENT_LOOP_LAG.observe(lag)
            self.samples += 1
            window_max = max(window_max, lag)
            self.worst_s = max(self.worst_s, lag)
            if now >= window_end:
                EVENT_LOOP_LAG_MAX.set(window_max)
                ASYNCIO_TASKS.set(len(asyncio.all_tasks()))
                window_max = 0.0
                window_end = now + self.tasks_every_s

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
