"""Primers (``LlmRequest.prefill_only``) on the embedded engine with the bundled SmolLM2:
the real request that follows evaluates only its last words on the primer's slot; a primer
never queues (busy slots, a waiting request, a live conversation in its way); a real
request waits for the slot its primer is filling rather than starting cold elsewhere.

No timing thresholds: what a prefill saved is read from the token counts llama.cpp reports
(``GenerationStats.cached_tokens``). To hold a primer on its slot deterministically, a gate
wraps each slot's ``Llama.generate`` (where llama.cpp starts evaluating the prompt).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from stages.llm.engine import SMALL_PREFILL_TOKENS, GenerationStats, LlamaCppLlm
from stages.llm.slots import prompt_keys, reply_key
from stages.llm.types import ChatMessage, LlmDelta, LlmRequest, ToolSpec
from tests.stages.llm.conftest import LONG_PROMPT, WEATHER_TOOL, user
from tests.support.waiting import HANG_GUARD_S, until

WEATHER = "You are a weather presenter. You answer questions about the weather in one sentence."
TRAVEL = "You are a travel agent. You answer questions about journeys in one short sentence."
COOKING = "You are a cook. You answer questions about recipes and food in one short sentence."
PARTIAL = "Tell me about the weather in"
FULL = "Tell me about the weather in Paris today please"
# Tokens of the primer's prompt the real request cannot reuse: the primer's ends with the
# end of its user message and the assistant header, which the longer user message pushes
# back (6 tokens in SmolLM2's ChatML: <|im_end|>, "\n", <|im_start|>, "ass", "istant",
# "\n"), and a tokenizer may merge the last shared word with the next differently (+2).
PRIMER_TAIL_TOKENS = 8


def request(system: str, text: str, *, prefill_only: bool = False,
            tools: list[ToolSpec] | None = None) -> LlmRequest:
    return LlmRequest(messages=[ChatMessage(role="system", content=system),
                                ChatMessage(role="user", content=text)],
                      tools=tools, max_tokens=8, temperature=0.0, prefill_only=prefill_only)


def prefills(outcome: str) -> float:
    return REGISTRY.get_sample_value("cascade_llm_prefills_total", {"outcome": outcome}) or 0.0


@pytest.fixture
def fresh() -> Iterator[LlamaCppLlm]:
    """Two cold slots: which slot holds what depends only on this test's requests."""
    llm = LlamaCppLlm(n_ctx=1024, n_threads=1, parallel=2, max_tokens=16, queue_size=2)
    yield llm
    asyncio.run(llm.aclose())


class Gate:
    """Holds every prompt evaluation until ``release()``: each slot's ``generate`` waits."""

    def __init__(self, engine: LlamaCppLlm) -> None:
        self._open = threading.Event()
        self._lock = threading.Lock()
        self.entered = 0  # generations that reached the gate
        for slot in engine._slots:
            inner = slot.llm.generate

            def gated(*args: Any, _inner: Callable[..., Any] = inner, **kwargs: Any) -> Any:
                with self._lock:
                    self.entered += 1
                if not self._open.wait(HANG_GUARD_S):
                    raise RuntimeError("the gate was never released")
                return _inner(*args, **kwargs)

            slot.llm.generate = gated  # type: ignore[method-assign]

    def release(self) -> None:
        self._open.set()


async def _all(gen: AsyncIterator[LlmDelta]) -> list[LlmDelta]:
    return [d async for d in gen]


async def _run(engine: LlamaCppLlm, req: LlmRequest) -> tuple[list[LlmDelta], GenerationStats]:
    deltas = await asyncio.wait_for(_all(engine.stream(req)), HANG_GUARD_S)
    stats = next(s for s in reversed(engine.history) if s.prefill_only == req.prefill_only)
    return deltas, stats


