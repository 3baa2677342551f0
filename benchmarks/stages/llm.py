"""LLM benchmark on the embedded default (SmolLM2-135M Q4_1, llama.cpp, CPU threads).

Measures, in-process: time to first token, decode tokens/s, and cancel -> last token /
cancel -> generation thread stopped. Then the same through HTTP: our service runs in
this process under uvicorn (a thread) around the *same* engine, and ``OpenAICompatLlm``
talks to it over loopback, so the server side timings come from the engine's own
``GenerationStats`` with no metric scraping in between.

Concurrency (``conc_p{P}_t{T}_c{C}_*``): C generations of ``CONC_TOKENS`` tokens started
together on an engine of P slots with T threads each: per-stream TTFT p50 (queueing
included when C > P), per-stream decode tokens/s p50, and aggregate tokens/s (all tokens /
wall time from the first submit to the last token). ``pss_mb_p{P}_t{T}`` is the process's
proportional set size with that engine loaded and warm, ``rss_mb_*`` its RSS (which counts
the one mapped weights file once per slot).

Prefix reuse (``prefix_*``): the next turn of a conversation (voice-like instructions and
a few turns of history) on a one-slot engine, after the slot served: the previous turn of
the same conversation (``warm``: only the new messages are evaluated), another
conversation with the same instructions (``instructions``), or an unrelated conversation
(``cold``). TTFT p50 and the prompt tokens llama.cpp took from the KV cache.

Primer (``primer_*``): the third turn of that conversation on a one-slot engine holding its
second turn, with and without a primer (``LlmRequest.prefill_only``) of the same prompt whose
user message lacks its last 3 words, sent just before: TTFT p50 of the real request, the
prompt tokens it took from the KV cache, and the primer's own run time (its prefill).

    python -m benchmarks.stages.llm                      # everything, as bench-stages does
    python -m benchmarks.stages.llm --only concurrency --parallel 1,2,4 --threads 1,2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from collections.abc import Sequence

import uvicorn

from stages.common.cpu import quiet_threads
from stages.llm.client import OpenAICompatLlm
from stages.llm.engine import LlamaCppLlm
from stages.llm.service import create_app
from stages.llm.settings import LlmSettings
from stages.llm.types import ChatMessage, LlmBackend, LlmRequest, Role

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


async def _single(repeats: int) -> dict[str, float]:
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


CONC_TOKENS = 60
CONC_PROMPTS = (
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain in detail how bread is made, step by step.",
    "Describe a long walk through a city at night.",
    "Write a long letter to a friend about a summer holiday.",
)
INSTRUCTIONS = (
    "You are a friendly voice assistant on a phone call. Answer in one or two short, "
    "spoken sentences. Do not use lists, markdown, emojis or special characters. If you "
    "do not know something, say so briefly. Numbers are spoken as words. Be warm, "
    "concise and helpful, and ask a short follow-up question when it helps the caller."
)
HISTORY = (
    "Hi, I would like to plan a trip to the mountains next month.",
    "That sounds lovely. Which mountains are you thinking of visiting?",
    "Probably the Alps. I like hiking but I am not very experienced.",
    "The Alps have many easy trails. Would you like a gentle route with nice views?",
    "Yes please, and somewhere with a good place to stay overnight.",
    "Many valleys have mountain huts with beds and meals. Shall I suggest a region?",
)


def _pss_rss_mb() -> tuple[float, float]:
    """(PSS, RSS) of this process in MB (Linux smaps_rollup)."""
    values: dict[str, float] = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                values[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return values.get("Pss", 0.0), values.get("Rss", 0.0)


async def _one_stream(engine: LlamaCppLlm, request: LlmRequest,
                      t0: float) -> tuple[float | None, float | None, int, float]:
    """(TTFT s, decode tokens/s, tokens, end) of one generation submitted at ``t0``."""
    first: float | None = None
    tokens = 0
    async for d in engine.stream(request):
        if d.text or d.tool_calls:
            first = first or time.perf_counter()
            tokens += 1
    end = time.perf_counter()
    rate = (tokens - 1) / (end - first) if first is not None and tokens > 1 else None
    return (None if first is None else first - t0), rate, tokens, end


Threads = tuple[int, int]  # (decode threads, prompt threads) per slot


def _label(t: Threads) -> str:
    return f"t{t[0]}b{t[1]}"


def _threads(text: str) -> tuple[Threads, ...]:
    """"1:2,2:2" -> ((1, 2), (2, 2)); a plain "2" means 2:2."""
    pairs: list[Threads] = []
    for item in text.split(","):
        decode, _, batch = item.partition(":")
        pairs.append((int(decode), int(batch or decode)))
    return tuple(pairs)


async def _engine(parallel: int, threads: Threads, max_tokens: int = 256,
                  max_waiting: int = 8) -> LlamaCppLlm:
    def load() -> LlamaCppLlm:
        engine = LlamaCppLlm(n_threads=threads[0], n_threads_batch=threads[1],
                             parallel=parallel, max_tokens=max_tokens, max_waiting=max_waiting)
        engine.warmup()
        return engine

    return await asyncio.to_thread(load)


async def _engines(parallel: Sequence[int], threads: Sequence[Threads],
                   max_waiting: int) -> dict[tuple[int, Threads], LlamaCppLlm]:
    engines: dict[tuple[int, Threads], LlamaCppLlm] = {}
    for p in parallel:
        for t in threads:
            engines[(p, t)] = await _engine(p, t, max_tokens=CONC_TOKENS,
                                            max_waiting=max_waiting)
    return engines


async def _memory(parallel: Sequence[int]) -> dict[str, float]:
    """PSS/RSS with one engine of P slots loaded and warm (one at a time)."""
    out: dict[str, float] = {}
    for p in parallel:
        engine = await _engine(p, (1, 1))
        out[f"pss_mb_p{p}"], out[f"rss_mb_p{p}"] = _pss_rss_mb()
        await engine.aclose()
    return out


async def _concurrency(parallel: Sequence[int], threads: Sequence[Threads],
                       concurrency: Sequence[int], rounds: int) -> dict[str, float]:
    """C generations started together; rounds interleave the engines, so that a busy
    shared machine weighs on every configuration alike."""
    engines = await _engines(parallel, threads, max(concurrency))
    ttfts: dict[str, list[float]] = {}
    rates: dict[str, list[float]] = {}
    aggregate: dict[str, list[float]] = {}
    try:
        for r in range(rounds):
            for (p, t), engine in engines.items():
                for c in concurrency:
                    key = f"conc_p{p}_{_label(t)}_c{c}"
                    # short prompts that share nothing: this measures queueing and
                    # interleaving, not prefix reuse (that is ``prefix_*``)
                    reqs = [LlmRequest(
                        messages=[ChatMessage(role="user", content=f"{key} {r}.{i}: "
                                              + CONC_PROMPTS[i % len(CONC_PROMPTS)])],
                        max_tokens=CONC_TOKENS, temperature=0.0) for i in range(c)]
                    t0 = time.perf_counter()
                    results = await asyncio.gather(*(_one_stream(engine, q, t0) for q in reqs))
                    ttfts.setdefault(key, []).extend(
                        x[0] * 1000 for x in results if x[0] is not None)
                    rates.setdefault(key, []).extend(x[1] for x in results if x[1] is not None)
                    wall = max(x[3] for x in results) - t0
                    aggregate.setdefault(key, []).append(sum(x[2] for x in results) / wall)
    finally:
        for engine in engines.values():
            await engine.aclose()
    out: dict[str, float] = {}
    for key in ttfts:
        out[f"{key}_ttft_ms_p50"] = statistics.median(ttfts[key])
        out[f"{key}_stream_tok_s_p50"] = statistics.median(rates[key])
        out[f"{key}_aggregate_tok_s"] = statistics.median(aggregate[key])
    return out


QUESTIONS = (
    "What should I pack for a day of hiking?",
    "How early should I start in the morning?",
    "What if the weather turns bad on the way?",
    "Is it safe to drink water from the streams?",
)


async def _session(engine: LlamaCppLlm, i: int, turns: int) -> list[float]:
    """One caller: ``turns`` questions, each after the previous reply and a pause."""
    history: list[str] = []  # user, assistant, user, ...
    ttfts: list[float] = []
    await asyncio.sleep(0.25 * i)
    for k in range(turns):
        question = QUESTIONS[k % len(QUESTIONS)]
        if k == 0:
            question = f"Hello, this is caller {i}. {question}"
        request = _conversation(INSTRUCTIONS, (*history, question))
        ms, reply = await _ttft(engine, request.model_copy(update={"max_tokens": 40}))
        ttfts.append(ms)
        history += [question, reply or "Okay."]
        await asyncio.sleep(0.3 + 0.1 * i)  # the caller listens, then speaks
    return ttfts


async def _sessions(parallel: Sequence[int], threads: Sequence[Threads], sessions: int,
                    turns: int) -> dict[str, float]:
    """``sessions`` voice-like conversations at once (shared instructions, each its own
    growing history, a pause between turns), ``turns`` each: TTFT of every turn and the
    share of prompt tokens taken from a slot's cache."""
    out: dict[str, float] = {}
    for p in parallel:
        for t in threads:
            engine = await _engine(p, t, max_tokens=40, max_waiting=sessions)
            prompt = cached = 0
            try:
                per_session = await asyncio.gather(
                    *(_session(engine, i, turns) for i in range(sessions)))
                ttfts = [ms for one in per_session for ms in one]
                for s in engine.history:
                    prompt += s.prompt_tokens or 0
                    cached += s.cached_tokens or 0
            finally:
                await engine.aclose()
            key = f"sessions{sessions}_p{p}_{_label(t)}"
            out[f"{key}_ttft_ms_p50"] = statistics.median(ttfts)
            out[f"{key}_ttft_ms_p90"] = _pct(ttfts, 0.9)
            out[f"{key}_cached_share"] = cached / prompt if prompt else 0.0
    return out


