"""Service paths with a scripted backend (no model): busy -> 429, an error after the first
token -> an SSE error event then [DONE], which our client turns into LlmError; the context
window in /v1/models; a primer marked by header or body field reaches the backend as one."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi.testclient import TestClient

from stages.llm.client import PREFILL_ONLY_HEADER, OpenAICompatLlm
from stages.llm.service import create_app
from stages.llm.settings import LlmSettings
from stages.llm.types import LlmBusyError, LlmDelta, LlmError, LlmRequest, LlmUsage
from tests.stages.llm.conftest import user


class ScriptedLlm:
    def __init__(self, mode: str, window: int | None = None) -> None:
        self.mode = mode
        self.window = window
        self.closed = False
        self.requests: list[LlmRequest] = []

    async def context_window(self) -> int | None:
        return self.window

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmDelta]:
        self.requests.append(request)
        if request.prefill_only:
            yield LlmDelta(finish_reason="length",
                           usage=LlmUsage(prompt_tokens=7, completion_tokens=0))
            return
        if self.mode == "busy":
            raise LlmBusyError("9 requests waiting")
        yield LlmDelta(text="Hello")
        if self.mode == "fail":
            raise LlmError("backend exploded", code="llm_error")
        yield LlmDelta(text=" world")
        yield LlmDelta(finish_reason="stop")

    async def aclose(self) -> None:
        self.closed = True


def test_busy_backend_gives_429() -> None:
    backend = ScriptedLlm("busy")
    with TestClient(create_app(LlmSettings(), engine=backend)) as http:
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "server_busy"
        r = http.post("/v1/chat/completions", json={**body, "stream": False})
        assert r.status_code == 429
    assert backend.closed  # lifespan shutdown closes the backend


def test_mid_stream_error_is_an_sse_event() -> None:
    with TestClient(create_app(LlmSettings(), engine=ScriptedLlm("fail"))) as http:
        r = http.post("/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
        assert r.status_code == 200
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert '"Hello"' in events[1]
        assert '"backend exploded"' in events[-2]
        assert events[-1] == "[DONE]"


async def test_client_raises_on_sse_error_event() -> None:
    app = create_app(LlmSettings(), engine=ScriptedLlm("fail"))
    with TestClient(app):  # runs the lifespan so the app is ready
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            client = OpenAICompatLlm("http://test", http_client=http)
            got: list[str] = []
            with pytest.raises(LlmError, match="backend exploded"):
                async for d in client.stream(user("hi")):
                    got.append(d.text)
            assert got == ["Hello"]


def test_ok_backend_non_streaming_aggregates() -> None:
    with TestClient(create_app(LlmSettings(), engine=ScriptedLlm("ok"))) as http:
        r = http.post("/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        msg = r.json()["choices"][0]
        assert msg["message"]["content"] == "Hello world"
        assert msg["finish_reason"] == "stop"


@pytest.mark.parametrize("window", [4096, None])
def test_models_report_the_backends_context_window(window: int | None) -> None:
    with TestClient(create_app(LlmSettings(), engine=ScriptedLlm("ok", window))) as http:
        model = http.get("/v1/models").json()["data"][0]
    assert model["id"] == "smollm2-135m-instruct"
    if window is None:
        assert "max_model_len" not in model  # unknown: say nothing rather than guess
    else:
        assert model["max_model_len"] == window


@pytest.mark.parametrize(("headers", "extra", "primer"), [
    ({PREFILL_ONLY_HEADER: "1"}, {}, True),
    ({PREFILL_ONLY_HEADER.lower(): "true"}, {}, True),
    ({}, {"prefill_only": True}, True),
    ({PREFILL_ONLY_HEADER: "0"}, {}, False),
    ({}, {}, False),
])
@pytest.mark.parametrize("stream", [True, False])
def test_the_service_honours_the_primer_header_and_field(
        headers: dict[str, str], extra: dict[str, object], primer: bool, stream: bool) -> None:
    backend = ScriptedLlm("ok")
    with TestClient(create_app(LlmSettings(), engine=backend)) as http:
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}
        r = http.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200
    assert [req.prefill_only for req in backend.requests] == [primer]
    if primer:
        assert "Hello" not in r.text  # nothing generated reaches the caller


async def test_a_primer_from_our_client_reaches_the_backend_as_one() -> None:
    backend = ScriptedLlm("ok")
    app = create_app(LlmSettings(), engine=backend)
    with TestClient(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            client = OpenAICompatLlm("http://test", http_client=http)
            deltas = [d async for d in client.stream(user("hi", prefill_only=True))]
    (req,) = backend.requests
    assert req.prefill_only and req.max_tokens == 1
    assert [d.text for d in deltas] == [""]
    assert deltas[-1].finish_reason == "length"
