"""The event-loop lag probe sees a blocked loop, and the leak-counting gauges count."""

from __future__ import annotations

import asyncio
import socket
import time

from prometheus_client import REGISTRY

from orchestrator.loop_lag import LoopLagMonitor, count_sockets


def _sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_blocking_the_loop_shows_as_lag() -> None:
    monitor = LoopLagMonitor(interval_s=0.01, tasks_every_s=0.05)
    before_slow = _sample("cascade_event_loop_lag_seconds_bucket", le="0.1")
    before_all = _sample("cascade_event_loop_lag_seconds_count")
    monitor.start()
    await asyncio.sleep(0.05)
    time.sleep(0.15)  # noqa: ASYNC251 (on purpose: the loop is stuck, the probe wakes ~150 ms late)
    await asyncio.sleep(0.1)
    await monitor.stop()
    assert monitor.samples >= 5
    assert 0.12 <= monitor.worst_s < 1.0
    observed = _sample("cascade_event_loop_lag_seconds_count") - before_all
    under_100ms = _sample("cascade_event_loop_lag_seconds_bucket", le="0.1") - before_slow
    assert observed == monitor.samples
    assert under_100ms == observed - 1  # exactly the one stalled probe was slow
    assert _sample("cascade_asyncio_tasks") >= 1


async def test_sockets_are_counted() -> None:
    before = count_sockets()
    pair = socket.socketpair()
    try:
        assert count_sockets() == before + 2
        assert _sample("cascade_open_sockets") == before + 2
    finally:
        for s in pair:
            s.close()
    assert count_sockets() == before