def _conversation(system: str, turns: Sequence[str]) -> LlmRequest:
    roles: tuple[Role, Role] = ("user", "assistant")
    return LlmRequest(messages=[ChatMessage(role="system", content=system),
                                *(ChatMessage(role=roles[i % 2], content=text)
                                  for i, text in enumerate(turns))],
                      max_tokens=8, temperature=0.0)


async def _ttft(engine: LlamaCppLlm, request: LlmRequest) -> tuple[float, str]:
    t0 = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    async for d in engine.stream(request):
        if d.text:
            first = first or time.perf_counter()
            text.append(d.text)
    return ((first or time.perf_counter()) - t0) * 1000, "".join(text)


async def _prefix(rounds: int, threads: Threads) -> dict[str, float]:
    """Next-turn TTFT by what the one slot held before (module docstring)."""
    engine = await _engine(1, threads)
    ttft: dict[str, list[float]] = {"warm": [], "instructions": [], "cold": []}
    cached: dict[str, list[float]] = {k: [] for k in ttft}
    prompt: list[float] = []
    try:
        for r in range(rounds):
            previous = _conversation(INSTRUCTIONS, (*HISTORY, "Thanks."))
            _, reply = await _ttft(engine, previous)
            turn = _conversation(INSTRUCTIONS, (*HISTORY, "Thanks.", reply,
                                                f"({r}) What should I pack for the hike?"))
            before = {
                "warm": previous,
                "instructions": _conversation(INSTRUCTIONS, (f"({r}) Hello, who are you?",)),
                "cold": _conversation("You are a pirate. Speak like one.", (f"({r}) Ahoy!",)),
            }
            for kind, other in before.items():
                await _ttft(engine, other)  # what the slot holds before the turn
                await _measure(engine, turn, ttft[kind], cached[kind], prompt)
    finally:
        await engine.aclose()
    out = {"prefix_prompt_tokens": statistics.median(prompt)}
    for kind in ttft:
        out[f"prefix_ttft_ms_p50_{kind}"] = statistics.median(ttft[kind])
        out[f"prefix_cached_tokens_{kind}"] = statistics.median(cached[kind])
    return out


