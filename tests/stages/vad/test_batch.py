"""Batched VAD: the same probabilities as one stream at a time, in fewer model runs."""

from __future__ import annotations

import asyncio
import os
import threading

import numpy as np
import pytest

from stages.vad.batch import BatchedVadStream, VadBatcher, batcher_for, default_inline_max
from stages.vad.model import SileroVadModel
from stages.vad.stream import VadStream


@pytest.fixture(scope="module")
def model() -> SileroVadModel:
    return SileroVadModel()


def _audio(seed: int, seconds: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16_000 * seconds)) / 16_000
    voiced = np.sin(2 * np.pi * (120 + 40 * seed) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    noise = rng.normal(0, 0.05, t.size)
    return (np.clip(voiced * 0.4 + noise, -1, 1) * 32767).astype(np.int16)


async def test_batched_streams_match_unbatched_exactly(model: SileroVadModel) -> None:
    streams = 12
    audio = [_audio(i) for i in range(streams)]
    expected = []
    for samples in audio:
        plain = VadStream(model)
        expected.append([f for i in range(0, samples.size, 320)
                         for f in plain.process(samples[i:i + 320])])
    batcher = VadBatcher(model)
    batched = [BatchedVadStream(batcher) for _ in range(streams)]

    async def feed(stream: BatchedVadStream, samples: np.ndarray) -> list[object]:
        out: list[object] = []
        for i in range(0, samples.size, 320):  # 20 ms pieces, as clients send them
            out += await stream.process_async(samples[i:i + 320])
        return out

    got = await asyncio.gather(*(feed(s, a) for s, a in zip(batched, audio, strict=True)))
    assert got == expected  # same frames, bit-identical probabilities
    total = sum(len(frames) for frames in expected)
    assert batcher.frames == total
    assert batcher.batches < total  # frames of concurrent streams shared runs
    batcher.close()


async def test_batcher_is_per_model_and_loop(model: SileroVadModel) -> None:
    first = batcher_for(model)
    assert batcher_for(model) is first
    assert batcher_for(SileroVadModel()) is not first


async def test_a_failed_run_fails_its_frames(model: SileroVadModel) -> None:
    batcher = VadBatcher(model)
    stream = BatchedVadStream(batcher)
    stream._state = np.zeros((2, 1, 7), dtype=np.float32)  # a shape the model refuses
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error type
        await stream.process_async(np.zeros(512, dtype=np.int16))
    good = BatchedVadStream(batcher)  # the batcher goes on serving other streams
    assert len(await good.process_async(np.zeros(512, dtype=np.int16))) == 1
    batcher.close()


async def _run_watching_threads(model: SileroVadModel, batcher: VadBatcher,
                                samples: np.ndarray) -> tuple[list[object], set[str]]:
    """The frames of ``samples`` fed in 20 ms pieces through ``batcher``, and the names of
    the threads the model ran on."""
    stream = BatchedVadStream(batcher)
    threads: set[str] = set()
    infer = model.infer_batch

    def spy(windows: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        threads.add(threading.current_thread().name)
        return infer(windows, states)

    model.infer_batch = spy  # type: ignore[method-assign]
    try:
        got = [f for i in range(0, samples.size, 320)
               for f in await stream.process_async(samples[i:i + 320])]
    finally:
        del model.infer_batch
    return got, threads


async def test_a_lone_stream_runs_inline_with_the_same_result(model: SileroVadModel) -> None:
    samples = _audio(3, 0.5)
    plain = VadStream(model).process(samples)
    batcher = VadBatcher(model, inline_max=2)
    got, threads = await _run_watching_threads(model, batcher, samples)
    assert got == plain
    assert batcher.batches == batcher.frames == len(plain)  # one frame per run
    assert threads == {threading.current_thread().name}  # on the loop, no thread
    batcher.close()


async def test_with_several_cpus_every_batch_runs_on_the_worker_thread(
        model: SileroVadModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_inline_max() == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert default_inline_max() == 2
    samples = _audio(5, 0.5)
    plain = VadStream(model).process(samples)
    batcher = VadBatcher(model, inline_max=0)
    got, threads = await _run_watching_threads(model, batcher, samples)
    assert got == plain  # same probabilities from the thread
    assert threads and all(name.startswith("vad-batch") for name in threads)
    batcher.close()
