"""How loaded a stage replica is: the figure the orchestrator routes by and autoscalers read.

Every stage service answers ``GET /load`` with a ``StageLoad`` (also inside ``/readyz``) and
exports the same numbers as Prometheus gauges (``cascade_stage_*{stage}``). ``WorkMeter``
measures the two figures a count of streams cannot give: how much inference work waits for
a worker (``queued``) and which fraction of the workers' time was spent computing over the
last few seconds (``busy``), so a replica whose few streams are expensive still looks busy.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from pydantic import BaseModel, Field

P = ParamSpec("P")
R = TypeVar("R")


class StageLoad(BaseModel):
    """One replica's load, as ``GET /load`` reports it."""

    stage: str
    ready: bool
    # Streams (ASR/TTS WebSockets) or requests (LLM generations) open now.
    active: int = Field(ge=0)
    # Inference work waiting for a worker (decodes, phrases, requests without a slot).
    queued: int = Field(ge=0)
    # New streams beyond ``capacity`` are refused (HTTP 503 / WebSocket handshake 503).
    capacity: int = Field(ge=1)
    # Fraction of the inference workers' time spent computing over the last window.
    busy: float = Field(ge=0.0, le=1.0)

    @property
    def score(self) -> float:
        """The routing figure (lower is less loaded): occupancy of the stream capacity,
        plus waiting work, plus a tie-breaking share of the measured busy fraction."""
        return (self.active + self.queued) / self.capacity + 0.5 * self.busy

    @property
    def full(self) -> bool:
        return not self.ready or self.active >= self.capacity


class WorkMeter:
    """Counts work handed to a pool of ``workers`` threads: queued, running, busy fraction.

    ``loop.run_in_executor(pool, meter.wrap(fn), *args)``: ``wrap`` counts the job as
    queued when it is submitted; the returned callable moves it to running when a worker
    picks it up and records its busy interval when it ends. Thread-safe; memory is bounded
    (the intervals of the last ``window_s`` seconds, at most ``max_intervals``).
    """

    def __init__(self, workers: int = 1, window_s: float = 5.0,
                 max_intervals: int = 4096) -> None:
        self.workers = max(1, workers)
        self.window_s = window_s
        self._lock = threading.Lock()
        self._queued = 0
        self._running: dict[int, float] = {}  # job id -> start time
        self._done: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=max_intervals)
        self._ids = 0

    def wrap(self, fn: Callable[P, R]) -> Callable[P, R]:
        with self._lock:
            self._queued += 1
            self._ids += 1
            job = self._ids

        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with self._lock:
                self._queued -= 1
                self._running[job] = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    start = self._running.pop(job)
                    self._done.append((start, time.monotonic()))

        return run

    @property
    def queued(self) -> int:
        with self._lock:
            return self._queued

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def busy(self, now: float | None = None) -> float:
        """Busy fraction of the workers over the last ``window_s`` seconds (0..1)."""
        now = time.monotonic() if now is None else now
        since = now - self.window_s
        with self._lock:
            while self._done and self._done[0][1] <= since:
                self._done.popleft()
            spent = sum(end - max(start, since) for start, end in self._done)
            spent += sum(now - max(start, since) for start in self._running.values())
        return min(1.0, max(0.0, spent / (self.window_s * self.workers)))