async def _measure(engine: LlamaCppLlm, request: LlmRequest, ttft: list[float],
                   cached: list[float], prompt: list[float]) -> None:
    """One request's TTFT, and how many of its prompt tokens its slot already held."""
    ms, _ = await _ttft(engine, request)
    stats = engine.history[-1]
    ttft.append(ms)
    cached.append(float(stats.cached_tokens or 0))
    prompt.append(float(stats.prompt_tokens or 0))


async def _primer(rounds: int, threads: Threads) -> dict[str, float]:
    """Third-turn TTFT with and without a primer (module docstring), alternated."""
    engine = await _engine(1, threads)
    ttft: dict[str, list[float]] = {"without": [], "with": []}
    cached: dict[str, list[float]] = {k: [] for k in ttft}
    prompt: list[float] = []
    primer_ms: list[float] = []
    try:
        for r in range(rounds):
            second = _conversation(INSTRUCTIONS, HISTORY[:3])
            question = f"({r}) {HISTORY[4]}"
            for kind in ttft:
                _, reply = await _ttft(engine, second)  # the slot holds the second turn
                history = (*HISTORY[:3], reply)
                if kind == "with":
                    partial = question.rsplit(" ", 3)[0]
                    primer = _conversation(INSTRUCTIONS, (*history, partial))
                    primer.prefill_only = True
                    async for _ in engine.stream(primer):
                        pass
                    p = engine.history[-1]
                    if p.started_at is not None and p.ended_at is not None:
                        primer_ms.append((p.ended_at - p.started_at) * 1000)
                await _measure(engine, _conversation(INSTRUCTIONS, (*history, question)),
                               ttft[kind], cached[kind], prompt)
    finally:
        await engine.aclose()
    out = {"primer_prompt_tokens": statistics.median(prompt),
           "primer_prefill_ms_p50": statistics.median(primer_ms) if primer_ms else 0.0}
    for kind in ttft:
        out[f"primer_ttft_ms_p50_{kind}"] = statistics.median(ttft[kind])
        out[f"primer_cached_tokens_{kind}"] = statistics.median(cached[kind])
    return out


