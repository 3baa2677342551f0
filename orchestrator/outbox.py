"""One connection's outgoing events: a bounded queue drained by a single writer task, so
sends never interleave and the session never waits on the client. A client that reads
slower than its session produces fills the queue and is disconnected (close 1008)
instead of being buffered without bound: the queue is bounded in events and in bytes
(512 events of a 200 KB retrieved item would hold ~100 MB for one connection that stopped
reading). Transport-independent: the WebSocket and a
WebRTC call's data channel each give their own ``write`` and ``close``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from orchestrator.metrics import ERROR_EVENTS, REJECTED_CONNECTIONS
from orchestrator.protocol import ProtocolError, error_event

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
# Characters of queued events per connection (JSON is ASCII, so bytes): a live session
# queues a few KB (audio is paced at real time); a client this far behind is not reading.
MAX_QUEUED_CHARS = 8 * 1024 * 1024


def error_json(code: str, message: str, type: str = "invalid_request_error") -> str:
    """One Realtime ``error`` event frame (same shape in the GA and beta dialects);
    counted."""
    ERROR_EVENTS.labels(code).inc()
    return error_event(ProtocolError(code, message, type=type)).to_json()


class Outbox:
    """The single writer of one connection: a bounded queue of text frames.

    ``write`` sends one frame (a WebSocket's ``send_text``, a data channel's send);
    ``close`` ends the connection with a code and reason once the queue is flushed."""

    def __init__(self, write: Callable[[str], Awaitable[None]],
                 close: Callable[[int, str], Awaitable[None]], max_events: int,
                 close_timeout_s: float, max_chars: int = MAX_QUEUED_CHARS) -> None:
        self._write = write
        self._close = close
        self._queue: asyncio.Queue[str] = asyncio.Queue(max_events)
        self._max_chars = max_chars
        self.queued_chars = 0  # in the queue, not yet handed to ``write``
        self._timeout = close_timeout_s
        self.closing = asyncio.Event()  # no more sends; the connection is ending
        self.close_code = CLOSE_NORMAL
        self.close_reason = ""
        self._gone = False  # the peer is gone: no close frame to send
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._finishing: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="realtime-writer")

    async def send(self, text: str) -> None:
        """Queue one event; never waits on the client. Dropped once the connection ends."""
        if self.closing.is_set():
            return
        # One event larger than the bound still goes out when nothing waits before it.
        too_much = self.queued_chars + len(text) > self._max_chars and self.queued_chars > 0
        try:
            if too_much:
                raise asyncio.QueueFull
            self._queue.put_nowait(text)
        except asyncio.QueueFull:
            REJECTED_CONNECTIONS.labels("slow_client").inc()
            log.warning("client too slow: %d events (%d chars) queued; closing",
                        self._queue.qsize(), self.queued_chars)
            self.abort(CLOSE_POLICY, "client is not reading events fast enough")
            return
        self.queued_chars += len(text)

    def abort(self, code: int, reason: str) -> None:
        """End now: queued events are dropped, the close frame follows."""
        if self.closing.is_set():
            return
        self.close_code, self.close_reason = code, reason
        self.closing.set()
        if self._writer is not None:
            self._writer.cancel()
        while not self._queue.empty():  # freed now, not when the connection is gone
            self._queue.get_nowait()
            self._queue.task_done()
        self.queued_chars = 0

    async def _write_loop(self) -> None:
        try:
            while True:
                text = await self._queue.get()
                self.queued_chars -= len(text)
                await self._write(text)
                self._queue.task_done()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the peer went away (ClientDisconnected, closed state)
            log.debug("writer stopped: %r", exc)
            self._gone = True
            self.closing.set()

    def close_soon(self, code: int, reason: str) -> None:
        """The session ends the connection: what it queued is flushed, then ``code``."""
        if self._finishing is None:
            self._finishing = asyncio.get_running_loop().create_task(
                self.finish(code, reason), name="realtime-close")

    async def finish(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Flush what is queued (bounded by the close timeout), then close with ``code``
        unless the connection is already ending with its own code. Idempotent."""
        if self._closed:
            finishing = self._finishing
            if finishing is not None and finishing is not asyncio.current_task():
                await asyncio.shield(finishing)
            return
        self._closed = True
        if not self.closing.is_set():
            flushed = asyncio.create_task(self._queue.join())
            ended = asyncio.create_task(self.closing.wait())
            await asyncio.wait({flushed, ended}, timeout=self._timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            flushed.cancel()
            ended.cancel()
            if not self.closing.is_set():
                self.close_code, self.close_reason = code, reason
                self.closing.set()
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        if not self._gone:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self._close(self.close_code, self.close_reason), self._timeout
                )
