"""One session's ordered input when it has several sources: a WebRTC call's data channel,
its sideband WebSockets and its inbound audio track all feed one bounded queue, and a
single task hands each item to the session in arrival order (the session core is never
entered by two tasks at once).

Bounded both ways: an event that does not fit is refused (the caller answers it with an
``error`` event); an audio frame that does not fit is dropped and counted, since audio
that arrives late is worth less than audio that arrives now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import numpy as np
import numpy.typing as npt

from orchestrator.metrics import INBOX_DROPPED

log = logging.getLogger(__name__)


class InboxTarget(Protocol):
    async def handle(self, raw: str | bytes) -> None: ...

    async def push_audio(self, samples: npt.NDArray[np.int16], rate: int) -> None: ...


_Item = tuple[str | bytes, None] | tuple[npt.NDArray[np.int16], int]


class Inbox:
    def __init__(self, target: InboxTarget, max_items: int = 256) -> None:
        self._target = target
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(max_items)
        self._task: asyncio.Task[None] | None = None
        self.dropped_audio = 0

    def start(self, name: str = "inbox") -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    def put_event(self, raw: str | bytes) -> bool:
        """Queue one client event; False when the inbox is full (refuse it)."""
        try:
            self._queue.put_nowait((raw, None))
        except asyncio.QueueFull:
            INBOX_DROPPED.labels("event").inc()
            return False
        return True

    def put_audio(self, samples: npt.NDArray[np.int16], rate: int) -> bool:
        """Queue one audio frame; False (dropped) when the inbox is full."""
        try:
            self._queue.put_nowait((samples, rate))
        except asyncio.QueueFull:
            self.dropped_audio += 1
            INBOX_DROPPED.labels("audio").inc()
            return False
        return True

    async def _run(self) -> None:
        while True:
            item, rate = await self._queue.get()
            try:
                if rate is None:
                    assert isinstance(item, str | bytes)
                    await self._target.handle(item)
                else:
                    assert isinstance(item, np.ndarray)
                    await self._target.push_audio(item, rate)
            except Exception:  # the session answers bad input itself; this is a bug
                log.exception("inbox: an item failed")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