async def _run(repeats: int, only: Sequence[str] = ("single", "memory", "concurrency",
                                                   "sessions", "prefix", "primer"),
               parallel: Sequence[int] = (1, 2, 4), threads: Sequence[Threads] | None = None,
               concurrency: Sequence[int] = (1, 2, 4), sessions: int = 4,
               turns: int = 3) -> dict[str, float]:
    out: dict[str, float] = {}
    settings = LlmSettings()
    per_slot = threads or ((settings.decode_threads or settings.cpu_threads,
                            settings.cpu_threads),)
    rounds = max(1, repeats)
    if "single" in only:
        out.update(await _single(repeats))
    if "memory" in only:
        out.update(await _memory(parallel))
    if "concurrency" in only:
        out.update(await _concurrency(parallel, per_slot, concurrency, rounds))
    if "sessions" in only:
        out.update(await _sessions(parallel, per_slot, sessions, turns))
    if "prefix" in only:
        out.update(await _prefix(rounds * 2, per_slot[0]))
    if "primer" in only:
        out.update(await _primer(rounds * 2, per_slot[0]))
    return {k: round(v, 2) for k, v in out.items()}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def bench(repeats: int) -> dict[str, float]:
    return asyncio.run(_run(repeats))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="single,memory,concurrency,sessions,prefix,primer",
                        help="comma list of: single, memory, concurrency, sessions, prefix, "
                             "primer")
    parser.add_argument("--parallel", type=_ints, default=(1, 2, 4), help="slots, e.g. 1,2,4")
    parser.add_argument("--threads", type=_threads, default=None,
                        help="per slot DECODE:PROMPT threads, e.g. 1:2,2:2 (default: the "
                             "settings' decode_threads:cpu_threads)")
    parser.add_argument("--concurrency", type=_ints, default=(1, 2, 4))
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()
    quiet_threads()  # OMP_WAIT_POLICY=PASSIVE etc., as `cascade` sets before loading llama.cpp
    result = asyncio.run(_run(args.repeats, tuple(args.only.split(",")), args.parallel,
                              args.threads, args.concurrency, args.sessions, args.turns))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
