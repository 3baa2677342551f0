"""``cascade demo``: one spoken round trip through the three stages.

A stage-level smoke run (the product itself is ``cascade serve``): it starts the three stage
services as separate processes (or, with ``--in-process``, uses the engines directly),
speaks a question with TTS, streams that audio into ASR in real-time 20 ms frames (showing
partial transcripts), streams the LLM's answer phrase by phrase into TTS, and writes the
spoken answer to a WAV file. It prints the timings of each stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import numpy as np

from orchestrator.backends import Backends, embedded_backends, remote_backends
from stages.common.aiter import closing
from stages.common.audio import ASR_RATE, REALTIME_RATE, write_wav
from stages.llm.types import ChatMessage, LlmRequest

SYSTEM_PROMPT = ("You are a friendly voice assistant. Answer in one or two short spoken "
                 "sentences, without lists or markdown.")
FRAME_MS = 20


async def round_trip(backends: Backends, question: str, out_path: str,
                     realtime: bool = True) -> dict[str, object]:
    """Run one turn; returns the transcript, reply and timings (ms)."""
    # 1. The user's question, spoken by TTS at the ASR rate.
    chunks = await backends.tts.synthesize(question, sample_rate=ASR_RATE)
    speech = b"".join(c.audio for c in chunks)
    print(f"question audio: {len(speech) / 2 / ASR_RATE:.2f} s ({question!r})")

    # 2. Stream it into ASR as a microphone would (20 ms frames), showing partials.
    stream = await backends.asr.open_stream()
    partials = 0

    async def show_partials() -> None:
        nonlocal partials
        async for p in stream.partials():
            partials += 1
            print(f"  partial: [{p.stable}] {p.unstable}")

    watcher = asyncio.create_task(show_partials())
    frame_bytes = ASR_RATE * FRAME_MS // 1000 * 2
    start = time.perf_counter()
    for i in range(0, len(speech), frame_bytes):
        await stream.push(speech[i:i + frame_bytes])
        if realtime:
            due = start + (i + frame_bytes) / 2 / ASR_RATE
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
    eos = time.perf_counter()  # the last voiced sample has been sent
    final = await stream.finalize()
    t_final = time.perf_counter()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(watcher, timeout=1.0)
    await stream.aclose()
    print(f"transcript: {final.text!r}")

    # 3. LLM tokens stream into TTS phrase by phrase; audio is collected as it comes.
    request = LlmRequest(messages=[ChatMessage(role="system", content=SYSTEM_PROMPT),
                                   ChatMessage(role="user", content=final.text)],
                         max_tokens=80)
    tts = await backends.tts.open_stream(sample_rate=REALTIME_RATE)
    t_llm = time.perf_counter()
    first_token: float | None = None
    reply: list[str] = []

    async def feed() -> None:
        nonlocal first_token
        async with closing(backends.llm.stream(request)) as deltas:
            async for delta in deltas:
                if delta.text:
                    if first_token is None:
                        first_token = time.perf_counter()
                    reply.append(delta.text)
                    await tts.push_text(delta.text)
        await tts.flush()

    feeder = asyncio.create_task(feed())
    audio: list[bytes] = []
    first_audio: float | None = None
    async for chunk in tts.chunks():
        if first_audio is None:
            first_audio = time.perf_counter()
        print(f"  audio chunk {chunk.index}: {chunk.duration_ms:.0f} ms  {chunk.text!r}")
        audio.append(chunk.audio)
    await feeder
    await tts.aclose()

    samples = np.frombuffer(b"".join(audio), dtype="<i2")
    write_wav(out_path, samples, REALTIME_RATE)
    report: dict[str, object] = {
        "transcript": final.text,
        "reply": "".join(reply).strip(),
        "partials": partials,
        "asr_finalize_ms": round((t_final - eos) * 1000, 1),
        "llm_ttft_ms": round(((first_token or t_llm) - t_llm) * 1000, 1),
        "first_audio_after_eos_ms": round(((first_audio or eos) - eos) * 1000, 1),
        "reply_audio_s": round(samples.size / REALTIME_RATE, 2),
        "out": out_path,
    }
    print(f"reply: {report['reply']!r}")
    for key in ("partials", "asr_finalize_ms", "llm_ttft_ms", "first_audio_after_eos_ms",
                "reply_audio_s"):
        print(f"{key:>26}: {report[key]}")
    print(f"wrote {out_path}")
    print("result: " + json.dumps(report))
    return report


async def _main(out_path: str, question: str, in_process: bool) -> int:
    if in_process:
        backends = await embedded_backends()
        try:
            report = await round_trip(backends, question, out_path)
        finally:
            await backends.aclose()
    else:
        from orchestrator.launcher import stage_processes

        print("starting stage services: asr, llm, tts ...")
        with stage_processes(("asr", "llm", "tts")) as urls:
            print("  " + ", ".join(f"{k}={v}" for k, v in urls.items()))
            backends = remote_backends(urls["asr"], urls["llm"], urls["tts"])
            try:
                report = await round_trip(backends, question, out_path)
            finally:
                await backends.aclose()
    ok = bool(report["transcript"]) and float(str(report["reply_audio_s"])) > 0
    return 0 if ok else 1


def run_demo(out_path: str, question: str, in_process: bool = False) -> int:
    return asyncio.run(_main(out_path, question, in_process))
