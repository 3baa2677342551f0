"""orchestrator.limits: API keys (tenants) and their limits; the transports enforcing them
(a real uvicorn, fake sessions), session ownership on resume, and the idle timeout."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, cast

import httpx
import pytest
from aiortc import RTCPeerConnection
from fastapi import FastAPI
from prometheus_client import REGISTRY
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from orchestrator.auth import Grant, authorize
from orchestrator.backends import Backends
from orchestrator.keys import ClientSecrets
from orchestrator.limits import (
    DEFAULT_TENANT,
    TENANT_FIELD,
    KeyRing,
    TenantLimiter,
    TenantLimits,
    TokenBucket,
    check_resume_owner,
)
from orchestrator.protocol import Session, SessionCreatedEvent
from orchestrator.realtime import RealtimeSession
from orchestrator.server import Resources, create_app
from orchestrator.settings import ServeSettings
from orchestrator.store import InvalidResumeToken, MemoryStore, SessionStore
from stages.vad.model import SileroVadModel
from tests.orchestrator.fakes import FakeAsr, FakeLlm, FakeTts, FakeVad
from tests.support.serving import serving

KEY = "sk-default-0123456789"
ACME = "sk-acme-tenant-0123456789"
GLOBEX = "sk-globex-tenant-0123456789"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- KeyRing, TokenBucket, TenantLimiter ---------------------------------------------------


def test_key_ring_names_the_matching_key_and_compares_every_pair(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ring = KeyRing([("default", KEY), ("acme", ACME), ("globex", GLOBEX)])
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return bool(real(a, b))

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert ring.match([ACME, "other"]) == "acme"
    assert len(calls) == 6  # 2 presented x 3 configured: no early exit on the match
    calls.clear()
    assert ring.match(["nope"]) is None and len(calls) == 3
    assert ring.match([KEY[:-1], KEY + "x"]) is None
    assert ring.match([GLOBEX]) == "globex"
    assert KEY not in repr(ring) and "acme" in repr(ring)


def test_key_ring_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="same name"):
        KeyRing([("a", KEY), ("a", ACME)])
    with pytest.raises(ValueError, match="same value"):
        KeyRing([("a", KEY), ("b", KEY)])


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(3, 60.0, clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(20.0)  # one token every 20 s
    clock.now += 10
    assert bucket.take() == pytest.approx(10.0)
    clock.now += 10
    assert bucket.take() == 0.0
    clock.now += 1000  # refills to the burst, not beyond
    assert [bucket.take() for _ in range(4)][-1] > 0


def test_limiter_rate_and_cap_per_tenant() -> None:
    clock = Clock()
    ring = KeyRing([("default", KEY), ("acme", ACME)],
                   {"acme": TenantLimits(max_sessions=2, connection_rate=3,
                                         connection_window_s=30)},
                   TenantLimits(connection_rate=0))
    limiter = TenantLimiter(ring, clock)
    assert limiter.admit("acme") is None and limiter.admit("acme") is None
    full = limiter.admit("acme")
    assert full is not None and full.code == "key_session_limit_reached"
    assert full.reason == "key_capacity" and full.http_status == 429
    limited = limiter.admit("acme")  # the 4th attempt in the window: the rate
    assert limited is not None and limited.code == "connection_rate_limited"
    assert limited.retry_after_s == 10 and "3 per 30 s" in limited.message
    limiter.release("acme")
    clock.now += 10
    assert limiter.admit("acme") is None  # a slot and a token again
    assert all(limiter.admit("default") is None for _ in range(50))  # its own limits
    assert limiter.active == {"acme": 2, "default": 50}


def test_settings_parse_api_keys_and_refuse_conflicts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_API_KEY", KEY)
    monkeypatch.setenv("CASCADE_API_KEYS", json.dumps(
        [{"name": "acme", "key": ACME, "max_sessions": 2},
         {"name": "globex", "key": GLOBEX, "connection_rate": 5}]))
    monkeypatch.setenv("CASCADE_KEY_MAX_SESSIONS", "7")
    settings = ServeSettings()
    ring = settings.key_ring()
    assert ring.names == ["default", "acme", "globex"]
    assert ring.limits("acme") == TenantLimits(2, 300, 60.0)
    assert ring.limits("globex") == TenantLimits(7, 5, 60.0)
    assert ring.limits("default") == TenantLimits(7, 300, 60.0)
    assert ACME not in repr(settings.api_keys)
    with pytest.raises(ValueError, match="api_key's") as refused:
        ServeSettings(api_keys=[{"name": "default", "key": ACME}])
    assert "tenant-0123" not in str(refused.value) and "sk-" not in str(refused.value)
    with pytest.raises(ValueError, match="same value"):
        ServeSettings(api_keys=[{"name": "x", "key": KEY}])
    with pytest.raises(ValueError):
        ServeSettings(api_keys=[{"name": "short", "key": "sk-1"}])
    monkeypatch.delenv("CASCADE_API_KEY")
    assert ServeSettings().auth_required  # named keys alone turn auth on


async def test_ephemeral_keys_carry_their_minting_tenant() -> None:
    secrets = ClientSecrets(MemoryStore())
    ring = KeyRing([("default", KEY), ("acme", ACME)])
    minted = await secrets.mint(tenant="acme")
    grant = await authorize([minted.value], api_key=ring, secrets=secrets)
    assert grant is not None and grant.kind == "ephemeral" and grant.tenant == "acme"
    assert await authorize([ACME], api_key=ring, secrets=secrets) == Grant("api_key",
                                                                          tenant="acme")
    # acme's key removed from the configuration: its ek_ keys stop working too
    assert await authorize([minted.value], api_key=KeyRing([("default", KEY)]),
                           secrets=secrets) is None


# --- resume ownership ------------------------------------------------------------------------


async def test_resume_by_another_tenant_is_a_wrong_token_and_keeps_the_lease() -> None:
    store = MemoryStore()
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    def session(tenant: str | None) -> RealtimeSession:
        s = RealtimeSession(
            backends=Backends(asr=FakeAsr(["a"]), llm=FakeLlm(["b"]), tts=FakeTts()),
            vad=None, store=store, settings=ServeSettings(llm_prime_instructions=False),
            send=send, make_vad=FakeVad)
        s.tenant = tenant
        return s

    owner = session("acme")
    await owner.start()
    token = json.loads(sent[0])["session"]["cascade"]["resume_token"]
    assert (await store.get_config(owner.session_id))[TENANT_FIELD] == "acme"
    lease = await store.lease_owner(owner.session_id)
    thief = session("globex")
    with pytest.raises(InvalidResumeToken) as stolen:
        await thief.start(resume_id=owner.session_id, resume_token=token)
    with pytest.raises(InvalidResumeToken) as wrong:
        await session("acme").start(resume_id=owner.session_id, resume_token="x" * 43)
    assert str(stolen.value) == str(wrong.value)  # nothing tells the two apart
    assert await store.lease_owner(owner.session_id) == lease  # the owner keeps it
    again = session("acme")
    await again.start(resume_id=owner.session_id, resume_token=token)
    assert again.tenant == "acme" and again.session.id == owner.session_id
    await again.aclose()
    await owner.aclose()


async def test_sessions_without_a_recorded_tenant_belong_to_the_default_key() -> None:
    store = MemoryStore()
    created = await store.create_session({"type": "realtime"})
    await check_resume_owner(store, created.session_id, DEFAULT_TENANT)
    with pytest.raises(InvalidResumeToken):
        await check_resume_owner(store, created.session_id, "acme")


# --- the transports (real uvicorn, fake sessions) --------------------------------------------


class FakeSession:
    instances: ClassVar[list[FakeSession]] = []

    def __init__(self, *, backends: Backends, vad: SileroVadModel, store: SessionStore,
                 settings: ServeSettings, send: Callable[[str], Awaitable[None]],
                 beta: bool = False, close: Callable[[int, str], None] | None = None) -> None:
        self.send = send
        self.tenant: str | None = None
        self.idle = True
        self.closed = asyncio.Event()
        FakeSession.instances.append(self)

    async def start(self, *, resume_id: str | None = None,
                    resume_token: str | None = None, configs: Any = ()) -> None:
        await self.send(SessionCreatedEvent(session=Session()).to_json())

    async def handle(self, raw: str | bytes) -> None:
        await self.send(json.dumps({"type": "cascade.echo"}))

    async def aclose(self) -> None:
        self.closed.set()


async def fake_loader(settings: ServeSettings) -> Resources:
    nothing: Any = object()
    return Resources(backends=Backends(asr=nothing, llm=nothing, tts=nothing),
                     vad=cast(SileroVadModel, nothing), store=MemoryStore())


@pytest.fixture(autouse=True)
def _reset() -> None:
    FakeSession.instances.clear()


def app_with(**overrides: Any) -> FastAPI:
    return create_app(ServeSettings(**overrides), session_factory=FakeSession,
                      loader=fake_loader)


def ws(port: int, key: str) -> connect:
    return connect(f"ws://127.0.0.1:{port}/v1/realtime",
                   additional_headers={"Authorization": f"Bearer {key}"},
                   proxy=None, open_timeout=10)


async def recv(c: ClientConnection) -> dict[str, Any]:
    data = json.loads(await asyncio.wait_for(c.recv(), 10))
    assert isinstance(data, dict)
    return data


async def close_code(c: ClientConnection) -> int | None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await asyncio.wait_for(c.recv(), 10)
    rcvd = c.protocol.close_rcvd
    return None if rcvd is None else rcvd.code


def rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("cascade_rejected_connections_total",
                                     {"reason": reason}) or 0.0


async def sdp_offer() -> str:
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


TENANTS = [{"name": "acme", "key": ACME, "max_sessions": 1},
           {"name": "globex", "key": GLOBEX, "connection_rate": 2}]


async def test_a_key_at_its_session_cap_is_refused_others_go_on() -> None:
    before = rejected("key_capacity")
    async with serving(app_with(api_key=KEY, api_keys=TENANTS)) as (port, _):
        async with ws(port, ACME) as first, ws(port, GLOBEX) as other:
            assert (await recv(first))["type"] == "session.created"
            assert (await recv(other))["type"] == "session.created"
            async with ws(port, ACME) as second:
                err = await recv(second)
                assert err["error"]["code"] == "key_session_limit_reached"
                assert await close_code(second) == 1013
            await first.send("{}")  # the live ones are untouched
            assert (await recv(first))["type"] == "cascade.echo"
            await other.send("{}")
            assert (await recv(other))["type"] == "cascade.echo"
        assert {s.tenant for s in FakeSession.instances} == {"acme", "globex"}
    assert rejected("key_capacity") == before + 1


async def test_connection_rate_per_key_on_websocket_and_http() -> None:
    before = rejected("rate")
    async with serving(app_with(api_key=KEY, api_keys=TENANTS)) as (port, _):
        for _ in range(2):
            async with ws(port, GLOBEX) as c:
                assert (await recv(c))["type"] == "session.created"
        async with ws(port, GLOBEX) as c:
            err = await recv(c)
            assert err["error"]["code"] == "connection_rate_limited"
            assert "Try again in 30 s" in err["error"]["message"]
            assert await close_code(c) == 1013
        async with httpx.AsyncClient() as http:  # a WebRTC call: 429 with Retry-After
            r = await http.post(f"http://127.0.0.1:{port}/v1/realtime/calls",
                                headers={"Authorization": f"Bearer {GLOBEX}",
                                         "Content-Type": "application/sdp"},
                                content=await sdp_offer())
            assert r.status_code == 429
            assert r.json()["error"]["code"] == "connection_rate_limited"
            assert 1 <= int(r.headers["retry-after"]) <= 30
        async with ws(port, KEY) as c:  # another key has its own bucket
            assert (await recv(c))["type"] == "session.created"
    assert rejected("rate") == before + 2


async def test_ephemeral_sessions_count_against_the_minting_key() -> None:
    async with serving(app_with(api_key=KEY, api_keys=TENANTS)) as (port, _):
        async with httpx.AsyncClient() as http:
            r = await http.post(f"http://127.0.0.1:{port}/v1/realtime/client_secrets",
                                headers={"Authorization": f"Bearer {ACME}"}, json={})
            assert r.status_code == 200
            ek = r.json()["value"]
        async with ws(port, ek) as first:
            assert (await recv(first))["type"] == "session.created"
            async with ws(port, ACME) as second:  # acme's one slot is the ek_ session's
                assert (await recv(second))["error"]["code"] == "key_session_limit_reached"
        assert FakeSession.instances[0].tenant == "acme"


async def test_wrong_keys_are_refused_and_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-but-long-enough-123"
    async with serving(app_with(api_keys=TENANTS)) as (port, _):
        with pytest.raises(InvalidStatus) as refused:
            async with ws(port, wrong):
                pass
        assert refused.value.response.status_code == 403
        async with httpx.AsyncClient() as http:
            base = f"http://127.0.0.1:{port}"
            for path in ("/v1/realtime/client_secrets", "/v1/realtime/calls",
                         "/v1/realtime/calls/rtc_x/hangup"):
                r = await http.post(base + path, headers={"Authorization": f"Bearer {wrong}"})
                assert r.status_code == 401, path
                assert wrong not in r.text
    # the server's records (the test's own clients log the headers they send)
    server = "\n".join(r.getMessage() + repr(r.args) for r in caplog.records
                       if not r.name.startswith(("httpx", "httpcore", "websockets.client")))
    assert "refused" in server
    for value in (wrong, ACME, GLOBEX):
        assert value not in server


async def test_idle_session_gets_an_error_then_a_clean_close() -> None:
    before = rejected("idle")
    async with serving(app_with(api_key=KEY, max_idle_s=0.4)) as (port, _):
        async with ws(port, KEY) as idle, ws(port, KEY) as busy:
            await recv(idle)
            await recv(busy)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for _ in range(6):  # the busy one keeps talking past the idle limit
                await busy.send("{}")
                assert (await recv(busy))["type"] == "cascade.echo"
                await asyncio.sleep(0.15)
            err = await recv(idle)
            assert err["error"]["code"] == "session_idle_timeout"
            assert await close_code(idle) == 1000
            assert loop.time() - start < 5.0  # 0.4 s, with room for a busy machine
            await busy.send("{}")
            assert (await recv(busy))["type"] == "cascade.echo"
    assert rejected("idle") == before + 1


async def test_a_session_busy_replying_is_not_idle() -> None:
    async with serving(app_with(max_idle_s=0.3)) as (port, _):
        async with connect(f"ws://127.0.0.1:{port}/v1/realtime", proxy=None) as c:
            await recv(c)
            FakeSession.instances[0].idle = False  # e.g. a long reply still playing
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(c.recv(), 1.0)
            FakeSession.instances[0].idle = True
            assert (await recv(c))["error"]["code"] == "session_idle_timeout"


async def test_cors_is_off_by_default() -> None:
    async with serving(app_with()) as (port, _), httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{port}/v1/realtime/client_secrets"
        pre = await http.options(url, headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization"})
        assert "access-control-allow-origin" not in pre.headers
        r = await http.post(url, headers={"Origin": "https://evil.example"}, json={})
        assert "access-control-allow-origin" not in r.headers


def test_secret_query_parameters_are_redacted_from_access_logs() -> None:
    from orchestrator.limits import RedactSecrets, redact

    line = "/v1/realtime?session_id=sess_1&resume_token=abc-_DEF&model=m"
    assert redact(line) == "/v1/realtime?session_id=sess_1&resume_token=<redacted>&model=m"
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "WebSocket %s" [accepted]', ("127.0.0.1:5", line), None)
    assert RedactSecrets().filter(record)
    assert "abc-_DEF" not in record.getMessage() and "sess_1" in record.getMessage()


class FakeCall:
    def __init__(self) -> None:
        self.closed: list[str] = []

    async def close(self, reason: str) -> None:
        self.closed.append(reason)


async def test_a_calls_sideband_and_hangup_answer_only_its_key() -> None:
    app = app_with(api_keys=TENANTS)
    state = app.state.server
    call = FakeCall()
    async with serving(app) as (port, _):
        state.calls["rtc_acme"] = call
        state.call_tenants["rtc_acme"] = "acme"
        async with connect(f"ws://127.0.0.1:{port}/v1/realtime?call_id=rtc_acme",
                           additional_headers={"Authorization": f"Bearer {GLOBEX}"},
                           proxy=None) as c:
            err = await recv(c)
            assert err["error"]["code"] == "call_not_found"
            assert await close_code(c) == 1008
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            url = "/v1/realtime/calls/rtc_acme/hangup"
            other = await http.post(url, headers={"Authorization": f"Bearer {GLOBEX}"})
            assert other.status_code == 404 and call.closed == []
            own = await http.post(url, headers={"Authorization": f"Bearer {ACME}"})
            assert own.status_code == 200 and call.closed == ["hangup"]
        state.calls.clear()
        state.call_tenants.clear()


async def test_minting_is_rate_limited_per_key_in_its_own_bucket() -> None:
    async with serving(app_with(api_key=KEY, api_keys=TENANTS)) as (port, _):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            mint = "/v1/realtime/client_secrets"
            auth = {"Authorization": f"Bearer {GLOBEX}"}
            assert [(await http.post(mint, headers=auth, json={})).status_code
                    for _ in range(2)] == [200, 200]
            refused = await http.post(mint, headers=auth, json={})
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "mint_rate_limited"
            assert int(refused.headers["retry-after"]) >= 1
            other = await http.post(mint, headers={"Authorization": f"Bearer {KEY}"}, json={})
            assert other.status_code == 200
        async with ws(port, GLOBEX) as c:  # connections have their own bucket
            assert (await recv(c))["type"] == "session.created"
