"""Per-key session caps across servers sharing one Redis (orchestrator/shared_caps.py):
real redis-server, two "servers" (limiters or real uvicorn apps) on it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI

from orchestrator.backends import Backends
from orchestrator.server import Resources, create_app
from orchestrator.settings import ServeSettings
from orchestrator.shared_caps import SharedSessionCaps
from orchestrator.store.redis_store import RedisStore
from orchestrator.store.settings import StoreSettings
from stages.vad.model import SileroVadModel
from tests.orchestrator.test_limits import ACME, KEY, FakeSession, close_code, recv, ws
from tests.support.redis_server import redis_server
from tests.support.serving import serving

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@contextlib.asynccontextmanager
async def caps(url: str, ttl_s: float = 30.0, prefix: str = "t") -> AsyncIterator[
        SharedSessionCaps]:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    shared = SharedSessionCaps(client, prefix, ttl_s=ttl_s)
    try:
        yield shared
    finally:
        await shared.aclose()
        await client.aclose()


async def _settled(shared: SharedSessionCaps) -> None:
    if shared._pending:
        await asyncio.wait(set(shared._pending), timeout=5)


async def test_the_cap_holds_across_servers_and_a_resume_counts_once(redis_url: str) -> None:
    async with caps(redis_url, prefix="a") as one, caps(redis_url, prefix="a") as two:
        assert await one.reserve("acme", "s1", 2) is None
        assert await two.reserve("acme", "s2", 2) is None
        assert await one.reserve("acme", "s3", 2) == 2  # the cap, counted over both
        assert await two.reserve("globex", "g1", 2) is None  # another key: its own count
        # s1 resumed on server two (its first server died): the same session, let in
        assert await two.reserve("acme", "s1", 2) is None
        two.release("acme", "s2")
        await _settled(two)
        assert await one.reserve("acme", "s3", 2) is None  # a place again


async def test_a_new_sessions_member_becomes_its_id(redis_url: str) -> None:
    async with caps(redis_url, prefix="b") as one, caps(redis_url, prefix="b") as two:
        assert await one.reserve("acme", "c_tmp", 1) is None
        one.rename("acme", "c_tmp", "sess_1")
        await _settled(one)
        assert await two.reserve("acme", "sess_1", 1) is None  # its resume: let in
        assert await two.reserve("acme", "c_other", 1) == 1


async def test_a_dead_servers_sessions_lapse_and_a_live_ones_are_renewed(
        redis_url: str) -> None:
    async with caps(redis_url, ttl_s=1.0, prefix="c") as live, \
            caps(redis_url, ttl_s=1.0, prefix="c") as dead:
        assert await live.reserve("acme", "kept", 2) is None
        assert await dead.reserve("acme", "lost", 2) is None
        assert dead._renewer is not None
        dead._renewer.cancel()  # SIGKILL: no renewal, no release
        assert await live.reserve("acme", "third", 2) == 2
        await asyncio.sleep(1.6)  # past the TTL: "lost" lapsed, "kept" was renewed
        assert await live.reserve("acme", "third", 2) is None
        assert await live.reserve("acme", "fourth", 2) == 2  # "kept" still counts


async def test_redis_out_of_reach_leaves_each_server_to_its_own_count() -> None:
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    shared = SharedSessionCaps(client, "d")
    try:
        assert await shared.reserve("acme", "s1", 1) is None
    finally:
        await shared.aclose()
        await client.aclose()


def _app(url: str) -> FastAPI:
    async def loader(settings: ServeSettings) -> Resources:
        nothing: Any = object()
        store = await RedisStore.connect(StoreSettings(redis_url=url, key_prefix="apps"))
        return Resources(backends=Backends(asr=nothing, llm=nothing, tts=nothing),
                         vad=cast(SileroVadModel, nothing), store=store)

    return create_app(ServeSettings(api_key=KEY, api_keys=[
        {"name": "acme", "key": ACME, "max_sessions": 1}]),
        session_factory=FakeSession, loader=loader)


async def test_two_servers_let_a_capped_key_hold_its_cap_once(redis_url: str) -> None:
    async with serving(_app(redis_url)) as (port_a, _), serving(_app(redis_url)) as (port_b, _):
        async with ws(port_a, ACME) as first:
            assert (await recv(first))["type"] == "session.created"
            async with ws(port_b, ACME) as second:  # the other server: the key is full
                err = await recv(second)
                assert err["error"]["code"] == "key_session_limit_reached"
                assert "across the servers" in err["error"]["message"]
                assert await close_code(second) == 1013
        for _ in range(50):  # the first session's entry goes in the background
            async with ws(port_b, ACME) as third:
                event = await recv(third)
                if event["type"] == "session.created":
                    break
            await asyncio.sleep(0.1)
        assert event["type"] == "session.created"
