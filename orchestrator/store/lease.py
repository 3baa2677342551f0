"""Holding a session's lease for the life of a connection.

A connection takes the lease when it opens (or resumes) a session and renews it every
``lease_ttl_s / 3`` seconds, so two renewals may fail before the lease lapses. When the
process dies the renewals stop, the lease expires after ``lease_ttl_s`` and another
process may resume the session. A renewal that finds the lease gone or taken over sets
``lost`` (and stops renewing): the connection must then stop writing and close, because a
newer connection now owns the conversation. The store enforces that: a write made with
``owner=`` is refused with ``LeaseLost`` once the lease is not that owner's, even before
the keeper notices. Transient store outages are retried until the lease would have
expired anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import TracebackType

from orchestrator.store.errors import LeaseLost, SessionNotFound, StoreUnavailable
from orchestrator.store.interface import SessionStore

log = logging.getLogger(__name__)


class LeaseKeeper:
    """``async with LeaseKeeper(store, sid, owner, ttl_s):`` renews in the background.

    Enter does not acquire the lease: take it with ``resume(owner=...)``,
    ``create_session(owner=...)`` or ``acquire_lease`` first. Exit releases it."""

    def __init__(self, store: SessionStore, session_id: str, owner: str,
                 lease_ttl_s: float) -> None:
        self.store = store
        self.session_id = session_id
        self.owner = owner
        self.interval_s = lease_ttl_s / 3
        self.lease_ttl_s = lease_ttl_s
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LeaseKeeper:
        self._task = asyncio.create_task(self._renew_loop(), name=f"lease-{self.session_id}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop(release=True)

    async def stop(self, *, release: bool) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if release and not self.lost.is_set():
            with contextlib.suppress(StoreUnavailable, SessionNotFound):
                await self.store.release_lease(self.session_id, self.owner)

    async def _renew_loop(self) -> None:
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.store.renew_lease(self.session_id, self.owner)
                last_ok = time.monotonic()
            except (LeaseLost, SessionNotFound) as exc:
                log.warning("session %s: lease lost (%s)", self.session_id, exc)
                self.lost.set()
                return
            except StoreUnavailable as exc:
                if time.monotonic() - last_ok >= self.lease_ttl_s:
                    log.warning("session %s: lease lapsed, store unreachable (%s)",
                                self.session_id, exc)
                    self.lost.set()
                    return
