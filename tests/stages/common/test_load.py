"""WorkMeter: queued / running / busy accounting of work handed to a thread pool."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from stages.common.load import StageLoad, WorkMeter


async def test_counts_queued_then_running_then_busy() -> None:
    meter = WorkMeter(workers=1, window_s=60.0)
    release = threading.Event()
    started = threading.Event()

    def job() -> int:
        started.set()
        release.wait(10)
        return 7

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as pool:
        first = loop.run_in_executor(pool, meter.wrap(job))
        second = loop.run_in_executor(pool, meter.wrap(job))
        assert await asyncio.to_thread(started.wait, 10)
        # One runs on the only worker, the other waits for it.
        assert meter.running == 1 and meter.queued == 1
        release.set()
        assert await first == 7 and await second == 7
    assert meter.running == 0 and meter.queued == 0
    assert 0.0 < meter.busy() <= 1.0


def test_busy_fraction_is_windowed_and_shared_by_workers() -> None:
    meter = WorkMeter(workers=2, window_s=1.0)
    meter.wrap(time.sleep)(0.05)
    end = time.monotonic()
    busy_now = meter.busy(now=end)
    # 50 ms of one worker out of 2 workers x 1 s, give or take scheduling.
    assert 0.02 <= busy_now <= 0.1
    assert meter.busy(now=end + 5.0) == 0.0  # slid out of the window, and forgotten
    assert meter.busy(now=end) == 0.0


def test_failing_work_is_still_accounted() -> None:
    meter = WorkMeter()

    def boom() -> None:
        raise ValueError("x")

    with pytest.raises(ValueError):
        meter.wrap(boom)()
    assert meter.running == 0 and meter.queued == 0 and meter.busy() > 0.0


def test_load_score_orders_replicas() -> None:
    idle = StageLoad(stage="asr", ready=True, active=0, queued=0, capacity=4, busy=0.0)
    half = StageLoad(stage="asr", ready=True, active=2, queued=0, capacity=4, busy=0.3)
    full = StageLoad(stage="asr", ready=True, active=4, queued=2, capacity=4, busy=1.0)
    assert idle.score < half.score < full.score
    assert full.full and not half.full
    assert StageLoad(stage="asr", ready=False, active=0, queued=0, capacity=4, busy=0).full
