"""TTS stage benchmark (in-process piper engine).

- ``ttfa_stream_ms_*``: time to first audio when the text arrives token by token at an
  LLM-like pace (``TOKEN_RATE`` tokens/s) from the first token to the first chunk. It
  includes the time the "LLM" takes to produce the first phrase's tokens.
- ``ttfa_oneshot_ms_*``: the whole text pushed at once, then flush.
- ``rtf``: synthesis wall time / audio duration for the whole text (lower is faster).

Run alone: ``python -m benchmarks.stages.tts`` prints the dict as JSON.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time

from stages.tts.engine import PiperTts
from stages.tts.settings import TtsSettings

TEXT = ("Sure, I can help with that. The store opens at nine in the morning and closes at "
        "six in the evening. On weekends it opens a little later, at ten o'clock. You can "
        "also order online at any time, and delivery usually takes two days.")
TOKEN_RATE = 50.0  # tokens per second, a small LLM on CPU


def _tokens(text: str) -> list[str]:
    return re.findall(r"\s*\S{1,4}|\s+", text)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _ttfa_stream(engine: PiperTts) -> float:
    stream = await engine.open_stream(sample_rate=24000)
    first: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def consume() -> None:
        async for _chunk in stream.chunks():
            if not first.done():
                first.set_result(time.perf_counter())

    consumer = asyncio.create_task(consume())
    t0 = time.perf_counter()
    for tok in _tokens(TEXT):
        await stream.push_text(tok)
        await asyncio.sleep(1.0 / TOKEN_RATE)
    await stream.flush()
    await consumer
    await stream.aclose()
    return (await first) - t0


async def _ttfa_oneshot(engine: PiperTts) -> float:
    stream = await engine.open_stream(sample_rate=24000)
    t0 = time.perf_counter()
    await stream.push_text(TEXT)
    await stream.flush()
    ttfa = 0.0
    async for _chunk in stream.chunks():
        if not ttfa:
            ttfa = time.perf_counter() - t0
    await stream.aclose()
    return ttfa


async def _rtf(engine: PiperTts) -> tuple[float, float]:
    t0 = time.perf_counter()
    chunks = await engine.synthesize(TEXT, sample_rate=24000)
    wall = time.perf_counter() - t0
    audio_s = sum(c.duration_ms for c in chunks) / 1000.0
    return wall / audio_s, audio_s


async def _run(repeats: int) -> dict[str, float]:
    t0 = time.perf_counter()
    engine = await asyncio.to_thread(PiperTts, TtsSettings())
    load_s = time.perf_counter() - t0
    try:
        await engine.synthesize("Warm up.")
        stream_ms, oneshot_ms, rtfs, audio_s = [], [], [], 0.0
        for _ in range(max(1, repeats)):
            stream_ms.append(1000 * await _ttfa_stream(engine))
            oneshot_ms.append(1000 * await _ttfa_oneshot(engine))
            rtf, audio_s = await _rtf(engine)
            rtfs.append(rtf)
    finally:
        await engine.aclose()
    return {
        "ttfa_ms_p50": statistics.median(stream_ms),
        "ttfa_ms_p90": _pct(stream_ms, 0.9),
        "ttfa_oneshot_ms_p50": statistics.median(oneshot_ms),
        "ttfa_oneshot_ms_p90": _pct(oneshot_ms, 0.9),
        "rtf": statistics.median(rtfs),
        "audio_s": audio_s,
        "token_rate_per_s": TOKEN_RATE,
        "load_s": load_s,
    }


def bench(repeats: int) -> dict[str, float]:
    return asyncio.run(_run(repeats))


if __name__ == "__main__":
    print(json.dumps(bench(5), indent=2))
