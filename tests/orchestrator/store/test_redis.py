"""Redis-backend specifics against a real redis-server: several store instances (each its
own connection pool, standing in for orchestrator processes) sharing sessions, the key
layout and TTLs, and failures of a client or of the server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from orchestrator.launcher import free_port
from orchestrator.store import (
    SessionBusy,
    StoreClosed,
    StoreSettings,
    StoreUnavailable,
    open_store,
)
from orchestrator.store.redis_store import RedisStore
from tests.support.redis_server import redis_server


def msg(item_id: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": f"text of {item_id}"}]}


@contextlib.asynccontextmanager
async def stores(url: str, n: int, **overrides: Any) -> AsyncIterator[list[RedisStore]]:
    opened = [await RedisStore.connect(StoreSettings(redis_url=url, **overrides))
              for _ in range(n)]
    try:
        yield opened
    finally:
        for store in opened:
            await store.aclose()


async def test_another_process_resumes_the_conversation(redis_url: str) -> None:
    async with stores(redis_url, 2, lease_ttl_s=0.8) as (a, b):
        sid, token = await a.create_session({"voice": "joe"}, owner="proc-a/conn-1")
        for i in range(25):
            await a.append_item(sid, msg(f"item_{i:02d}"))
        await a.update_item(sid, "item_03", {**msg("item_03"), "status": "incomplete"})
        await a.set_turn_state(sid, {"phase": "speaking"})
        with pytest.raises(SessionBusy):  # process A is alive and renewing
            await b.resume(sid, token, owner="proc-b/conn-1")
        await a.aclose()  # process A dies without releasing; its lease runs out
        await asyncio.sleep(1.2)
        snap = await b.resume(sid, token, owner="proc-b/conn-1")
        assert [i["id"] for i in snap.items] == [f"item_{i:02d}" for i in range(25)]
        assert snap.items[3]["status"] == "incomplete"
        assert snap.items[7] == msg("item_07")
        assert snap.config == {"voice": "joe"} and snap.turn_state == {"phase": "speaking"}
        assert await b.lease_owner(sid) == "proc-b/conn-1"
        assert await b.append_item(sid, msg("item_25")) == 25


async def test_two_processes_append_concurrently(redis_url: str) -> None:
    # 60 concurrent appends per process through a pool of 4 connections: calls wait for a
    # connection rather than fail or open more
    async with stores(redis_url, 2, redis_max_connections=4) as (a, b):
        sid, _ = await a.create_session({})

        async def writer(store: RedisStore, name: str) -> None:
            await asyncio.gather(*(store.append_item(sid, msg(f"{name}{i:03d}"))
                                   for i in range(60)))

        await asyncio.gather(writer(a, "a"), writer(b, "b"))
        got = [i["id"] for i in await b.list_items(sid)]
        raw = aioredis.Redis.from_url(redis_url)
        try:
            assert len(await raw.client_list()) <= 2 * 4 + 1
        finally:
            await raw.aclose()
        assert sorted(got) == sorted([f"a{i:03d}" for i in range(60)]
                                     + [f"b{i:03d}" for i in range(60)])


async def test_one_client_closed_midway_the_other_continues(redis_url: str) -> None:
    async with stores(redis_url, 2) as (a, b):
        sid, token = await a.create_session({})
        written: list[str] = []
        ten_from_a = asyncio.Event()

        async def writer(store: RedisStore, name: str, n: int) -> str | None:
            for i in range(n):
                item_id = f"{name}{i:03d}"
                try:
                    await store.append_item(sid, msg(item_id))
                except StoreClosed as exc:
                    return exc.code
                written.append(item_id)
                if name == "a" and i == 9:
                    ten_from_a.set()
                await asyncio.sleep(0)
            return None

        async def killer() -> None:
            await ten_from_a.wait()
            await a.aclose()

        results = await asyncio.gather(writer(a, "a", 200), writer(b, "b", 80), killer())
        assert results[0] == "store_closed" and results[1] is None
        got = [i["id"] for i in (await b.resume(sid, token)).items]
        # every acknowledged write is there, each writer's in its order; at most the one
        # append in flight when A closed may have landed unacknowledged
        assert set(written) <= set(got) and len(got) == len(set(got))
        unacknowledged = set(got) - set(written)
        assert len(unacknowledged) <= 1 and all(u.startswith("a") for u in unacknowledged)
        for name in "ab":
            mine = [g for g in got if g.startswith(name)]
            assert mine == sorted(mine)
        assert [g for g in got if g.startswith("b")] == [f"b{i:03d}" for i in range(80)]
        assert 10 <= sum(g.startswith("a") for g in got) < 200
        with pytest.raises(StoreClosed):
            await a.list_items(sid)


async def test_keys_are_namespaced_hashed_and_expire_together(redis_url: str) -> None:
    async with stores(redis_url, 1, session_ttl_s=60, key_prefix="cascadetest") as (store,):
        sid, token = await store.create_session({"k": 1}, owner="conn-1")
        await store.append_item(sid, msg("a"))
        await store.set_turn_state(sid, {"phase": "idle"})
        raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            keys = sorted([k async for k in raw.scan_iter(f"cascadetest:s:{{{sid}}}:*")])
            base = f"cascadetest:s:{{{sid}}}:"
            assert keys == [base + p for p in ("items", "lease", "meta", "order", "turn")]
            for part in ("items", "meta", "order", "turn"):
                assert 50_000 < await raw.pttl(base + part) <= 60_000
            assert 0 < await raw.pttl(base + "lease") <= 15_000
            meta = await raw.hgetall(base + "meta")
            assert meta["token"] == hashlib.sha256(token.encode()).hexdigest()
            dump = [await raw.dump(k) for k in keys]
            assert not any(token.encode() in (d or b"") for d in dump)
            await raw.pexpire(base + "order", 1_000)  # a write re-arms every key
            await store.append_item(sid, msg("b"))
            assert await raw.pttl(base + "order") > 50_000
        finally:
            await raw.aclose()


async def test_unreachable_and_dying_server_raise_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable):
        await open_store(StoreSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0",
                                       redis_timeout_s=1.0))
    with redis_server() as url:
        store = await open_store(StoreSettings(redis_url=url, redis_timeout_s=1.0))
        assert isinstance(store, RedisStore)
        sid, _ = await store.create_session({})
    try:  # the server is gone now
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.append_item(sid, msg("a")), timeout=30)
    finally:
        await store.aclose()


async def test_memory_is_the_default_backend() -> None:
    from orchestrator.store import MemoryStore

    store = await open_store(StoreSettings())
    assert isinstance(store, MemoryStore)
    await store.aclose()


async def test_connections_the_server_dropped_are_replaced_not_failed() -> None:
    """A Redis restart (or failover) leaves the pool's idle connections dead: the next
    call on each of them must not fail with "Connection closed by server" (a new session
    or a resume refused although Redis is back). Reads and idempotent writes retry once
    on a fresh connection; appends and deletes are retried by the write-behind."""
    with redis_server() as url:
        async with stores(url, 1) as (store,):
            sid, token = await store.create_session({}, owner="conn-1")
            await store.append_item(sid, msg("a"))
            await asyncio.gather(*(store.list_items(sid) for _ in range(8)))  # 8 pooled
            raw = aioredis.from_url(url)
            try:  # every connection of the store dropped by the server
                assert await raw.client_kill_filter(_type="normal", skipme=True) >= 2
            finally:
                await raw.aclose()
            await asyncio.sleep(0.1)
            calls = [store.list_items(sid) for _ in range(4)]
            calls += [store.get_item(sid, "a"), store.renew_lease(sid, "conn-1"),
                      store.update_item(sid, "a", msg("a"), owner="conn-1"),
                      store.create_session({}), store.get_config(sid)]
            await asyncio.gather(*calls)
            snap = await store.resume(sid, token, owner="conn-2", takeover=True)
            assert [i["id"] for i in snap.items] == ["a"]
