"""ASR stage benchmark (in-process faster-whisper engine, CPU defaults).

Speech is made with piper (the project's TTS voice) so the benchmark needs no test code.
Audio is pushed in 20 ms chunks paced in real time, as a microphone would deliver it.

- ``partial_interval_ms_p50/_p90``: time between consecutive partials while audio streams.
- ``finalize_ms_p50_short/_long``: ``finalize()`` latency called right after the last speech
  sample (no trailing silence: the worst case) for a ~3 s and a ~16 s turn.
- ``finalize_ms_p50_short_after_silence/_long_after_silence``: the orchestrator's case:
  speech then 0.6 s of silence (VAD end of turn), then ``finalize()``. The last partial
  decode usually covered everything, so its hypothesis is reused.
- ``final_wer_*``: word error rate of those finals (sanity check, 0 = exact).
- ``rtf``: whole-file ``transcribe()`` wall time / audio duration for the long turn.
- ``decode_ms_p50_3s``: one Whisper decode of a 3 s window.
- ``batch4_ms`` vs ``sequential4_ms``: four 3 s windows decoded as one cross-stream batch
  (``decode.decode_windows``) vs one after another.

Run alone: ``python -m benchmarks.stages.asr`` prints the dict as JSON.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time

import numpy as np

from benchmarks.speech import piper_speech
from stages.asr.decode import decode_windows
from stages.asr.engine import WhisperAsr
from stages.asr.settings import AsrSettings
from stages.common.audio import (
    ASR_RATE,
    Float32Array,
    Int16Array,
    pcm16_to_float,
)
from stages.common.text import wer

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please turn on the lights in the kitchen.",
    "What time does the train to Boston leave tomorrow morning?",
    "I would like to book a table for four people at seven.",
    "My phone number ends with three four five six.",
    "Remind me to call my sister after lunch.",
)
CHUNK_MS = 20


def _speech(text: str) -> Int16Array:
    return piper_speech(text, ASR_RATE)


def _silence(seconds: float) -> Int16Array:
    return np.zeros(int(seconds * ASR_RATE), dtype=np.int16)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _turn(asr: WhisperAsr, audio: Int16Array) -> tuple[float, list[float], str]:
    """Push ``audio`` in real time; return (finalize ms, partial intervals ms, text)."""
    stream = await asr.open_stream()
    stamps: list[float] = []

    async def read() -> None:
        async for _ in stream.partials():
            stamps.append(time.perf_counter())

    reader = asyncio.create_task(read())
    step = ASR_RATE * CHUNK_MS // 1000
    t0 = time.perf_counter()
    for i in range(0, audio.size, step):
        await stream.push(audio[i : i + step].tobytes())
        await asyncio.sleep(max(0.0, t0 + (i + step) / ASR_RATE - time.perf_counter()))
    t_end = time.perf_counter()
    final = await stream.finalize()
    finalize_ms = (time.perf_counter() - t_end) * 1000.0
    await reader
    streaming = [t for t in stamps if t <= t_end]
    intervals = [(b - a) * 1000.0 for a, b in itertools.pairwise(streaming)]
    return finalize_ms, intervals, final.text


async def _run(repeats: int) -> dict[str, float]:
    asr = await WhisperAsr.load(AsrSettings())
    clips = [_speech(t) for t in SENTENCES]
    short, short_text = clips[2], SENTENCES[2]
    gap = _silence(0.3)
    long = np.concatenate([c for clip in clips for c in (clip, gap)][:-1])
    long_text = " ".join(SENTENCES)
    tail = _silence(0.6)
    out: dict[str, list[float]] = {k: [] for k in (
        "short", "long", "short_sil", "long_sil", "intervals", "wer_short", "wer_long")}
    await _turn(asr, short[: ASR_RATE])  # warm-up
    for _ in range(max(1, repeats)):
        for key, audio, ref in (
            ("short", short, short_text),
            ("short_sil", np.concatenate([short, tail]), short_text),
            ("long", long, long_text),
            ("long_sil", np.concatenate([long, tail]), long_text),
        ):
            ms, intervals, text = await _turn(asr, audio)
            out[key].append(ms)
            out["intervals"].extend(intervals)
            out["wer_short" if key.startswith("short") else "wer_long"].append(wer(ref, text))
    t0 = time.perf_counter()
    await asr.transcribe(long.tobytes())
    rtf = (time.perf_counter() - t0) / (long.size / ASR_RATE)

    windows: list[tuple[Float32Array, str | None]] = [
        (pcm16_to_float(c[: 3 * ASR_RATE]), None) for c in clips[:4]]
    decode_ms = []
    for w, _ in windows[:3]:
        t0 = time.perf_counter()
        asr.decode_sync(w, None, "en", "bench")
        decode_ms.append((time.perf_counter() - t0) * 1000.0)
    t0 = time.perf_counter()
    decode_windows(asr.model, windows, "en", asr.settings.beam_size,
                   asr.settings.min_context_s)
    batch_ms = (time.perf_counter() - t0) * 1000.0
    t0 = time.perf_counter()
    for item in windows:
        decode_windows(asr.model, [item], "en", asr.settings.beam_size,
                       asr.settings.min_context_s)
    seq_ms = (time.perf_counter() - t0) * 1000.0
    await asr.aclose()
    return {
        "partial_interval_ms_p50": statistics.median(out["intervals"]),
        "partial_interval_ms_p90": _pct(out["intervals"], 0.9),
        "finalize_ms_p50_short": statistics.median(out["short"]),
        "finalize_ms_p50_long": statistics.median(out["long"]),
        "finalize_ms_p50_short_after_silence": statistics.median(out["short_sil"]),
        "finalize_ms_p50_long_after_silence": statistics.median(out["long_sil"]),
        "short_turn_s": short.size / ASR_RATE,
        "long_turn_s": long.size / ASR_RATE,
        "final_wer_short_mean": statistics.fmean(out["wer_short"]),
        "final_wer_long_mean": statistics.fmean(out["wer_long"]),
        "rtf": rtf,
        "decode_ms_p50_3s": statistics.median(decode_ms),
        "batch4_ms": batch_ms,
        "sequential4_ms": seq_ms,
    }


def bench(repeats: int) -> dict[str, float]:
    return {k: round(v, 4) for k, v in asyncio.run(_run(repeats)).items()}


if __name__ == "__main__":
    print(json.dumps(bench(3), indent=2))
