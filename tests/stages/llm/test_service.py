"""``cascade stage llm`` as a separate process: our client, the official openai SDK,
client disconnects, concurrency and bad inputs."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from stages.llm.client import OpenAICompatLlm
from stages.llm.types import ChatMessage, LlmDelta, LlmError, LlmRequest
from tests.stages.llm.conftest import LONG_PROMPT, WEATHER_TOOL, user
from tests.support.procs import stage_process

MAX_BODY = 100_000


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with stage_process("llm", "--set", f"max_message_bytes={MAX_BODY}",
                       "--set", "max_tokens=48", "--set", "n_ctx=1024") as url:
        yield url


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert m, f"metric {name} missing"
    return float(m.group(1))


def test_health_ready_models(base: str) -> None:
    assert httpx.get(f"{base}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{base}/readyz").status_code == 200
    models = httpx.get(f"{base}/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "smollm2-135m-instruct"
    assert models["data"][0]["max_model_len"] == 1024  # n_ctx, named as vLLM names it


async def test_client_reads_the_context_window(base: str) -> None:
    client = OpenAICompatLlm(base)
    try:
        assert await client.context_window() == 1024
    finally:
        await client.aclose()


async def test_client_streams_deltas_with_usage(base: str) -> None:
    client = OpenAICompatLlm(base, model="anything")
    try:
        # Greedy decoding: the same reply in every run (sampled, a reply could be one token).
        deltas = [d async for d in client.stream(user("Say hello and introduce yourself.",
                                                      temperature=0.0))]
        assert await client.list_models() == ["smollm2-135m-instruct"]
    finally:
        await client.aclose()
    texts = [d.text for d in deltas if d.text]
    assert len(texts) >= 3 and "".join(texts).strip()
    assert deltas[-1].finish_reason in ("stop", "length")
    assert deltas[-1].usage is not None
    assert deltas[-1].usage.completion_tokens == len(texts)


async def test_client_disconnect_stops_generation(base: str) -> None:
    """The server stops generating when the client goes away, long before max_tokens.

    Measured in tokens, not seconds (a loaded CPU makes every token slower, and the time
    to notice a disconnect with it): of the 600 tokens asked for, the client read 4; the
    server may generate a few more while it notices the disconnect, at most
    ``max_after`` (measured: none, idle and with a core busy). A server that ignores the
    disconnect generates all 600.
    """
    max_after = 50
    cancelled = metric(base, "cascade_llm_cancelled_total")
    tokens_before = metric(base, "cascade_llm_tokens_total")
    client = OpenAICompatLlm(base)
    try:
        gen = client.stream(user(LONG_PROMPT, max_tokens=600, temperature=0.0))
        n = 0
        async for _ in gen:
            n += 1
            if n == 4:
                break
        cancel_at = time.monotonic()
        await gen.aclose()  # type: ignore[attr-defined]
        while metric(base, "cascade_llm_cancelled_total") < cancelled + 1:
            # A hang guard, not a speed bound: the token count below is the real check.
            assert time.monotonic() - cancel_at < 60.0, "server never noticed the disconnect"
            await asyncio.sleep(0.02)
        assert metric(base, "cascade_llm_active_requests") == 0
        tokens = metric(base, "cascade_llm_tokens_total")
        await asyncio.sleep(0.3)
        assert metric(base, "cascade_llm_tokens_total") == tokens  # nothing generated since
        assert tokens - tokens_before < n + max_after, tokens - tokens_before
    finally:
        await client.aclose()


def primers(base: str, outcome: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    m = re.search(rf'^cascade_llm_prefills_total{{outcome="{outcome}"}} ([0-9.e+-]+)$', text,
                  re.M)
    return float(m.group(1)) if m else 0.0


async def test_a_primer_over_http_runs_in_the_engine(base: str) -> None:
    system = ChatMessage(role="system", content="You answer questions about the weather.")
    run = primers(base, "run")
    cached = metric(base, "cascade_llm_cached_prompt_tokens_total")
    client = OpenAICompatLlm(base)
    try:
        primed = [d async for d in client.stream(LlmRequest(
            messages=[system, ChatMessage(role="user", content="What is the weather in")],
            prefill_only=True))]
        assert [d.text for d in primed] == [""]  # no text, only the end
        assert primers(base, "run") == run + 1
        deltas = [d async for d in client.stream(LlmRequest(
            messages=[system, ChatMessage(role="user", content="What is the weather in Rome?")],
            max_tokens=4, temperature=0.0))]
    finally:
        await client.aclose()
    assert deltas[-1].finish_reason in ("stop", "length")
    # the real request found the primer's prompt in its slot
    assert metric(base, "cascade_llm_cached_prompt_tokens_total") - cached >= 10


async def test_two_concurrent_requests_over_http(base: str) -> None:
    client = OpenAICompatLlm(base)

    async def run(prompt: str) -> list[LlmDelta]:
        return [d async for d in client.stream(user(prompt, max_tokens=16, temperature=0.0))]

    try:
        a, b = await asyncio.gather(run("Name a color."), run("Name an animal."))
    finally:
        await client.aclose()
    for deltas in (a, b):
        assert "".join(d.text for d in deltas).strip()
        assert deltas[-1].finish_reason in ("stop", "length")


async def test_client_reports_http_errors(base: str) -> None:
    client = OpenAICompatLlm(base)
    try:
        bad = LlmRequest.model_construct(messages=[], tools=None, tool_choice=None,
                                         temperature=None, max_tokens=None, stop=None)
        with pytest.raises(LlmError) as info:
            async for _ in client.stream(bad):
                pass
        assert info.value.status == 400
    finally:
        await client.aclose()
    dead = OpenAICompatLlm("http://127.0.0.1:9", timeout=2)
    with pytest.raises(LlmError) as info:
        async for _ in dead.stream(user("hi")):
            pass
    assert info.value.code == "unavailable"
    await dead.aclose()


def test_openai_sdk_streaming_and_not(base: str) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["smollm2-135m-instruct"]
    # Greedy decoding (temperature 0): the same reply in every run, several tokens long.
    chunks = list(client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hello!"}],
        stream=True, max_tokens=12, stream_options={"include_usage": True}, temperature=0.0))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 3
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")

    resp = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hello!"}], max_tokens=12, temperature=0.0)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert (resp.choices[0].message.content or "").strip()
    assert resp.usage is not None and 0 < resp.usage.completion_tokens <= 12


def test_openai_sdk_tool_call(base: str) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    resp = client.chat.completions.create(  # type: ignore[call-overload]
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL.model_dump(exclude_none=True)],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40)
    choice = resp.choices[0]  # (untyped: the SDK's overloads reject plain dict tools)
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert call.id


async def test_history_with_tool_messages_is_accepted(base: str) -> None:
    client = OpenAICompatLlm(base)
    req = LlmRequest(messages=[
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(role="assistant", content=None, tool_calls=[{  # type: ignore[list-item]
            "id": "call_1", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]),
        ChatMessage(role="tool", content='{"temp_c": 21}', tool_call_id="call_1"),
    ], max_tokens=8)
    try:
        deltas = [d async for d in client.stream(req)]
    finally:
        await client.aclose()
    assert deltas[-1].finish_reason in ("stop", "length")


@pytest.mark.parametrize(("body", "code", "param"), [
    (b'{"messages": [', "invalid_json", None),
    (b"", "invalid_json", None),
    (b"[1, 2]", "invalid_json", None),
    # found by fuzzing: a 500 (RecursionError); lone surrogates are invalid JSON too
    (b"[" * 100_000, "invalid_json", None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}',
     "invalid_json", None),
    (b'{"model": "x"}', "invalid_request", "messages"),
    (b'{"messages": []}', "invalid_request", "messages"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}', "invalid_request",
     "messages.0.role"),
    (b'{"messages": [{"role": "user"}]}', "invalid_request", "messages.0.content"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "unsupported", "n"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
     "invalid_request", "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}',
     "invalid_request", "temperature"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     "unsupported_content", "messages.0.content"),
])
def test_bad_requests_get_400(base: str, body: bytes, code: str, param: str | None) -> None:
    r = httpx.post(f"{base}/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert err["param"] == param
    assert err["message"]


def test_oversized_body_gets_413(base: str) -> None:
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * MAX_BODY + b'"}]}'
    r = httpx.post(f"{base}/v1/chat/completions", content=big, timeout=10)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


def test_context_overflow_gets_400_and_service_survives(base: str) -> None:
    body = {"messages": [{"role": "user", "content": "word " * 1500}], "stream": True}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    ok = httpx.post(f"{base}/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_tokens": 4})
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
