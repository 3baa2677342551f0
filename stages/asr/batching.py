"""Cross-stream batched decoding (``batch_decodes=true``), meant for GPUs.

Every stream's window becomes a log-mel block of its context bucket (``decode.py``; a batch
is padded to its longest window's bucket), so the windows of different streams stack into
one batch:

1. ``decode()`` (called by a stream's decode loop, at most one pending per stream) appends
   the request to a list and wakes the batch task.
2. The batch task takes up to ``max_batch`` pending requests and runs one blocking job on the
   decode pool (``decode.decode_windows``): features per window, ONE ``encode`` of the stacked
   features, ONE ``model.model.generate`` with one prompt per stream (its committed text as
   previous-text context, then the no-timestamps SOT sequence), then ONE batched
   ``model.model.align`` (cross-attention DTW) for word timestamps.
3. Each request's future gets its own words back; requests that arrived meanwhile form the
   next batch — so under load the batch size grows by itself, and with one stream it
   degenerates to a plain decode.

Measured on the 2-core CPU box (tiny.en int8, 4 windows of 3 s, ``batch4_ms`` vs
``sequential4_ms`` in ``benchmarks/stages/asr.py``): 1.65-1.90 s batched vs 1.85-1.93 s
one by one (30 s contexts then), i.e. 0-15 %, within the shared box's noise: the CPU
encoder is compute-bound.
It is therefore off by default and meant for CUDA, where one batched encode costs about
as much as a single one. (Not measured on a GPU here.)
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from stages.asr.decode import decode_windows
from stages.asr.types import AsrWord
from stages.common.audio import Float32Array
from stages.common.load import WorkMeter
from stages.common.metrics import ASR_DECODE_SECONDS

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

    from stages.asr.settings import AsrSettings

_Request = tuple[Float32Array, str | None, str | None, "asyncio.Future[list[AsrWord]]"]


class DecodeBatcher:
    """Gathers concurrent decode requests of different streams into batches."""

    def __init__(self, model: WhisperModel, pool: ThreadPoolExecutor,
                 settings: AsrSettings, meter: WorkMeter | None = None) -> None:
        self._model = model
        self._pool = pool
        self._meter = meter or WorkMeter()
        self._max_batch = max(1, settings.max_batch)
        self._beam_size = settings.beam_size
        self._min_context_s = settings.min_context_s
        self._pending: list[_Request] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Requests not yet handed to the pool."""
        return len(self._pending)

    async def decode(self, audio: Float32Array, prompt: str | None, language: str | None,
                     kind: str) -> list[AsrWord]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[AsrWord]] = loop.create_future()
        self._pending.append((audio, prompt, language, fut))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            # One language per batch (the prompt's language token is shared).
            lang = self._pending[0][2]
            batch = [r for r in self._pending if r[2] == lang][: self._max_batch]
            for r in batch:
                self._pending.remove(r)
            try:
                with ASR_DECODE_SECONDS.labels("batch").time():
                    results = await loop.run_in_executor(
                        self._pool, self._meter.wrap(decode_windows), self._model,
                        [(r[0], r[1]) for r in batch], lang, self._beam_size,
                        self._min_context_s)
            except Exception as exc:
                for r in batch:
                    if not r[3].done():
                        r[3].set_exception(exc)
                continue
            for r, words in zip(batch, results, strict=True):
                if not r[3].done():
                    r[3].set_result(words)
