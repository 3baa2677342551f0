"""Draining live sessions on SIGTERM (``orchestrator/drain.py``): deterministic timing of
who is closed when. The real process path is in test_replica_failover.py (e)."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.drain import drain_sessions


class FakeSession:
    def __init__(self, name: str, idle: bool, log: list[tuple[str, float]]) -> None:
        self.name = name
        self.idle = idle
        self._log = log

    async def end_for_drain(self) -> None:
        self._log.append((self.name, asyncio.get_running_loop().time()))


@pytest.mark.asyncio
async def test_idle_sessions_close_at_once_busy_ones_when_idle_or_at_the_deadline() -> None:
    log: list[tuple[str, float]] = []
    idle = FakeSession("idle", True, log)
    later = FakeSession("later", False, log)
    busy = FakeSession("busy", False, log)
    sessions: list[object] = [idle, later, busy, object()]  # not drainable: left alone
    loop = asyncio.get_running_loop()
    start = loop.time()
    loop.call_later(0.3, lambda: setattr(later, "idle", True))
    left = await drain_sessions(lambda: sessions, 1.0, poll_s=0.02)
    when = {name: t - start for name, t in log}
    assert [name for name, _ in log] == ["idle", "later", "busy"]
    assert when["idle"] < when["later"]
    assert 0.3 <= when["later"] < 1.0  # when it went idle, before the deadline
    assert when["busy"] >= 1.0  # busy throughout: closed at the deadline
    assert left == 1


@pytest.mark.asyncio
async def test_drain_returns_as_soon_as_everyone_is_closed() -> None:
    log: list[tuple[str, float]] = []
    sessions = [FakeSession("a", True, log), FakeSession("b", True, log)]
    left = await asyncio.wait_for(drain_sessions(lambda: sessions, 30.0, poll_s=0.02), 1.0)
    assert left == 0 and len(log) == 2


@pytest.mark.asyncio
async def test_a_session_is_closed_once() -> None:
    log: list[tuple[str, float]] = []
    sticky = FakeSession("s", False, log)
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, lambda: setattr(sticky, "idle", True))
    await drain_sessions(lambda: [sticky], 0.3, poll_s=0.01)
    assert [name for name, _ in log] == ["s"]
