"""LLM benchmark on the embedded default (SmolLM2-135M Q4_1, llama.cpp, CPU threads).

Measures, in-process: time to first token, decode tokens/s, and cancel -> last token /
cancel -> generation thread stopped. Then the same through HTTP: our service runs in
this process under uvicorn (a thread) around the *same* engine, and ``OpenAICompatLlm``
talks to it over loopback, so the server side timings come from the engine's own
``GenerationStats`` with no metric scraping in between.

    python -m benchmarks.stages.llm
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time

import uvicorn

from stages.llm.client import OpenAICompatLlm
from stages.llm.engine import LlamaCppLlm
from stages.llm.service import create_app
from stages.llm.settings import LlmSettings
from stages.llm.types import ChatMessage, LlmBackend, LlmRequest

PROMPTS = (
    "Tell me about the weather in spring.",
    "Explain how a bicycle works.",
    "Give me three tips for cooking pasta.",
)
LONG = "Write a very long and detailed essay about the history of ships."


def _req(text: str, max_tokens: int) -> LlmRequest:
    return LlmRequest(messages=[ChatMessage(role="user", content=text)],
                      max_tokens=max_tokens, temperature=0.0)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def _ttft_and_rate(backend: LlmBackend, runs: int) -> tuple[list[float], list[float]]:
    ttfts: list[float] = []
    rates: list[float] = []
    for i in range(runs):
        t0 = time.perf_counter()
        first: float | None = None
        tokens = 0
        async for d in backend.stream(_req(PROMPTS[i % len(PROMPTS)], 64)):
            if d.text or d.tool_calls:
                now = time.perf_counter()
                first = first or now
                tokens += 1
        end = time.perf_counter()
        if first is not None:
            ttfts.append((first - t0) * 1000)
            if tokens > 1:
                rates.append((tokens - 1) / (end - first))
    return ttfts, rates


async def _cancel(backend: LlmBackend, engine: LlamaCppLlm,
                  runs: int) -> tuple[list[float], list[float]]:
    to_last: list[float] = []
    to_stop: list[float] = []
    for _ in range(runs):
        gen = backend.stream(_req(LONG, 400))
        n = 0
        async for _ in gen:
            n += 1
            if n == 5:
                break
        cancel_at = time.monotonic()
        await gen.aclose()  # type: ignore[attr-defined]
        await engine.wait_idle(10.0)
        stats = engine.history[-1]
        if stats.last_token_at is not None and stats.ended_at is not None:
            to_last.append(max(0.0, stats.last_token_at - cancel_at) * 1000)
            to_stop.append(max(0.0, stats.ended_at - cancel_at) * 1000)
    return to_last, to_stop


async def _run(repeats: int) -> dict[str, float]:
    runs = max(1, repeats) * 3
    engine = await asyncio.to_thread(LlamaCppLlm.from_settings, LlmSettings())
    await asyncio.to_thread(engine.warmup)
    out: dict[str, float] = {}
    ttfts, rates = await _ttft_and_rate(engine, runs)
    out["ttft_ms_p50"] = statistics.median(ttfts)
    out["ttft_ms_p90"] = _pct(ttfts, 0.9)
    out["tokens_per_s"] = statistics.median(rates)
    to_last, to_stop = await _cancel(engine, engine, runs)
    out["cancel_ms_p50"] = statistics.median(to_last)
    out["cancel_stop_ms_p50"] = statistics.median(to_stop)

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(LlmSettings(), engine=engine),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="bench-llm-http", daemon=True)
    thread.start()
    for _ in range(1000):  # up to ~10 s for the port to open
        if server.started:
            break
        await asyncio.sleep(0.01)
    client = OpenAICompatLlm(f"http://127.0.0.1:{port}")
    try:
        ttfts, rates = await _ttft_and_rate(client, runs)
        out["http_ttft_ms_p50"] = statistics.median(ttfts)
        out["http_ttft_ms_p90"] = _pct(ttfts, 0.9)
        out["http_tokens_per_s"] = statistics.median(rates)
        to_last, to_stop = await _cancel(client, engine, runs)
        out["http_cancel_ms_p50"] = statistics.median(to_last)
        out["http_cancel_stop_ms_p50"] = statistics.median(to_stop)
    finally:
        await client.aclose()
        server.should_exit = True  # its lifespan shutdown closes the engine
        await asyncio.to_thread(thread.join, 15)
    return {k: round(v, 2) for k, v in out.items()}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def bench(repeats: int) -> dict[str, float]:
    return asyncio.run(_run(repeats))


if __name__ == "__main__":
    print(json.dumps(bench(3), indent=2))
