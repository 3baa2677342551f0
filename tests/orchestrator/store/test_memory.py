"""Memory-backend specifics: the session bound and what is kept of the token."""

from __future__ import annotations

import hashlib

import pytest

from orchestrator.store import MemoryStore, SessionNotFound, StoreLimitError, StoreSettings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_max_sessions_refuses_then_frees_expired() -> None:
    clock = FakeClock()
    store = MemoryStore(StoreSettings(max_sessions=2, session_ttl_s=10), clock=clock)
    first, first_token = await store.create_session({})
    clock.now += 6
    second, _ = await store.create_session({})
    with pytest.raises(StoreLimitError, match="sessions"):
        await store.create_session({})
    clock.now += 5  # the first is idle for 11 s > 10 s, the second for 5 s
    third, _ = await store.create_session({})
    with pytest.raises(SessionNotFound):
        await store.resume(first, first_token)
    await store.touch(second)
    assert third not in (first, second)
    assert len(store._sessions) == 2


async def test_only_a_hash_of_the_token_is_kept() -> None:
    store = MemoryStore()
    sid, token = await store.create_session({"a": 1})
    stored = store._sessions[sid]
    assert token not in repr(stored)
    assert stored.token_hash == hashlib.sha256(token.encode()).hexdigest()
