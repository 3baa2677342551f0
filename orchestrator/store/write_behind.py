"""One session's store writes, applied in order by one task, off the reply's critical path.

A voice turn writes twice between the endpoint and the first audio: the user's item at
``speech_stopped`` and the assistant's item when its reply opens. Awaiting those writes
there puts a store round trip (a Redis call, or a Redis that is slow for a moment) on every
turn's latency for nothing: the connection's own copy of the conversation
(``RealtimeSession.items``) is what the reply reads, and the store only has to hold the
same items by the time another connection could resume the session.

So the session hands its writes to a ``WriteBehind``: ``put`` queues a write and returns at
once; one task applies the queue in order. Guarantees:
- **Order.** One writer, FIFO: an item is stored before the write that names it as
  ``previous_item_id`` or updates it. A write whose errors the client must see at once
  (``conversation.item.create``/``delete``) goes through ``run``: it is queued like the
  others (so it comes after them) and its caller waits for its own result.
- **Bounded.** At most ``max_pending`` writes wait; ``put`` waits for room beyond that
  (back-pressure, not memory growth). A live session queues a few writes per turn.
- **Nothing lost on a clean close.** ``drain`` applies what is queued; the session calls it
  before releasing its lease. A crash loses what was queued and not yet applied: the
  writes of the last few milliseconds.
- **Never half-applied.** Each store write is atomic. ``StoreUnavailable`` is retried
  (``retry_delays_s``) with the same write; an append that did land before the connection
  dropped is recognised by ``ItemExists`` on its retry. ``LeaseLost`` stops the writer
  and drops the queue: another connection owns the session, and the store refuses our
  writes anyway (``on_lease_lost`` closes the session). Any other error is reported through
  ``on_error`` (the client's ``error`` event) and the writer goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from orchestrator.store.errors import (
    ItemExists,
    LeaseLost,
    StoreClosed,
    StoreError,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

Write = Callable[[], Awaitable[Any]]


class _Job:
    __slots__ = ("done", "what", "write")

    def __init__(self, write: Write, what: str, done: asyncio.Future[Any] | None) -> None:
        self.write = write
        self.what = what
        self.done = done  # set for ``run``: its caller waits for the result


class WriteBehind:
    def __init__(self, session_id: str, *,
                 on_lease_lost: Callable[[], None],
                 on_error: Callable[[str, StoreError], Awaitable[None]],
                 max_pending: int = 256,
                 retry_delays_s: tuple[float, ...] = (0.1, 0.5, 2.0)) -> None:
        self.session_id = session_id
        self._on_lease_lost = on_lease_lost
        self._on_error = on_error
        self._retry_delays_s = retry_delays_s
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_pending)
        self._task: asyncio.Task[None] | None = None
        self._stopped = False  # the lease is lost (or the writer closed): nothing more applies
        self._pending = 0
        self.applied = 0  # writes stored

    @property
    def pending(self) -> int:
        """Writes queued and not yet applied (the one being applied included)."""
        return self._pending

    async def put(self, write: Write, what: str) -> None:
        """Queue ``write`` (a store call); returns once it is queued, not applied."""
        if self._stopped:
            raise LeaseLost(f"session {self.session_id}: no longer ours, {what} not stored")
        await self._enqueue(_Job(write, what, None))

    async def run(self, write: Write, what: str) -> Any:
        """Apply ``write`` after everything queued before it; its result or its error."""
        if self._stopped:
            raise LeaseLost(f"session {self.session_id}: no longer ours, {what} not stored")
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._enqueue(_Job(write, what, done))
        return await done

    async def _enqueue(self, job: _Job) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._work(), name=f"store-writes-{self.session_id}")
        self._pending += 1
        try:
            await self._queue.put(job)
        except BaseException:
            self._pending -= 1  # cancelled while waiting for room: never queued
            raise

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every queued write is applied (or dropped); False on timeout."""
        if self._task is None:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await self._queue.join()
        except TimeoutError:
            log.warning("session %s: %d store writes still queued after %.1f s", self.session_id,
                        self._queue.qsize(), timeout_s)
            return False
        return True

    async def aclose(self) -> None:
        """Stop the writer; whatever is still queued is dropped (``drain`` first)."""
        self._stopped = True
        self._drop_queued()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                result = await self._apply(job)
            except LeaseLost as exc:
                self._fail(job, exc)
                self._stopped = True
                self._drop_queued()
                self._on_lease_lost()
            except StoreError as exc:
                self._fail(job, exc)
                if job.done is None:  # a caller of ``run`` reports its own error
                    log.warning("session %s: %s not stored: %r", self.session_id, job.what, exc)
                    await self._on_error(job.what, exc)
            except Exception as exc:  # a bug in a write: report it, keep the writer alive
                log.exception("session %s: %s failed", self.session_id, job.what)
                self._fail(job, exc)
            else:
                self.applied += 1
                if job.done is not None and not job.done.done():
                    job.done.set_result(result)
            finally:
                self._done()

    async def _apply(self, job: _Job) -> Any:
        delays = iter(self._retry_delays_s)
        retried = False
        while True:
            try:
                return await job.write()
            except ItemExists:
                if retried:  # the first attempt landed before its answer was lost
                    return None
                raise
            except StoreClosed:
                raise
            except StoreUnavailable:
                delay = next(delays, None)
                if delay is None:
                    raise
                retried = True
                await asyncio.sleep(delay)

    @staticmethod
    def _fail(job: _Job, exc: BaseException) -> None:
        if job.done is not None and not job.done.done():
            job.done.set_exception(exc)

    def _drop_queued(self) -> None:
        while not self._queue.empty():
            job = self._queue.get_nowait()
            self._fail(job, LeaseLost(f"session {self.session_id}: no longer ours, "
                                      f"{job.what} not stored"))
            self._done()

    def _done(self) -> None:
        self._pending -= 1
        self._queue.task_done()
