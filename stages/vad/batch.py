"""Silero VAD batched across the streams of one process.

One frame at a time, the model costs a fixed overhead per ``InferenceSession.run`` that
dwarfs the arithmetic of a 512-sample frame; with hundreds of sessions in one orchestrator
those per-frame runs on the event loop were its largest cost. The model takes a batch
(``input`` [B, 576], ``state`` [2, B, 128]) and gives each row exactly what a run of that
row alone gives, so frames from many streams are run together:

``VadBatcher.infer(window, state)`` queues one frame and awaits its result. While no batch
is running, the queue is handed, ``gather_s`` (2 ms) after its first frame, to one worker
thread (onnxruntime releases the GIL, so the event loop goes on meanwhile); frames that
arrive while a batch runs form the next batch. The short gathering delay spares a thread
hand-off per frame (it cost more than the inference of one frame). Where the process may
run on one CPU only, a batch of at most ``inline_max`` frames (light load) runs on the loop
at once, as before batching: a thread would only add its hand-off. With more CPUs every
batch goes to the thread (``inline_max`` 0): the event loop, the process's bottleneck,
pays a hand-off of ~25 us instead of the ~300 us run. Under heavy load batches grow by
themselves, up to ``max_batch``.

``BatchedVadStream`` is ``VadStream`` with ``process_async``, its frames run through a
batcher; ``batcher_for(model)`` gives the batcher of a model on the running loop.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from stages.vad.model import SileroVadModel
from stages.vad.stream import AudioInput, VadFrame, VadStream

FloatArray = npt.NDArray[np.float32]
_Entry = tuple[FloatArray, FloatArray, "asyncio.Future[tuple[float, FloatArray]]"]


def default_inline_max() -> int:
    """2 where this process may use one CPU only (its affinity), else 0 (see above)."""
    return 2 if len(os.sched_getaffinity(0)) <= 1 else 0


class VadBatcher:
    """Runs the frames of many streams of one model in batches, on one worker thread."""

    def __init__(self, model: SileroVadModel, max_batch: int = 256,
                 gather_s: float = 0.002, inline_max: int | None = None) -> None:
        self.model = model
        self.max_batch = max_batch
        self.gather_s = gather_s
        self.inline_max = default_inline_max() if inline_max is None else inline_max
        self._pending: list[_Entry] = []
        self._running = False
        self._scheduled: asyncio.TimerHandle | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vad-batch")
        self.batches = 0
        self.frames = 0

    async def infer(self, window: FloatArray, state: FloatArray) -> tuple[float, FloatArray]:
        """p(speech) of one window and the stream's next state, as ``model.infer``. The
        window is copied: the caller may reuse its buffer at once."""
        future: asyncio.Future[tuple[float, FloatArray]] = (
            asyncio.get_running_loop().create_future())
        self._pending.append((window.copy(), state, future))
        if not self._running and self._scheduled is None:
            self._scheduled = asyncio.get_running_loop().call_later(self.gather_s, self._start)
        return await future

    def _start(self) -> None:
        self._scheduled = None
        batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
        if len(batch) <= self.inline_max:  # light load: a thread hand-off costs more
            done: asyncio.Future[tuple[FloatArray, FloatArray]] = (
                asyncio.get_running_loop().create_future())
            try:
                done.set_result(self._run([e[0] for e in batch], [e[1] for e in batch]))
            except Exception as exc:
                done.set_exception(exc)
            self._running = True
            self._finish(batch, done)
            return
        self._running = True
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._pool, self._run, [e[0] for e in batch],
                                   [e[1] for e in batch])
        job.add_done_callback(lambda done: self._finish(batch, done))

    def _run(self, windows: list[FloatArray], states: list[FloatArray]
             ) -> tuple[FloatArray, FloatArray]:
        return self.model.infer_batch(np.stack(windows), np.concatenate(states, axis=1))

    def _finish(self, batch: list[_Entry],
                done: asyncio.Future[tuple[FloatArray, FloatArray]]) -> None:
        self._running = False
        self.batches += 1
        self.frames += len(batch)
        error = done.exception() if not done.cancelled() else asyncio.CancelledError()
        if error is None:
            probs, states = done.result()
            for i, (_w, _s, future) in enumerate(batch):
                if not future.done():
                    future.set_result((float(probs[i, 0]), states[:, i:i + 1, :]))
        else:
            for _w, _s, future in batch:
                if not future.done():
                    future.set_exception(error)
        if self._pending:
            self._start()

    def close(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


_BATCHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                     dict[int, VadBatcher]] = weakref.WeakKeyDictionary()


def batcher_for(model: SileroVadModel) -> VadBatcher:
    """The batcher of ``model`` on the running loop (made on first use)."""
    per_loop = _BATCHERS.setdefault(asyncio.get_running_loop(), {})
    batcher = per_loop.get(id(model))
    if batcher is None or batcher.model is not model:
        batcher = per_loop[id(model)] = VadBatcher(model)
    return batcher


class BatchedVadStream(VadStream):
    """A ``VadStream`` whose frames go through a ``VadBatcher``: same frames, same
    probabilities, ``await stream.process_async(audio)`` instead of ``process``."""

    def __init__(self, batcher: VadBatcher) -> None:
        super().__init__(batcher.model)
        self._batcher = batcher

    async def process_async(self, audio: AudioInput) -> list[VadFrame]:
        frames: list[VadFrame] = []
        for window in self._windows(audio):
            prob, self._state = await self._batcher.infer(window, self._state)
            frames.append(self._frame_done(prob))
        return frames
