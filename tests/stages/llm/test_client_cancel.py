"""OpenAICompatLlm under cancellation: a stream cancelled twice (a barge-in, then the
session's end) gives its connection back to the pool. It used not to: httpcore's own close
of the interrupted response was cut short by the second cancellation, the connection
stayed checked out, and after 100 of them every LLM request waited (found by the soak).
The body's reader is never cancelled at all: a single cancellation landing while httpcore
closed a finished body did the same (found by the soak again, ~1 stream in 1 500)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest

from benchmarks.reliability.fault_fleet import FakeStagesProcess
from stages.common.aiter import closing
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


async def test_mixed_cancellations_never_cancel_the_body_reader(
        llm_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """25 sessions' worth of streams, each run out, cancelled while waiting for a token,
    or cancelled in the consumer's loop body (then closed), once or twice: no body reader
    task is ever cancelled (the close that httpcore runs in it must not be cut short),
    every reader has ended once its stream is closed, and no connection stays out."""
    readers: list[asyncio.Task[object]] = []
    loop_type = type(asyncio.get_running_loop())
    create_task = loop_type.create_task

    def spy(loop: asyncio.AbstractEventLoop, coro: object, **kw: object) -> asyncio.Task[object]:
        task = create_task(loop, coro, **kw)  # type: ignore[arg-type]
        if kw.get("name") == "llm-response-read":
            readers.append(task)
        return task

    monkeypatch.setattr(loop_type, "create_task", spy)
    llm = OpenAICompatLlm(f"http://127.0.0.1:{llm_port}")

    async def consume(request: LlmRequest, rng: random.Random) -> None:
        async with closing(llm.stream(request)) as deltas:
            async for _ in deltas:
                await asyncio.sleep(rng.uniform(0.0, 0.03))  # cancelled here, too

    async def session(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(12):
            request = LlmRequest(messages=[ChatMessage(role="user", content="hi")],
                                 max_tokens=rng.choice([5, 20, 60]))
            task = asyncio.create_task(consume(request, rng))
            kind = rng.random()
            if kind >= 0.3:
                await asyncio.sleep(rng.uniform(0.0, 0.5))
                task.cancel()
                if kind < 0.65:
                    for _ in range(rng.randint(0, 3)):
                        await asyncio.sleep(0)
                    task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    try:
        await asyncio.gather(*(session(seed) for seed in range(25)))
        await asyncio.sleep(0.5)
        assert len(readers) > 100
        cancelled = sum(t.cancelled() for t in readers)
        assert cancelled == 0, f"{cancelled} of {len(readers)} body readers were cancelled"
        assert all(t.done() for t in readers)
        pool = llm._http._transport._pool  # type: ignore[attr-defined]
        stuck = [c for c in pool.connections if not (c.is_idle() or c.is_closed())]
        assert not stuck, f"{len(stuck)} connections left checked out"
        assert not pool._requests  # no response left registered with the pool
    finally:
        await llm.aclose()
