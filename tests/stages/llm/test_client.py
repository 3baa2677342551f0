"""``OpenAICompatLlm.context_window``: read once from ``/v1/models`` (``max_model_len``, as
vLLM and our service report it), never raising; a primer (``prefill_only``) on the wire. A
scripted HTTP transport plays the server so every odd answer can be tried; the real service
and real vLLM are in test_service.py and test_vllm.py."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from stages.llm.client import PREFILL_ONLY_HEADER, OpenAICompatLlm
from stages.llm.types import LlmDelta, LlmUsage
from tests.stages.llm.conftest import user


class ModelsServer:
    """Answers ``GET /v1/models`` with ``answer`` (a response, or an exception to raise)."""

    def __init__(self, answer: Callable[[], httpx.Response]) -> None:
        self.answer = answer
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "GET"
        assert request.url.path == "/v1/models"
        self.calls += 1
        return self.answer()


def models(*entries: dict[str, object]) -> Callable[[], httpx.Response]:
    return lambda: httpx.Response(200, json={"object": "list", "data": list(entries)})


async def window_of(server: ModelsServer, model: str = "smol") -> int | None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as http:
        client = OpenAICompatLlm("http://llm:8000", model=model, http_client=http)
        return await client.context_window()


async def test_reads_max_model_len_once() -> None:
    server = ModelsServer(models({"id": "smol", "object": "model", "max_model_len": 8192}))
    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as http:
        client = OpenAICompatLlm("http://llm:8000", model="smol", http_client=http)
        assert await client.context_window() == 8192
        assert await client.context_window() == 8192
    assert server.calls == 1


async def test_picks_the_served_model_among_several() -> None:
    server = ModelsServer(models({"id": "other", "max_model_len": 1000},
                                 {"id": "smol", "max_model_len": 2048}))
    assert await window_of(server) == 2048
    # a single model under another name is the one being served
    assert await window_of(ModelsServer(models({"id": "x", "max_model_len": 512}))) == 512
    # several, none ours: no guess
    assert await window_of(ModelsServer(models({"id": "a", "max_model_len": 1},
                                               {"id": "b", "max_model_len": 2}))) is None


@pytest.mark.parametrize("answer", [
    models({"id": "smol", "object": "model"}),  # an OpenAI-style server: no max_model_len
    models({"id": "smol", "max_model_len": "2048"}),
    models({"id": "smol", "max_model_len": 0}),
    models({"id": "smol", "max_model_len": True}),
    models(),
    lambda: httpx.Response(200, json={"data": "nope"}),
    lambda: httpx.Response(200, json=["not", "an", "object"]),
    lambda: httpx.Response(200, content=b"<html>not json</html>"),
    lambda: httpx.Response(404, json={"error": {"message": "not found"}}),
    lambda: httpx.Response(500, content=b"boom"),
])
async def test_unknown_window_is_none_and_cached(answer: Callable[[], httpx.Response]) -> None:
    server = ModelsServer(answer)
    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as http:
        client = OpenAICompatLlm("http://llm:8000", model="smol", http_client=http)
        assert await client.context_window() is None
        assert await client.context_window() is None
    assert server.calls == 1  # the server answered: no point asking again


async def test_unreachable_server_gives_none_and_is_asked_again() -> None:
    up = False

    def answer() -> httpx.Response:
        if not up:
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, json={"data": [{"id": "smol", "max_model_len": 2048}]})

    server = ModelsServer(answer)
    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as http:
        client = OpenAICompatLlm("http://llm:8000", model="smol", http_client=http)
        assert await client.context_window() is None
        up = True
        assert await client.context_window() == 2048
        assert await client.context_window() == 2048
    assert server.calls == 2


async def test_a_real_closed_port_gives_none() -> None:
    client = OpenAICompatLlm("http://127.0.0.1:9", timeout=2)
    try:
        assert await client.context_window() is None
    finally:
        await client.aclose()


def _sse(*chunks: dict[str, object]) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + \
        b"data: [DONE]\n\n"


class CompletionsServer:
    """Answers ``POST /v1/chat/completions`` as vLLM does for ``max_tokens=1``: one token,
    finish ``length``, then usage; records each request."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "POST" and request.url.path == "/v1/chat/completions"
        self.requests.append(request)
        body = _sse(
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
            {"choices": [{"index": 0, "delta": {"content": "The"}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
            {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 1}},
        )
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})


async def test_a_primer_goes_out_with_the_header_and_one_token() -> None:
    server = CompletionsServer()
    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as http:
        client = OpenAICompatLlm("http://llm:8000", model="smol", http_client=http)
        primed = [d async for d in client.stream(user("Tell me about the", max_tokens=200,
                                                      prefill_only=True))]
        normal = [d async for d in client.stream(user("Tell me about the weather"))]
    primer_req, normal_req = server.requests
    assert primer_req.headers.get(PREFILL_ONLY_HEADER) == "1"
    primer_body = json.loads(primer_req.content)
    assert primer_body["max_tokens"] == 1  # whatever the request asked for
    assert "prefill_only" not in primer_body  # vLLM warns about unknown body fields
    assert primer_body["messages"] == [{"role": "user", "content": "Tell me about the"}]
    # the token the server generated is dropped: only the end comes back
    assert primed == [LlmDelta(finish_reason="length",
                               usage=LlmUsage(prompt_tokens=30, completion_tokens=1))]
    # an ordinary request: no header, no token limit added, its text streamed
    assert PREFILL_ONLY_HEADER not in normal_req.headers
    assert "max_tokens" not in json.loads(normal_req.content)
    assert [d.text for d in normal] == ["The", ""]


class _DiesBeforeItsFirstToken(httpx.AsyncByteStream):
    """A response body whose server goes away before the first token."""

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        yield b": keep-alive\n\n"
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")


async def test_a_replica_dying_before_the_first_token_moves_the_request() -> None:
    """Two replicas (scripted, no network: polling off): the first one's response breaks
    before any token; the same request goes to the second and its text comes back, and
    the first is marked down."""
    served = CompletionsServer()
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        if request.url.host == "10.9.0.1":
            return httpx.Response(200, stream=_DiesBeforeItsFirstToken(),
                                  headers={"content-type": "text/event-stream"})
        return served(request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = OpenAICompatLlm("http://10.9.0.1:8000,http://10.9.0.2:8000", model="smol",
                                 http_client=http)
        client.replicas.poll_interval_s = 0
        deltas = [d async for d in client.stream(user("Hello"))]
        assert [d.text for d in deltas] == ["The", ""] and calls == ["10.9.0.1", "10.9.0.2"]
        first = client.replicas.replicas[0]
        assert first.url == "http://10.9.0.1:8000/v1" and not first.up
        assert all(r.local_open == 0 for r in client.replicas.replicas)
        await client.aclose()