async def test_the_real_request_evaluates_only_what_its_primer_did_not(
        fresh: LlamaCppLlm) -> None:
    engine = fresh
    # the cold reference: the same kind of prompt (another conversation), nothing cached
    _, cold = await _run(engine, request(TRAVEL, FULL))
    assert cold.cached_tokens == 0 and cold.prompt_tokens is not None

    runs = prefills("run")
    primer = request(WEATHER, PARTIAL, prefill_only=True)
    deltas, p = await _run(engine, primer)
    # exactly one delta, the end: no text, no tool call, no completion tokens
    assert len(deltas) == 1
    end = deltas[0]
    assert end.text == "" and end.tool_calls is None and end.finish_reason in ("length", "stop")
    assert end.usage is not None and end.usage.completion_tokens == 0
    assert end.usage.prompt_tokens == p.prompt_tokens
    assert prefills("run") == runs + 1
    assert p.prefill_only and not p.cancelled and p.tokens == 0 and p.first_token_at is None
    # a cold slot, not the one of the other (live) conversation
    assert p.slot is not None and p.slot != cold.slot
    # the slot holds the primer's prompt and no reply
    held = engine._slots[p.slot].held
    assert held == prompt_keys(primer)
    assert not any(key.startswith(reply_key("")) for key in held[1:])

    _, real = await _run(engine, request(WEATHER, FULL))
    assert real.slot == p.slot
    assert p.prompt_tokens is not None and real.prompt_tokens is not None
    assert real.cached_tokens is not None
    assert real.cached_tokens >= p.prompt_tokens - PRIMER_TAIL_TOKENS
    # cold, the whole prompt is evaluated; primed, the last words and the assistant header
    primed_work = real.prompt_tokens - real.cached_tokens
    assert primed_work <= len(" Paris today please".split()) + 2 * PRIMER_TAIL_TOKENS
    assert primed_work * 3 < cold.prompt_tokens


async def test_a_primer_with_tools_is_reused_too(fresh: LlamaCppLlm) -> None:
    engine = fresh
    primer = request(WEATHER, PARTIAL, prefill_only=True, tools=[WEATHER_TOOL])
    real = request(WEATHER, FULL, tools=[WEATHER_TOOL])
    _, p = await _run(engine, primer)
    _, r = await _run(engine, real)
    assert r.slot == p.slot
    assert p.prompt_tokens is not None and r.cached_tokens is not None
    assert r.cached_tokens >= p.prompt_tokens - PRIMER_TAIL_TOKENS


async def test_a_primer_is_skipped_when_every_slot_is_busy(fresh: LlamaCppLlm) -> None:
    engine = fresh
    # two generations that cannot finish: their consumers stop reading
    running = [engine.stream(user(LONG_PROMPT, max_tokens=200, temperature=0.0))
               for _ in range(2)]
    try:
        for gen in running:
            await asyncio.wait_for(anext(gen), HANG_GUARD_S)
        assert engine.busy_slots == 2
        skipped = prefills("skipped")
        deltas = await asyncio.wait_for(_all(engine.stream(request(WEATHER, PARTIAL,
                                                                   prefill_only=True))),
                                        HANG_GUARD_S)
        assert deltas == []  # ended at once, nothing queued
        assert prefills("skipped") == skipped + 1
        assert engine.pending == 2
        stats = engine.history[-1]
        assert stats.prefill_only and stats.slot is None and stats.started_at is None
    finally:
        for gen in running:
            await gen.aclose()  # type: ignore[attr-defined]
    assert await engine.wait_idle(HANG_GUARD_S)


async def test_a_primer_never_evicts_a_live_conversation(fresh: LlamaCppLlm) -> None:
    engine = fresh
    await _run(engine, request(WEATHER, FULL))
    await _run(engine, request(TRAVEL, FULL))
    # both slots hold a live conversation: a primer of a third one would evict one of them
    skipped = prefills("skipped")
    deltas, stats = await _run(engine, request(COOKING, "How do I bake", prefill_only=True))
    assert deltas == [] and stats.slot is None
    assert prefills("skipped") == skipped + 1
    # once they have ended (idle past stale_after_s) the primer may take a slot
    engine.stale_after_s = 0.0
    deltas, stats = await _run(engine, request(COOKING, "How do I bake", prefill_only=True))
    assert len(deltas) == 1 and stats.slot is not None


