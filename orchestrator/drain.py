"""Graceful shutdown of the Realtime server: what a SIGTERM does to live sessions.

A rolling update or a scale-down must not cut anyone mid-sentence. On SIGTERM
(``stages.common.service.serve`` drives it): /readyz answers 503 "draining" and new
sessions are refused (``server_draining``), so traffic moves to other replicas at once;
each live session is closed at its next idle moment — no user turn being spoken or
finished, no reply being generated or still playing at the client — with an ``error``
event ``server_draining`` and close 1012, and its client resumes it on another replica
with ``session_id`` + ``resume_token`` (every item is in the shared store). Sessions still
busy when ``drain_timeout_s`` runs out are closed the same way; then the process exits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from orchestrator.metrics import SESSIONS_DRAINED

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often idleness is checked: a session's turn state has no event for it


@runtime_checkable
class Drainable(Protocol):
    """What draining needs of a session (``orchestrator.realtime.RealtimeSession``)."""

    @property
    def idle(self) -> bool: ...

    async def end_for_drain(self) -> None: ...


async def drain_sessions(sessions: Callable[[], Iterable[object]], timeout_s: float,
                         *, poll_s: float = POLL_S) -> int:
    """Close every session from ``sessions()`` at its next idle moment, the rest at the
    deadline. Returns how many were closed at the deadline (busy until then)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    ended: set[int] = set()
    ending: list[asyncio.Task[None]] = []

    def end(session: Drainable, when: str) -> None:
        ended.add(id(session))
        SESSIONS_DRAINED.labels(when).inc()
        ending.append(loop.create_task(session.end_for_drain()))

    while True:
        pending = [s for s in sessions() if isinstance(s, Drainable) and id(s) not in ended]
        if loop.time() >= deadline:
            for session in pending:
                end(session, "deadline")
            if pending:
                log.info("drain timeout: closing %d busy sessions", len(pending))
            await asyncio.gather(*ending, return_exceptions=True)
            return len(pending)
        for session in pending:
            if session.idle:
                end(session, "idle")
        if all(id(s) in ended for s in pending):  # no new sessions come while draining
            await asyncio.gather(*ending, return_exceptions=True)
            return 0
        await asyncio.sleep(poll_s)
