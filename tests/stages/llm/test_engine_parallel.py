"""Several llama.cpp slots (``parallel=2``, the bundled SmolLM2): side-by-side generation,
independent cancellation, the busy bound, the slot chosen by held prefix, shutdown.

No timing thresholds: "side by side" is shown by ordering. A consumer that stops reading
holds its generation (the worker blocks once ``queue_size`` deltas wait), so a stream
that is provably unfinished can be used as a reference point.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from stages.llm.engine import GenerationStats, LlamaCppLlm
from stages.llm.settings import LlmSettings
from stages.llm.types import ChatMessage, LlmBusyError, LlmDelta, LlmError, LlmRequest, Role
from tests.stages.llm.conftest import LONG_PROMPT, user
from tests.support.waiting import HANG_GUARD_S, until


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppLlm]:
    llm = LlamaCppLlm(n_ctx=1024, n_threads=1, parallel=2, max_tokens=48, queue_size=2)
    llm.warmup()
    yield llm
    asyncio.run(llm.aclose())


async def _first(gen: AsyncIterator[LlmDelta]) -> LlmDelta:
    return await asyncio.wait_for(anext(gen), HANG_GUARD_S)


async def _rest(gen: AsyncIterator[LlmDelta]) -> list[LlmDelta]:
    return [d async for d in gen]


def _stats_for(engine: LlamaCppLlm, n: int) -> list[GenerationStats]:
    return list(engine.history)[-n:]


def test_parallel_setting_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_LLM_PARALLEL", "3")
    assert LlmSettings().parallel == 3
    monkeypatch.setenv("CASCADE_LLM_PARALLEL", "0")
    with pytest.raises(ValueError):
        LlmSettings()


async def test_from_settings_gives_each_slot_its_threads() -> None:
    llm = LlamaCppLlm.from_settings(LlmSettings(parallel=2, cpu_threads=2, decode_threads=1,
                                                n_ctx=256))
    try:
        assert llm.parallel == 2
        assert llm.threads == (1, 2)  # one thread generates, two evaluate prompts
        assert await llm.context_window() == 256
    finally:
        await llm.aclose()
    llm = LlamaCppLlm.from_settings(LlmSettings(parallel=1, cpu_threads=2, decode_threads=0,
                                                n_ctx=256))
    try:
        assert llm.threads == (2, 2)  # 0: as many as cpu_threads
    finally:
        await llm.aclose()


async def test_warmup_left_every_slot_idle(engine: LlamaCppLlm) -> None:
    assert engine.parallel == 2
    assert engine.busy_slots == 0 and engine.pending == 0


async def test_second_stream_starts_before_the_first_finishes(engine: LlamaCppLlm) -> None:
    events: list[tuple[str, str]] = []
    a = engine.stream(user(LONG_PROMPT, max_tokens=40, temperature=0.0))
    await _first(a)
    events.append(("a", "first"))
    # ``a`` is not read now: it cannot finish. On one slot, ``b`` would never start.
    b = engine.stream(user("Tell me about the weather in spring.", max_tokens=40,
                           temperature=0.0))
    await _first(b)
    events.append(("b", "first"))
    assert engine.busy_slots == 2 and engine.pending == 2

    async def drain(name: str, gen: AsyncIterator[LlmDelta]) -> list[LlmDelta]:
        deltas = await _rest(gen)
        events.append((name, "end"))
        return deltas

    rest_a, rest_b = await asyncio.gather(drain("a", a), drain("b", b))
    assert events.index(("b", "first")) < events.index(("a", "end"))
    for deltas in (rest_a, rest_b):
        assert deltas[-1].finish_reason in ("stop", "length")
        assert deltas[-1].usage is not None
    runs = _stats_for(engine, 2)
    assert {s.slot for s in runs} == {0, 1}
    assert not any(s.cancelled for s in runs)
    assert engine.busy_slots == 0


async def test_cancelling_one_stream_leaves_the_other_running(engine: LlamaCppLlm) -> None:
    a = engine.stream(user(LONG_PROMPT, max_tokens=200, temperature=0.0))
    b = engine.stream(user(LONG_PROMPT, max_tokens=30, temperature=0.0))
    await _first(a)
    first_b = await _first(b)
    assert engine.busy_slots == 2
    await a.aclose()  # type: ignore[attr-defined]
    rest_b = await _rest(b)
    texts = [d for d in [first_b, *rest_b] if d.text]
    last = rest_b[-1]
    assert last.finish_reason in ("stop", "length")
    assert last.usage is not None and last.usage.completion_tokens == len(texts)
    assert await engine.wait_idle(HANG_GUARD_S)
    runs = {s.cancelled: s for s in _stats_for(engine, 2)}
    assert set(runs) == {True, False}
    assert runs[True].slot != runs[False].slot
    assert runs[True].tokens < 200
    assert runs[False].tokens == len(texts)


async def test_requests_beyond_slots_and_waiting_room_are_refused(engine: LlamaCppLlm) -> None:
    saved = engine.max_waiting
    engine.max_waiting = 1
    running = [engine.stream(user(LONG_PROMPT, max_tokens=200)) for _ in range(2)]
    waiting = engine.stream(user("Name a color.", max_tokens=4))
    waiter: asyncio.Task[LlmDelta] | None = None
    try:
        for gen in running:
            await _first(gen)
        waiter = asyncio.create_task(_first(waiting))
        await until(lambda: engine.pending == 3)  # the third is queued, not refused
        assert engine.busy_slots == 2 and not waiter.done()
        with pytest.raises(LlmBusyError) as info:
            await anext(engine.stream(user("Hi")))
        assert info.value.status == 429
        # the first slot to free takes the waiting request
        await running[0].aclose()  # type: ignore[attr-defined]
        assert (await asyncio.wait_for(waiter, HANG_GUARD_S)) is not None
        await _rest(waiting)
    finally:
        engine.max_waiting = saved
        for gen in running:
            await gen.aclose()  # type: ignore[attr-defined]
        if waiter is not None and not waiter.done():
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        await waiting.aclose()  # type: ignore[attr-defined]
    assert await engine.wait_idle(HANG_GUARD_S)
    served = [s for s in _stats_for(engine, 3) if not s.cancelled]
    assert len(served) == 1 and served[0].slot in (0, 1)


def _turn(system: str, *turns: str) -> LlmRequest:
    roles: tuple[Role, Role] = ("user", "assistant")
    return LlmRequest(messages=[ChatMessage(role="system", content=system),
                                *(ChatMessage(role=roles[i % 2], content=t)
                                  for i, t in enumerate(turns))],
                      max_tokens=12, temperature=0.0)


async def _reply(engine: LlamaCppLlm, request: LlmRequest) -> tuple[str, GenerationStats]:
    deltas = [d async for d in engine.stream(request)]
    assert deltas[-1].finish_reason in ("stop", "length")
    return "".join(d.text for d in deltas), engine.history[-1]


@pytest.fixture
def fresh() -> Iterator[LlamaCppLlm]:
    """Two cold slots: which slot holds what depends only on this test's requests."""
    llm = LlamaCppLlm(n_ctx=1024, n_threads=1, parallel=2, max_tokens=48)
    yield llm
    asyncio.run(llm.aclose())


