"""QueuedReadsProtocol: messages arrive whole and in order, reads pause only when the
app falls behind, and the queue stays within its bounds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import FastAPI, WebSocket
from websockets.asyncio.client import connect

from stages.common.ws_reads import QueuedReadsProtocol
from tests.support.serving import serving

pytestmark = pytest.mark.asyncio


class _Counting(QueuedReadsProtocol):
    pauses = 0
    peak_messages = 0
    peak_bytes = 0

    def send_receive_event_to_app(self) -> None:
        super().send_receive_event_to_app()
        cls = type(self)
        cls.peak_messages = max(cls.peak_messages, self.queue.qsize())
        cls.peak_bytes = max(cls.peak_bytes, self._queued_bytes)
        if self.read_paused:
            cls.pauses += 1


def _app(first_read_delay_s: float, received: list[Any]) -> FastAPI:
    app = FastAPI()

    @app.websocket("/ws")
    async def ws(socket: WebSocket) -> None:
        await socket.accept()
        await asyncio.sleep(first_read_delay_s)
        while True:
            msg = await socket.receive()
            if msg["type"] == "websocket.disconnect":
                return
            received.append(msg.get("text", msg.get("bytes")))
            if received[-1] == "end":
                await socket.send_text(str(len(received)))

    return app


async def _run(app: FastAPI, payloads: list[str | bytes], monkeypatch: Any) -> str:
    import tests.support.serving as serving_mod

    monkeypatch.setattr(serving_mod, "QueuedReadsProtocol", _Counting)
    _Counting.pauses = _Counting.peak_messages = _Counting.peak_bytes = 0
    async with serving(app, wait_ready=False, lifespan="off") as (port, _server):
        async with connect(f"ws://127.0.0.1:{port}/ws", max_size=None,
                           compression=None) as client:
            for payload in payloads:
                await client.send(payload)
            await client.send("end")
            answer = await asyncio.wait_for(client.recv(), 20)
    assert isinstance(answer, str)
    return answer


async def test_a_reader_that_keeps_up_never_pauses_and_gets_every_message(
        monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[Any] = []
    payloads: list[str | bytes] = [f"m{i}" for i in range(10)]
    assert await _run(_app(0.0, received), payloads, monkeypatch) == "11"
    assert received == [*payloads, "end"]


async def test_a_reader_that_falls_behind_pauses_reads_within_the_bounds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[Any] = []
    # 300 messages while the app does not read for 0.5 s: reads must pause at 64 queued
    payloads: list[str | bytes] = [f"m{i}" for i in range(150)] + [bytes([i % 256]) * 1000
                                                                   for i in range(150)]
    assert await _run(_app(0.5, received), payloads, monkeypatch) == "301"
    assert received == [*payloads, "end"]
    assert _Counting.pauses >= 1
    # the read that crossed the bound is parsed whole: at most one socket read more
    assert _Counting.peak_bytes < QueuedReadsProtocol.max_queued_bytes + 256 * 1024 + 1000


async def test_large_messages_pause_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[Any] = []
    big = b"x" * (256 * 1024)
    payloads: list[str | bytes] = [big] * 12  # 3 MiB while the app waits
    assert await _run(_app(0.5, received), payloads, monkeypatch) == "13"
    assert len(received) == 13 and all(r == big for r in received[:-1])
    assert _Counting.pauses >= 1
    assert _Counting.peak_bytes < QueuedReadsProtocol.max_queued_bytes + 2 * len(big)


async def test_the_services_do_not_negotiate_compression() -> None:
    """Per-message deflate off: one small read cannot inflate to megabytes of queue."""
    async with serving(_app(0.0, []), wait_ready=False, lifespan="off") as (port, _server):
        async with connect(f"ws://127.0.0.1:{port}/ws") as client:  # offers deflate
            assert client.response is not None
            assert "Sec-WebSocket-Extensions" not in client.response.headers
