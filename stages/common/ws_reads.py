"""uvicorn's sans-I/O WebSocket protocol, with reads paused only when messages pile up.

Upstream pauses the socket's reads after every message it queues for the app and resumes
them when the app takes it: two ``epoll_ctl`` calls and a selector update per message. A
Realtime session sends an audio append every 20 ms, so that flow control was about a tenth
of an orchestrator's event-loop time under load (profiled at 20 sessions). Here reads go
on while the app keeps up, and pause once ``max_queued_messages`` messages or
``max_queued_bytes`` bytes wait for it (then resume when it has taken half of them): the
queue stays bounded, and a client that floods a session that cannot keep up is still
stopped by TCP back-pressure. One socket read (at most 256 KiB) is parsed whole, so the
queue may exceed the bounds by what that read completes.

The services run it with ``ws_per_message_deflate=False``: compressing every 20 ms audio
event costs CPU on both ends for little gain (base64 audio barely compresses), and with
compression one small read can inflate to many megabytes of queued messages.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class QueuedReadsProtocol(WebSocketsSansIOProtocol):
    """``ws=`` protocol class for ``uvicorn.Config``: reads paused by queue depth."""

    max_queued_messages = 64
    max_queued_bytes = 1 << 20

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sizes: deque[int] = deque()  # of each queued message, in order
        self._queued_bytes = 0

    def send_receive_event_to_app(self) -> None:
        size = sum(map(len, self.frames))
        before = self.queue.qsize()
        paused, self.read_paused = self.read_paused, True  # upstream: pause after each
        try:
            super().send_receive_event_to_app()
        finally:
            self.read_paused = paused
        if self.queue.qsize() > before:
            self._sizes.append(size)
            self._queued_bytes += size
        if not self.read_paused and not self.close_sent and (
                self.queue.qsize() >= self.max_queued_messages
                or self._queued_bytes >= self.max_queued_bytes):  # past close: keep reading
            self.read_paused = True
            self.transport.pause_reading()

    async def receive(self) -> Any:
        message = await self.queue.get()
        if message["type"] == "websocket.receive" and self._sizes:
            self._queued_bytes -= self._sizes.popleft()
        if (self.read_paused and self.queue.qsize() <= self.max_queued_messages // 2
                and self._queued_bytes <= self.max_queued_bytes // 2):
            self.read_paused = False
            self.transport.resume_reading()
        return message
