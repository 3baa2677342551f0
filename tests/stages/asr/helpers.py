"""Shared helpers of the ASR tests: drive any AsrBackend (engine or client) with a clip."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from stages.asr.types import AsrBackend, AsrFinal, AsrPartial
from stages.common.audio import Int16Array


async def stream_clip(backend: AsrBackend, clip: Int16Array, *, rate: int = 16_000,
                      chunk_ms: int = 40, speed: float = 2.0,
                      ) -> tuple[list[AsrPartial], AsrFinal, float]:
    """Push ``clip`` in ``chunk_ms`` pieces at ``speed`` x real time; return the partials,
    the final and the wall time at which the final arrived, relative to the first push."""
    stream = await backend.open_stream()
    partials: list[AsrPartial] = []

    async def read() -> None:
        async for p in stream.partials():
            partials.append(p)

    reader = asyncio.create_task(read())
    step = rate * chunk_ms // 1000
    t0 = time.perf_counter()
    for i in range(0, clip.size, step):
        await stream.push(clip[i : i + step].tobytes())
        due = t0 + (i + step) / rate / speed
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
    final = await stream.finalize()
    done_s = time.perf_counter() - t0
    await asyncio.wait_for(reader, timeout=10)
    await stream.aclose()
    return partials, final, done_s


def check_stability(partials: list[AsrPartial], final: AsrFinal) -> None:
    """Stable text never retracts, revisions grow, and the final extends the last stable."""
    prev = ""
    rev = 0
    for p in partials:
        assert p.type == "partial"
        assert p.stable.startswith(prev), (prev, p.stable)
        assert p.revision > rev
        prev, rev = p.stable, p.revision
    assert final.text.startswith(prev), (prev, final.text)


def silence(seconds: float, rate: int = 16_000) -> Int16Array:
    return np.zeros(int(seconds * rate), dtype=np.int16)
