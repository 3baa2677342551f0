"""WriteBehind: a session's store writes applied in order by one task (memory and Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest

from orchestrator.store import (
    ItemNotFound,
    LeaseLost,
    SessionStore,
    StoreError,
    StoreLimitError,
    StoreUnavailable,
)
from orchestrator.store.write_behind import WriteBehind
from tests.orchestrator.store.conftest import StoreFactory

OWNER = "conn-a"


class Recorder:
    def __init__(self) -> None:
        self.lease_lost = 0
        self.errors: list[tuple[str, StoreError]] = []

    def on_lease_lost(self) -> None:
        self.lease_lost += 1

    async def on_error(self, what: str, err: StoreError) -> None:
        self.errors.append((what, err))


def writer(rec: Recorder, **kwargs: Any) -> WriteBehind:
    return WriteBehind("s", on_lease_lost=rec.on_lease_lost, on_error=rec.on_error,
                       retry_delays_s=(0.0, 0.0), **kwargs)


async def session(make_store: StoreFactory) -> tuple[SessionStore, str]:
    store = await make_store()
    created = await store.create_session({"k": 1}, owner=OWNER)
    return store, created.session_id


def item(item_id: str, text: str = "") -> dict[str, Any]:
    return {"id": item_id, "type": "message", "text": text}


async def test_writes_apply_in_order_after_put_returns(make_store: StoreFactory) -> None:
    store, sid = await session(make_store)
    rec = Recorder()
    w = writer(rec)
    # Each write depends on the one before: B names A as previous, the update needs A.
    await w.put(partial(store.append_item, sid, item("a"), owner=OWNER), "a")
    await w.put(partial(store.append_item, sid, item("b"), "a", owner=OWNER), "b")
    await w.put(partial(store.update_item, sid, "a", item("a", "final"), owner=OWNER), "a2")
    assert w.pending == 3  # queued, none applied yet: put did not wait for the store
    assert await w.drain(5.0)
    assert w.pending == 0 and w.applied == 3
    assert await store.list_items(sid) == [item("a", "final"), item("b")]
    # ``run`` waits for its own result, after everything queued before it.
    await w.put(partial(store.append_item, sid, item("c"), owner=OWNER), "c")
    position = await w.run(partial(store.append_item, sid, item("d"), "c", owner=OWNER), "d")
    assert position == 3
    assert rec.errors == [] and rec.lease_lost == 0
    await w.aclose()


async def test_the_queue_is_bounded(make_store: StoreFactory) -> None:
    store, sid = await session(make_store)
    gate = asyncio.Event()

    async def blocked() -> None:
        await gate.wait()

    w = writer(Recorder(), max_pending=2)
    await w.put(blocked, "first")  # taken by the writer task at its next step
    await asyncio.sleep(0)
    await w.put(partial(store.append_item, sid, item("a"), owner=OWNER), "a")
    await w.put(partial(store.append_item, sid, item("b"), owner=OWNER), "b")
    third = asyncio.create_task(w.put(partial(store.append_item, sid, item("c"),
                                              owner=OWNER), "c"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not third.done()  # no room: the caller waits instead of the queue growing
    gate.set()
    await third
    assert await w.drain(5.0)
    assert [i["id"] for i in await store.list_items(sid)] == ["a", "b", "c"]
    await w.aclose()


async def test_a_lost_lease_stops_the_writer_and_drops_the_queue(
        make_store: StoreFactory) -> None:
    store, sid = await session(make_store)
    await store.acquire_lease(sid, "conn-b", takeover=True)  # another connection took it
    rec = Recorder()
    w = writer(rec)
    await w.put(partial(store.append_item, sid, item("a"), owner=OWNER), "a")
    await w.put(partial(store.append_item, sid, item("b"), owner=OWNER), "b")
    assert await w.drain(5.0)
    assert rec.lease_lost == 1 and rec.errors == []
    assert await store.list_items(sid) == []  # the fence refused a; b never ran
    with pytest.raises(LeaseLost):
        await w.put(partial(store.append_item, sid, item("c"), owner=OWNER), "c")
    with pytest.raises(LeaseLost):
        await w.run(partial(store.append_item, sid, item("c"), owner=OWNER), "c")
    await w.aclose()


async def test_an_unreachable_store_is_retried_without_duplicating(
        make_store: StoreFactory) -> None:
    store, sid = await session(make_store)
    calls = 0

    async def lands_then_drops() -> int:
        """The append lands, then the connection drops before its answer (a retry must
        not fail on the item it stored itself)."""
        nonlocal calls
        calls += 1
        if calls == 1:
            await store.append_item(sid, item("a"), owner=OWNER)
            raise StoreUnavailable("connection reset")
        return await store.append_item(sid, item("a"), owner=OWNER)

    async def flaky() -> int:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise StoreUnavailable("connection refused")
        return await store.append_item(sid, item("b"), owner=OWNER)

    rec = Recorder()
    w = writer(rec)
    await w.put(lands_then_drops, "a")
    await w.put(flaky, "b")
    assert await w.drain(5.0)
    assert rec.errors == []
    assert [i["id"] for i in await store.list_items(sid)] == ["a", "b"]
    await w.aclose()


async def test_a_refused_write_is_reported_and_the_writer_goes_on(
        make_store: StoreFactory) -> None:
    store, sid = await session(make_store)

    async def down() -> None:
        raise StoreUnavailable("still down")

    async def too_big() -> None:
        raise StoreLimitError("item too large")

    rec = Recorder()
    w = writer(rec)
    await w.put(down, "item x")
    await w.put(too_big, "item y")
    await w.put(partial(store.append_item, sid, item("z"), owner=OWNER), "item z")
    assert await w.drain(5.0)
    assert [(what, type(err)) for what, err in rec.errors] == [
        ("item x", StoreUnavailable), ("item y", StoreLimitError)]
    assert [i["id"] for i in await store.list_items(sid)] == ["z"]
    # ``run`` hands its error to its caller instead.
    with pytest.raises(ItemNotFound):
        await w.run(partial(store.update_item, sid, "nope", item("nope"), owner=OWNER), "n")
    assert len(rec.errors) == 2
    await w.aclose()


async def test_close_drops_what_was_not_drained(make_store: StoreFactory) -> None:
    store, sid = await session(make_store)
    gate = asyncio.Event()
    w = writer(Recorder())
    calls: list[Callable[[], Awaitable[Any]]] = []

    async def blocked() -> None:
        calls.append(blocked)
        await gate.wait()

    await w.put(blocked, "blocked")
    await w.put(partial(store.append_item, sid, item("a"), owner=OWNER), "a")
    await asyncio.sleep(0)
    assert not await w.drain(0.05)  # the first write hangs: drain gives up
    await w.aclose()
    assert calls and await store.list_items(sid) == []
    with pytest.raises(LeaseLost):
        await w.put(partial(store.append_item, sid, item("b"), owner=OWNER), "b")
