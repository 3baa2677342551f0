"""Client secrets in the store, once per backend (memory and a real redis-server), plus the
memory bound and the Redis key layout. Two Redis stores on one server stand in for two
orchestrator replicas."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
import redis.asyncio as aioredis

from orchestrator.keys import ClientSecrets, secret_id
from orchestrator.store import MemoryStore, StoreClosed, StoreLimitError, StoreSettings
from orchestrator.store.redis_store import RedisStore
from tests.orchestrator.store.conftest import StoreFactory

DIGEST = hashlib.sha256(b"ek_example").hexdigest()
RECORD = {"expires_at": 1_700_000_600, "session": {"instructions": "Be brief. ✓"}}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_put_and_get_across_replicas(make_store: StoreFactory) -> None:
    first, second = await make_store(), await make_store()
    await first.put_client_secret(DIGEST, RECORD, 60)
    assert await second.get_client_secret(DIGEST) == RECORD
    assert await first.get_client_secret(hashlib.sha256(b"other").hexdigest()) is None
    got = await second.get_client_secret(DIGEST)
    assert got is not None
    got["session"]["instructions"] = "changed"  # a copy: the stored record is unchanged
    assert await first.get_client_secret(DIGEST) == RECORD
    await second.put_client_secret(DIGEST, {"expires_at": 1}, 60)  # a put replaces
    assert await first.get_client_secret(DIGEST) == {"expires_at": 1}


async def test_a_secret_expires_for_every_replica(make_store: StoreFactory) -> None:
    first, second = await make_store(), await make_store()
    short, long = DIGEST, hashlib.sha256(b"long").hexdigest()
    await first.put_client_secret(short, RECORD, 0.4)
    await first.put_client_secret(long, RECORD, 30)
    assert await second.get_client_secret(short) == RECORD
    await asyncio.sleep(0.8)
    assert await second.get_client_secret(short) is None
    assert await first.get_client_secret(short) is None
    assert await second.get_client_secret(long) == RECORD


async def test_bad_ids_ttls_and_records(make_store: StoreFactory) -> None:
    store = await make_store(max_client_secret_bytes=128)
    for bad_id in ("", "a b", "x" * 129, "{tag}", "é", "a:b"):
        with pytest.raises(ValueError):
            await store.put_client_secret(bad_id, RECORD, 10)
        assert await store.get_client_secret(bad_id) is None
    for ttl in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            await store.put_client_secret(DIGEST, RECORD, ttl)
    with pytest.raises(StoreLimitError):
        await store.put_client_secret(DIGEST, {"session": {"instructions": "x" * 200}}, 10)
    with pytest.raises(ValueError):
        await store.put_client_secret(DIGEST, {"bad": object()}, 10)
    assert await store.get_client_secret(DIGEST) is None  # nothing was stored


async def test_a_closed_store_refuses_secrets(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.put_client_secret(DIGEST, RECORD, 10)
    await store.aclose()
    with pytest.raises(StoreClosed):
        await store.get_client_secret(DIGEST)
    with pytest.raises(StoreClosed):
        await store.put_client_secret(DIGEST, RECORD, 10)


async def test_minted_keys_work_across_replicas_and_only_their_digest_is_stored(
        make_store: StoreFactory) -> None:
    first, second = await make_store(), await make_store()
    minting = ClientSecrets(first)
    other_clock = Clock(0.0)
    other = ClientSecrets(second, clock=other_clock)
    minted = await minting.mint(seconds=30, session={"instructions": "Hello there."})
    other_clock.now = minted.expires_at - 1
    found = await other.lookup(minted.value)
    assert found is not None and found.session == {"instructions": "Hello there."}
    assert found.expires_at == minted.expires_at
    other_clock.now = minted.expires_at  # this replica's clock says it expired
    assert await other.lookup(minted.value) is None
    assert minted.value.encode() not in await dump_secrets(first)
    assert secret_id(minted.value).encode() in await dump_secrets(first)


async def dump_secrets(store: Any) -> bytes:
    """Every byte the backend holds for client secrets (Redis: all keys and values)."""
    if isinstance(store, RedisStore):
        assert store.settings.redis_url is not None
        raw = aioredis.Redis.from_url(store.settings.redis_url)
        try:
            out = b""
            async for key in raw.scan_iter(match=f"{store.settings.key_prefix}:ek:*"):
                out += key + b"\n" + (await raw.get(key) or b"") + b"\n"
            return out
        finally:
            await raw.aclose()
    assert isinstance(store, MemoryStore)
    return repr(store._secrets).encode()


# -- memory only ----------------------------------------------------------------------


async def test_memory_bounds_live_secrets_and_drops_expired_ones() -> None:
    clock = Clock(100.0)
    store = MemoryStore(StoreSettings(max_client_secrets=3), clock=clock)
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(5)]
    for key_id in ids[:3]:
        await store.put_client_secret(key_id, RECORD, 10)
    with pytest.raises(StoreLimitError):
        await store.put_client_secret(ids[3], RECORD, 10)
    await store.put_client_secret(ids[0], RECORD, 20)  # replacing a live one is fine
    clock.now = 110.0  # ids 1 and 2 expire, id 0 (replaced) lives until 120
    await store.put_client_secret(ids[3], RECORD, 10)
    await store.put_client_secret(ids[4], RECORD, 10)
    assert set(store._secrets) == {ids[0], ids[3], ids[4]}
    assert await store.get_client_secret(ids[1]) is None
    assert await store.get_client_secret(ids[0]) == RECORD
    clock.now = 120.0
    assert await store.get_client_secret(ids[0]) is None


async def test_memory_deadline_heap_stays_bounded_under_replacement() -> None:
    store = MemoryStore(StoreSettings(), clock=Clock(0.0))
    for _ in range(5000):
        await store.put_client_secret(DIGEST, RECORD, 60)
    assert len(store._secrets) == 1
    assert len(store._secret_deadlines) <= 2 + 1024 + 1


# -- redis only -----------------------------------------------------------------------


async def test_redis_key_layout_and_ttl(redis_url: str) -> None:
    store = await RedisStore.connect(StoreSettings(redis_url=redis_url, key_prefix="t-ek"))
    raw = aioredis.Redis.from_url(redis_url)
    try:
        await store.put_client_secret(DIGEST, RECORD, 42.0)
        key = f"t-ek:ek:{DIGEST}"
        assert await raw.type(key) == b"string"
        assert 30_000 < await raw.pttl(key) <= 42_000  # milliseconds of the 42 s
    finally:
        await raw.aclose()
        await store.aclose()