async def test_a_real_request_waits_for_the_slot_its_primer_is_filling(
        fresh: LlamaCppLlm) -> None:
    engine = fresh
    gate = Gate(engine)
    primer = asyncio.create_task(_run(engine, request(WEATHER, PARTIAL, prefill_only=True)))
    await until(lambda: gate.entered == 1)  # the primer holds a slot, before its prefill
    assert engine.busy_slots == 1
    real = asyncio.create_task(_run(engine, request(WEATHER, FULL)))
    await until(lambda: engine.pending == 2)
    # a slot is free (cold), but the primer's slot holds the prompt: the request waits
    assert engine.busy_slots == 1
    # while a real request waits, another primer is skipped even though a slot is free
    skipped = prefills("skipped")
    other = await asyncio.wait_for(_all(engine.stream(request(TRAVEL, FULL, prefill_only=True))),
                                   HANG_GUARD_S)
    assert other == [] and prefills("skipped") == skipped + 1
    assert not real.done()
    gate.release()
    _, p = await asyncio.wait_for(primer, HANG_GUARD_S)
    _, r = await asyncio.wait_for(real, HANG_GUARD_S)
    assert r.slot == p.slot
    assert p.prompt_tokens is not None and r.cached_tokens is not None
    assert r.cached_tokens >= p.prompt_tokens - PRIMER_TAIL_TOKENS


async def test_another_conversation_does_not_wait_for_a_primer(fresh: LlamaCppLlm) -> None:
    """Only a slot that ranks strictly better is worth waiting for: the primer's slot
    holds another conversation, so the request takes the free one at once."""
    engine = fresh
    gate = Gate(engine)
    primer = asyncio.create_task(_run(engine, request(WEATHER, PARTIAL, prefill_only=True)))
    await until(lambda: gate.entered == 1)
    real = asyncio.create_task(_run(engine, request(TRAVEL, FULL)))
    await until(lambda: gate.entered == 2)  # started on the other slot, primer still on
    assert engine.busy_slots == 2
    gate.release()
    _, p = await asyncio.wait_for(primer, HANG_GUARD_S)
    _, r = await asyncio.wait_for(real, HANG_GUARD_S)
    assert r.slot != p.slot


async def test_a_second_primer_is_skipped_while_the_first_fills_its_slot(
        fresh: LlamaCppLlm) -> None:
    """Primers come one after another as the transcript grows; the next one does not queue
    behind the last nor prefill the whole prompt again on a cold slot."""
    engine = fresh
    gate = Gate(engine)
    first = asyncio.create_task(_run(engine, request(WEATHER, "Tell me about", prefill_only=True)))
    await until(lambda: gate.entered == 1)
    second = await asyncio.wait_for(_all(engine.stream(request(WEATHER, PARTIAL,
                                                                prefill_only=True))),
                                    HANG_GUARD_S)
    assert second == [] and engine.history[-1].slot is None
    assert engine.busy_slots == 1
    gate.release()
    deltas, _ = await asyncio.wait_for(first, HANG_GUARD_S)
    assert len(deltas) == 1


async def test_the_last_words_after_a_primer_run_on_the_decode_threads() -> None:
    """A short remainder after the cached prefix is evaluated on the decode threads (one
    here), a long prompt on the prompt threads (two here): see ``_watch_prompts``."""
    import llama_cpp

    engine = LlamaCppLlm(n_ctx=1024, n_threads=1, n_threads_batch=2, parallel=1, max_tokens=4)
    ctx = engine._slots[0].llm._ctx.ctx

    def batch_threads() -> int:
        return int(llama_cpp.llama_n_threads_batch(ctx))

    try:
        _, p = await _run(engine, request(WEATHER, PARTIAL, prefill_only=True))
        assert p.cached_tokens == 0 and batch_threads() == 2  # cold: the whole prompt
        _, r = await _run(engine, request(WEATHER, FULL))
        assert r.prompt_tokens is not None and r.cached_tokens is not None
        assert r.prompt_tokens - r.cached_tokens < SMALL_PREFILL_TOKENS
        assert batch_threads() == 1
        assert engine.threads == (1, 2)  # the configuration is unchanged
    finally:
        await engine.aclose()
