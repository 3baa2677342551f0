"""OpenAICompatLlm under cancellation: a stream cancelled twice (a barge-in, then the
session's end) gives its connection back to the pool. It used not to: httpcore's own close
of the interrupted response was cut short by the second cancellation, the connection
stayed checked out, and after 100 of them every LLM request waited (found by the soak)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest

from benchmarks.reliability.fault_fleet import FakeStagesProcess
from stages.llm.client import OpenAICompatLlm
from stages.llm.types import ChatMessage, LlmRequest


@pytest.fixture(scope="module")
def llm_port() -> Iterator[int]:
    fakes = FakeStagesProcess()
    try:
        yield fakes.wait_ready()[1]
    finally:
        fakes.close()


async def _consume(llm: OpenAICompatLlm, request: LlmRequest) -> None:
    async for _ in llm.stream(request):
        pass


async def test_streams_cancelled_twice_give_their_connections_back(llm_port: int) -> None:
    llm = OpenAICompatLlm(f"http://127.0.0.1:{llm_port}")
    rng = random.Random(7)
    request = LlmRequest(messages=[ChatMessage(role="user", content="hi")], max_tokens=20)
    try:
        for _ in range(60):
            task = asyncio.create_task(_consume(llm, request))
            await asyncio.sleep(rng.uniform(0.0, 0.3))  # before, at or after the first token
            task.cancel()
            await asyncio.sleep(0)  # the first cancellation is being handled...
            task.cancel()  # ...when the second comes
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.5)
        pool = llm._http._transport._pool  # type: ignore[attr-defined]
        stuck = [c for c in pool.connections if not (c.is_idle() or c.is_closed())]
        assert not stuck, f"{len(stuck)} connections left checked out"
        # and the client still works
        deltas = [d async for d in llm.stream(request)]
        assert "".join(d.text for d in deltas).strip()
    finally:
        await llm.aclose()
