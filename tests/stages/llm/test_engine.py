"""In-process llama.cpp engine: streaming, cancellation, serialization, tools, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from stages.common.metrics import LLM_CANCELLED, LLM_TOKENS
from stages.llm.engine import LlamaCppLlm, _convert_delta, _Job
from stages.llm.types import LlmBusyError, LlmDelta, LlmError
from tests.stages.llm.conftest import LONG_PROMPT, WEATHER_TOOL, user


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppLlm]:
    llm = LlamaCppLlm(n_ctx=1024, n_threads=2, max_tokens=48)
    llm.warmup()
    yield llm
    asyncio.run(llm.aclose())


async def test_stream_yields_token_deltas(engine: LlamaCppLlm) -> None:
    # Greedy decoding: the same reply in every run (sampled, a reply could be one token).
    deltas = [d async for d in engine.stream(user("Say hello and introduce yourself.",
                                                  temperature=0.0))]
    texts = [d.text for d in deltas if d.text]
    assert len(texts) >= 3
    assert "".join(texts).strip()
    last = deltas[-1]
    assert last.finish_reason in ("stop", "length")
    assert last.usage is not None
    assert last.usage.completion_tokens == len(texts)
    assert last.usage.prompt_tokens > 5
    assert all(d.finish_reason is None for d in deltas[:-1])


async def test_max_tokens_is_honoured(engine: LlamaCppLlm) -> None:
    deltas = [d async for d in engine.stream(user(LONG_PROMPT, max_tokens=5, temperature=0.0))]
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 5


@pytest.fixture
def tokens_at_cancel(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Generated-token count (``cascade_llm_tokens_total``) at each stop-flag raise."""
    seen: list[float] = []
    cancel = _Job.cancel

    def spy(job: _Job) -> None:
        if not job.stop.is_set():
            seen.append(LLM_TOKENS._value.get())
        cancel(job)

    monkeypatch.setattr(_Job, "cancel", spy)
    return seen


async def _assert_stopped_promptly(engine: LlamaCppLlm, tokens_at_cancel: list[float],
                                   before: float) -> None:
    """Stopped promptly, counted in tokens rather than seconds.

    One token may take 10 ms or a second on a loaded CPU, but the worker checks the stop
    flag between tokens whatever the load: at most one more token is counted after the
    flag is raised (the one whose stop check had already passed)."""
    assert await engine.wait_idle(60.0)  # a hang guard, not a speed bound
    stats = engine.history[-1]
    assert stats.cancelled
    assert stats.tokens < 400
    assert stats.cancel_at is not None and stats.ended_at is not None
    assert stats.cancel_at <= stats.ended_at
    assert len(tokens_at_cancel) == 1
    assert LLM_TOKENS._value.get() - tokens_at_cancel[0] <= 1
    assert LLM_CANCELLED._value.get() == before + 1


async def test_aclose_stops_generation(engine: LlamaCppLlm,
                                       tokens_at_cancel: list[float]) -> None:
    before = LLM_CANCELLED._value.get()
    gen = engine.stream(user(LONG_PROMPT, max_tokens=400, temperature=0.0))
    n = 0
    async for _ in gen:
        n += 1
        if n == 4:
            break
    await gen.aclose()  # type: ignore[attr-defined]
    await _assert_stopped_promptly(engine, tokens_at_cancel, before)


async def test_task_cancellation_stops_generation(engine: LlamaCppLlm,
                                                  tokens_at_cancel: list[float]) -> None:
    before = LLM_CANCELLED._value.get()
    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.stream(user(LONG_PROMPT, max_tokens=400)):
            got_one.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_one.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _assert_stopped_promptly(engine, tokens_at_cancel, before)


async def test_two_concurrent_requests_both_complete(engine: LlamaCppLlm) -> None:
    async def run(prompt: str) -> list[LlmDelta]:
        return [d async for d in engine.stream(user(prompt, max_tokens=16, temperature=0.0))]

    a, b = await asyncio.gather(run("Name a color."), run("Name an animal."))
    for deltas in (a, b):
        assert "".join(d.text for d in deltas).strip()
        assert deltas[-1].finish_reason in ("stop", "length")