SHIPS = "You are a sailor. You answer questions about ships in one sentence."
COLORS = "You are a painter. You answer questions about colors in one sentence."


async def test_a_conversation_returns_to_the_slot_holding_it(fresh: LlamaCppLlm) -> None:
    engine = fresh
    ships, colors = SHIPS, COLORS
    reply_x, x1 = await _reply(engine, _turn(ships, "What is a hull?"))
    reply_y, y1 = await _reply(engine, _turn(colors, "What is blue?"))
    assert x1.slot is not None and y1.slot is not None and x1.slot != y1.slot

    _, x2 = await _reply(engine, _turn(ships, "What is a hull?", reply_x, "And a mast?"))
    _, y2 = await _reply(engine, _turn(colors, "What is blue?", reply_y, "And red?"))
    assert (x2.slot, y2.slot) == (x1.slot, y1.slot)
    # llama.cpp evaluated only the new turn: the whole first prompt was already held
    for first, second in ((x1, x2), (y1, y2)):
        assert first.prompt_tokens is not None and second.cached_tokens is not None
        assert second.cached_tokens >= first.prompt_tokens
        assert second.prompt_tokens is not None
        assert second.prompt_tokens > second.cached_tokens

    # a speculative start on a hypothesis, cancelled, then the final transcript:
    # the final goes where the history is (the other slot holds another conversation)
    history = ("What is a hull?", reply_x, "And a mast?")
    spec = engine.stream(_turn(ships, *history, "Can you tell me ab"))
    await _first(spec)
    await spec.aclose()  # type: ignore[attr-defined]
    _, final = await _reply(engine, _turn(ships, *history, "Can you tell me about sails?"))
    assert final.slot == x1.slot
    assert final.cached_tokens is not None and x2.prompt_tokens is not None
    assert final.cached_tokens >= x2.prompt_tokens


@pytest.mark.parametrize("ended", [False, True])
async def test_a_new_conversation_takes_a_cold_slot_unless_the_other_has_ended(
        fresh: LlamaCppLlm, ended: bool) -> None:
    """With one slot holding a live conversation and one cold, a new conversation takes
    the cold one (evicting would cost the live one its history). Once the occupied slot
    has been idle past ``stale_after_s`` its conversation counts as ended: the new one
    takes it and reuses the instructions it holds."""
    engine = fresh
    _, x1 = await _reply(engine, _turn(SHIPS, "What is a hull?"))
    if ended:
        engine.stale_after_s = 0.0
    _, z1 = await _reply(engine, _turn(SHIPS, "What is a keel?"))
    assert z1.cached_tokens is not None
    if ended:
        assert z1.slot == x1.slot
        assert z1.cached_tokens > 10  # the instructions were not evaluated again
    else:
        assert z1.slot != x1.slot
        assert z1.cached_tokens == 0  # a cold slot holds nothing


async def test_aclose_with_generations_in_flight() -> None:
    llm = LlamaCppLlm(n_ctx=512, n_threads=1, parallel=2, max_tokens=400, queue_size=2)
    gens = [llm.stream(user(LONG_PROMPT, temperature=0.0)) for _ in range(3)]
    await _first(gens[0])
    await _first(gens[1])
    third = asyncio.create_task(_rest(gens[2]))  # waits for a slot
    await until(lambda: llm.pending == 3)
    await asyncio.wait_for(llm.aclose(), HANG_GUARD_S)
    assert llm.pending == 0 and llm.busy_slots == 0
    assert await asyncio.wait_for(third, HANG_GUARD_S) == []  # ended, never started
    for gen in gens[:2]:  # the running ones end too (whatever was already queued)
        await asyncio.wait_for(_rest(gen), HANG_GUARD_S)
    stats = list(llm.history)
    assert len(stats) == 3 and all(s.cancelled for s in stats)
    assert sorted(s.slot for s in stats if s.slot is not None) == [0, 1]
    with pytest.raises(LlmError) as info:
        await anext(llm.stream(user("Hi")))
    assert info.value.status == 503
