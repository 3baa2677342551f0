"""The outbox's bound on a client that stops reading: in events and in bytes."""

from __future__ import annotations

import asyncio

from orchestrator.outbox import CLOSE_POLICY, Outbox


class StuckClient:
    """A peer whose socket is full: the first write never returns."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.closed: tuple[int, str] | None = None

    async def write(self, text: str) -> None:
        self.written.append(text)
        await asyncio.Event().wait()

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


async def test_large_events_are_bounded_in_bytes_not_only_in_number() -> None:
    peer = StuckClient()
    outbox = Outbox(peer.write, peer.close, max_events=512, close_timeout_s=1.0,
                    max_chars=1_000_000)
    outbox.start()
    event = "x" * 200_000  # a retrieved 200 KB item
    sent = 0
    while not outbox.closing.is_set() and sent < 512:
        await outbox.send(event)
        sent += 1
        await asyncio.sleep(0)
    assert outbox.closing.is_set() and outbox.close_code == CLOSE_POLICY
    assert sent <= 7, sent  # one in the stuck write, five queued, the sixth refused
    assert outbox.queued_chars == 0  # what was queued is dropped at once
    await outbox.finish()
    assert peer.closed is not None and peer.closed[0] == CLOSE_POLICY


async def test_one_event_larger_than_the_bound_still_goes_out() -> None:
    written: list[str] = []

    async def write(text: str) -> None:
        written.append(text)

    async def close(code: int, reason: str) -> None:
        pass

    outbox = Outbox(write, close, max_events=8, close_timeout_s=1.0, max_chars=100)
    outbox.start()
    await outbox.send("y" * 500)
    await outbox.finish()
    assert written == ["y" * 500]
    assert outbox.close_code != CLOSE_POLICY