async def test_waiting_queue_is_bounded(engine: LlamaCppLlm) -> None:
    saved = engine.max_waiting
    engine.max_waiting = 0  # only the running request allowed
    first = engine.stream(user(LONG_PROMPT, max_tokens=200))
    try:
        await anext(first)
        with pytest.raises(LlmBusyError) as info:
            await anext(engine.stream(user("Hi")))
        assert info.value.status == 429
    finally:
        engine.max_waiting = saved
        await first.aclose()  # type: ignore[attr-defined]
    assert await engine.wait_idle(60.0)  # a hang guard, not a speed bound


async def test_forced_tool_call_streams_structured_deltas(engine: LlamaCppLlm) -> None:
    req = user("What is the weather in Paris?", tools=[WEATHER_TOOL],
               tool_choice={"type": "function", "function": {"name": "get_weather"}},
               max_tokens=40)
    deltas = [d async for d in engine.stream(req)]
    calls = [c for d in deltas for c in d.tool_calls or []]
    assert calls, "expected tool call deltas"
    assert calls[0].id and calls[0].function is not None
    assert calls[0].function.name == "get_weather"
    assert all(c.id is None for c in calls[1:])  # id/name only in the first piece
    args = "".join(c.function.arguments or "" for c in calls if c.function)
    assert args.startswith("{")
    assert deltas[-1].finish_reason == "tool_calls"


async def test_context_window_is_n_ctx(engine: LlamaCppLlm) -> None:
    assert await engine.context_window() == 1024


async def test_context_overflow_is_a_clear_error(engine: LlamaCppLlm) -> None:
    with pytest.raises(LlmError) as info:
        async for _ in engine.stream(user("word " * 1500)):
            pass
    assert info.value.code == "context_length_exceeded"
    assert info.value.status == 400
    # the engine keeps serving
    deltas = [d async for d in engine.stream(user("Hi", max_tokens=4))]
    assert deltas[-1].finish_reason is not None


def test_convert_delta_sends_id_and_name_once() -> None:
    seen: set[int] = set()
    raw = {"index": 0, "id": "call_1", "type": "function",
           "function": {"name": "f", "arguments": "{"}}
    first = _convert_delta({"tool_calls": [raw]}, seen)
    second = _convert_delta({"tool_calls": [{**raw, "function": {"name": "f",
                                                                 "arguments": "}"}}]}, seen)
    assert first is not None and second is not None
    assert first.tool_calls and first.tool_calls[0].id == "call_1"
    assert second.tool_calls and second.tool_calls[0].id is None
    assert second.tool_calls[0].function is not None
    assert second.tool_calls[0].function.name is None
    assert second.tool_calls[0].function.arguments == "}"
    assert _convert_delta({"role": "assistant"}, seen) is None
    assert _convert_delta({"content": "hi"}, seen) == LlmDelta(text="hi")


def test_device_selection_on_cpu_build(caplog: pytest.LogCaptureFixture) -> None:
    import llama_cpp

    from stages.llm.engine import gpu_layers_for

    assert gpu_layers_for("cpu") == 0
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build has GPU offload")
    assert gpu_layers_for("auto") == 0
    with caplog.at_level("WARNING"):
        assert gpu_layers_for("cuda") == -1
    assert "no GPU offload" in caplog.text


def test_client_from_settings() -> None:
    from stages.llm.client import OpenAICompatLlm
    from stages.llm.settings import LlmSettings

    client = OpenAICompatLlm.from_settings(
        LlmSettings(base_url="http://gpu-box:8002", api_key="k", served_model_name="assistant"))
    assert client.base_url == "http://gpu-box:8002/v1"
    assert client.model == "assistant"
    with pytest.raises(ValueError):
        OpenAICompatLlm.from_settings(LlmSettings())
    asyncio.run(client.aclose())
