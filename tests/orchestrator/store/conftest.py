"""Store fixtures: one redis-server for the module run, and a parametrized store factory
so every behavioural test runs against both backends."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from orchestrator.store import MemoryStore, SessionStore, StoreSettings
from orchestrator.store.redis_store import RedisStore
from tests.support.redis_server import redis_server

StoreFactory = Callable[..., Awaitable[SessionStore]]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture(loop_scope="function")
async def make_store(backend: str, request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """``await make_store(**settings)`` -> a new store of the test's backend. Stores made
    by one call share state (two Redis clients on one server stand in for two processes;
    the memory backend returns the same instance, its process being the only one)."""
    url = request.getfixturevalue("redis_url") if backend == "redis" else None
    opened: list[SessionStore] = []
    shared: dict[str, MemoryStore] = {}

    async def make(**overrides: Any) -> SessionStore:
        settings = StoreSettings(redis_url=url, **overrides)
        store: SessionStore
        if url is not None:
            store = await RedisStore.connect(settings)
        else:
            key = repr(sorted(overrides.items()))
            if key not in shared:
                shared[key] = MemoryStore(settings)
            store = shared[key]
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.aclose()


async def raw_state(store: SessionStore, session_id: str) -> object:
    """Everything the backend keeps of one session, to compare before and after a refused
    write: for Redis each key's ``DUMP`` bytes and absolute expiry (``PEXPIRETIME``, so a
    re-armed TTL shows), for memory a deep copy of the session record (with its deadline
    and lease). Equal results mean nothing changed, not even a TTL."""
    if isinstance(store, RedisStore):
        assert store.settings.redis_url is not None
        raw = aioredis.Redis.from_url(store.settings.redis_url)
        try:
            keys = store._keys(session_id)
            return [(await raw.dump(key), await raw.pexpiretime(key))
                    for key in keys]
        finally:
            await raw.aclose()
    assert isinstance(store, MemoryStore)
    return copy.deepcopy(store._sessions.get(session_id))
