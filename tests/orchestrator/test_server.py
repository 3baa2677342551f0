"""The Realtime server on a real uvicorn on a loopback port, with a fake session and fake
resources injected (no models are loaded): auth, capacity, dialect detection, resume
errors, slow readers, size limits, expiry, readiness, metrics, shutdown, and the stock
``openai`` SDK's realtime clients connecting."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, cast

import httpx
import pytest
from fastapi import FastAPI
from openai import AsyncOpenAI
from prometheus_client import REGISTRY
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from orchestrator.backends import Backends
from orchestrator.protocol import Session, SessionCreatedEvent
from orchestrator.server import Resources, create_app
from orchestrator.settings import ServeSettings
from orchestrator.store import InvalidResumeToken, MemoryStore, SessionStore, StoreUnavailable
from stages.vad.model import SileroVadModel
from tests.support.serving import serving

KEY = "sk-test-0123456789"
BIG = "x" * 65536


class FakeSession:
    """Records what the server gives it; ``start`` sends session.created."""

    instances: ClassVar[list[FakeSession]] = []
    store_down: ClassVar[bool] = False  # start() as with Redis out of reach

    def __init__(self, *, backends: Backends, vad: SileroVadModel, store: SessionStore,
                 settings: ServeSettings, send: Callable[[str], Awaitable[None]],
                 beta: bool = False, close: Callable[[int, str], None] | None = None) -> None:
        self.send = send
        self.close = close
        self.beta = beta
        self.frames: list[str | bytes] = []
        self.resume: tuple[str | None, str | None] | None = None
        self.closed = asyncio.Event()
        FakeSession.instances.append(self)

    async def start(self, *, resume_id: str | None = None,
                    resume_token: str | None = None, configs: Any = ()) -> None:
        self.resume = (resume_id, resume_token)
        self.configs = list(configs)
        if FakeSession.store_down:
            raise StoreUnavailable("redis is down")
        if resume_id is not None:
            raise InvalidResumeToken("the resume token does not match the session")
        await self.send(SessionCreatedEvent(session=Session()).to_json())

    async def handle(self, raw: str | bytes) -> None:
        self.frames.append(raw)
        if raw == "flood":  # far more than the send queue and the socket buffers hold
            for _ in range(2000):
                await self.send(BIG)
                await asyncio.sleep(0)
            return
        if raw == "crash":
            raise RuntimeError("boom")
        await self.send(json.dumps({"type": "cascade.echo", "binary": isinstance(raw, bytes),
                                    "size": len(raw)}))

    async def aclose(self) -> None:
        self.closed.set()


async def fake_loader(settings: ServeSettings) -> Resources:
    nothing: Any = object()  # never called: the fake session does not use the stages
    return Resources(backends=Backends(asr=nothing, llm=nothing, tts=nothing),
                     vad=cast(SileroVadModel, nothing), store=MemoryStore())


@pytest.fixture(autouse=True)
def _reset() -> None:
    FakeSession.instances.clear()
    FakeSession.store_down = False


def app_with(**overrides: Any) -> FastAPI:
    return create_app(ServeSettings(**overrides), session_factory=FakeSession,
                      loader=fake_loader)


def ws_connect(port: int, query: str = "", **kwargs: Any) -> connect:
    return connect(f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime{query}",
                   proxy=None, open_timeout=10, **kwargs)


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    data = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert isinstance(data, dict)
    return data


async def closed_code(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Read until the server closes; the close code and reason it sent."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    rcvd = ws.protocol.close_rcvd
    assert rcvd is not None, "connection ended without a close frame"
    return rcvd.code, rcvd.reason


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


# --- auth ----------------------------------------------------------------------------------


async def test_no_key_and_wrong_key_are_refused_with_403() -> None:
    before = metric("cascade_rejected_connections_total", {"reason": "auth"})
    async with serving(app_with(api_key=KEY)) as (port, _):
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEY}):
            with pytest.raises(InvalidStatus) as info:
                async with ws_connect(port, additional_headers=headers):
                    pass
            assert info.value.response.status_code == 403
            body = json.loads(info.value.response.body or b"{}")
            assert body["error"]["code"] == "invalid_api_key"
        with pytest.raises(InvalidStatus):  # a wrong key in the subprotocol form
            async with ws_connect(port, subprotocols=["realtime",
                                                      "openai-insecure-api-key.nope"]):
                pass
    assert FakeSession.instances == []
    assert metric("cascade_rejected_connections_total", {"reason": "auth"}) == before + 4


async def test_bearer_and_subprotocol_keys_are_accepted() -> None:
    async with serving(app_with(api_key=KEY)) as (port, _):
        async with ws_connect(port, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            assert (await recv_json(ws))["type"] == "session.created"
            assert ws.subprotocol is None
        protos = ["realtime", f"openai-insecure-api-key.{KEY}"]
        async with ws_connect(port, subprotocols=protos) as ws:
            assert (await recv_json(ws))["type"] == "session.created"
            assert ws.subprotocol == "realtime"
    assert len(FakeSession.instances) == 2


async def test_no_api_key_configured_means_open() -> None:
    async with serving(app_with()) as (port, _), ws_connect(port) as ws:
        assert (await recv_json(ws))["type"] == "session.created"


# --- dialect, frames ------------------------------------------------------------------------


async def test_beta_header_and_subprotocol_reach_the_session() -> None:
    async with serving(app_with()) as (port, _):
        async with ws_connect(port, additional_headers={"OpenAI-Beta": "realtime=v1"}) as ws:
            await recv_json(ws)
        async with ws_connect(port, subprotocols=["realtime", "openai-beta.realtime-v1"]) as ws:
            await recv_json(ws)
        async with ws_connect(port) as ws:
            await recv_json(ws)
    assert [s.beta for s in FakeSession.instances] == [True, True, False]


async def test_text_and_binary_frames_reach_handle_in_order() -> None:
    async with serving(app_with()) as (port, _), ws_connect(port) as ws:
        await recv_json(ws)
        await ws.send('{"type": "input_audio_buffer.clear"}')
        await ws.send(b"\x01\x00" * 480)
        assert (await recv_json(ws))["binary"] is False
        assert (await recv_json(ws)) == {"type": "cascade.echo", "binary": True, "size": 960}
    assert FakeSession.instances[0].frames == ['{"type": "input_audio_buffer.clear"}',
                                              b"\x01\x00" * 480]


async def test_oversized_frame_gets_an_error_and_the_session_goes_on() -> None:
    async with serving(app_with(max_event_bytes=2048)) as (port, _), ws_connect(port) as ws:
        await recv_json(ws)
        await ws.send("y" * 3000)
        err = await recv_json(ws)
        assert err["type"] == "error" and err["error"]["code"] == "invalid_value"
        assert "too large" in err["error"]["message"]
        await ws.send("ok")
        assert (await recv_json(ws))["type"] == "cascade.echo"
    assert FakeSession.instances[0].frames == ["ok"]


# --- refusals -------------------------------------------------------------------------------


async def test_beyond_max_sessions_is_refused_with_1013() -> None:
    async with serving(app_with(max_sessions=1)) as (port, _):
        async with ws_connect(port) as first:
            await recv_json(first)
            async with ws_connect(port) as second:
                err = await recv_json(second)
                assert err["type"] == "error"
                assert err["error"]["code"] == "session_limit_reached"
                assert (await closed_code(second))[0] == 1013
        # The slot is released when the first connection ends.
        for _ in range(100):
            if FakeSession.instances[0].closed.is_set():
                break
            await asyncio.sleep(0.02)
        async with ws_connect(port) as third:
            assert (await recv_json(third))["type"] == "session.created"
    assert len(FakeSession.instances) == 2


async def test_failed_resume_sends_the_store_code_then_closes_1008() -> None:
    async with serving(app_with()) as (port, _):
        async with ws_connect(port, "&session_id=sess_1&resume_token=bad") as ws:
            err = await recv_json(ws)
            assert err["type"] == "error"
            assert err["error"]["code"] == "invalid_resume_token"
            assert (await closed_code(ws))[0] == 1008
        assert FakeSession.instances[0].resume == ("sess_1", "bad")
        async with ws_connect(port, "&session_id=sess_1") as ws:  # token missing
            assert (await recv_json(ws))["error"]["code"] == "invalid_resume"
            assert (await closed_code(ws))[0] == 1008
    assert len(FakeSession.instances) == 1


async def test_store_out_of_reach_is_try_again_later_for_new_and_resumed_sessions() -> None:
    FakeSession.store_down = True
    before = metric("cascade_rejected_connections_total", {"reason": "store"})
    async with serving(app_with()) as (port, _):
        for query, what in (("", "start a session"),
                            ("&session_id=sess_1&resume_token=t", "resume the session")):
            async with ws_connect(port, query) as ws:
                err = (await recv_json(ws))["error"]
                assert err["code"] == "store_unavailable"
                assert err["message"].startswith(f"Cannot {what}:")
                assert (await closed_code(ws))[0] == 1013
    assert metric("cascade_rejected_connections_total", {"reason": "store"}) == before + 2


async def test_slow_reader_is_closed_1008_not_buffered() -> None:
    before = metric("cascade_rejected_connections_total", {"reason": "slow_client"})
    async with serving(app_with(send_queue_events=8)) as (port, _):
        async with ws_connect(port, max_queue=2, max_size=None,
                              compression=None) as ws:
            await recv_json(ws)
            await ws.send("flood")
            session = FakeSession.instances[0]
            await asyncio.wait_for(session.closed.wait(), 20)  # without our reading
            code, reason = await closed_code(ws)
            assert code == 1008
            assert reason is not None and "not reading" in reason
    assert metric("cascade_rejected_connections_total", {"reason": "slow_client"}) == before + 1


async def test_session_expires_after_max_session_s() -> None:
    async with serving(app_with(max_session_s=0.3)) as (port, _), ws_connect(port) as ws:
        await recv_json(ws)
        err = await recv_json(ws)
        assert err["error"]["code"] == "session_expired"
        assert (await closed_code(ws))[0] == 1000
    assert FakeSession.instances[0].closed.is_set()


async def test_session_failure_closes_1011_and_closes_the_session() -> None:
    async with serving(app_with()) as (port, _), ws_connect(port) as ws:
        await recv_json(ws)
        await ws.send("crash")
        assert (await recv_json(ws))["error"]["code"] == "server_error"
        assert (await closed_code(ws))[0] == 1011
    assert FakeSession.instances[0].closed.is_set()


# --- readiness, metrics, shutdown -------------------------------------------------------------


async def test_readyz_waits_for_loading_and_refuses_sessions_until_then() -> None:
    loaded = asyncio.Event()

    async def slow_loader(settings: ServeSettings) -> Resources:
        await loaded.wait()
        return await fake_loader(settings)

    app = create_app(ServeSettings(), session_factory=FakeSession, loader=slow_loader)
    async with serving(app, wait_ready=False) as (port, _), httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{port}"
        assert (await http.get(f"{base}/healthz")).status_code == 200
        ready = await http.get(f"{base}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "loading"
        async with ws_connect(port) as ws:
            assert (await recv_json(ws))["error"]["code"] == "server_not_ready"
            assert (await closed_code(ws))[0] == 1013
        loaded.set()
        for _ in range(100):
            if (await http.get(f"{base}/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.02)
        assert (await http.get(f"{base}/readyz")).status_code == 200
        async with ws_connect(port) as ws:
            assert (await recv_json(ws))["type"] == "session.created"


async def test_a_failed_load_shows_in_health_and_readiness() -> None:
    async def broken_loader(settings: ServeSettings) -> Resources:
        raise FileNotFoundError("silero VAD model missing")

    app = create_app(ServeSettings(), session_factory=FakeSession, loader=broken_loader)
    async with serving(app, wait_ready=False) as (port, _), httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            health = await http.get(f"{base}/healthz")
            if health.status_code != 200:
                break
            await asyncio.sleep(0.02)
        assert health.status_code == 500 and "silero" in health.json()["error"]
        ready = await http.get(f"{base}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"


async def test_metrics_endpoint_and_active_sessions_gauge() -> None:
    async with serving(app_with()) as (port, _), httpx.AsyncClient() as http:
        base_active = metric("cascade_active_sessions")
        async with ws_connect(port) as ws:
            await recv_json(ws)
            assert metric("cascade_active_sessions") == base_active + 1
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        for name in ("cascade_active_sessions", "cascade_turn_endpoint_delay_seconds",
                     "cascade_turn_first_transcript_delta_seconds",
                     "cascade_turn_final_transcript_seconds",
                     "cascade_turn_llm_first_token_seconds", "cascade_turn_first_audio_seconds",
                     "cascade_speculative_hits_total", "cascade_speculative_misses_total",
                     "cascade_barge_ins_total"):
            assert f"# TYPE {name} " in text, name
        for _ in range(100):
            if metric("cascade_active_sessions") == base_active:
                break
            await asyncio.sleep(0.02)
        assert metric("cascade_active_sessions") == base_active


async def test_shutdown_closes_open_sockets_with_1012() -> None:
    async with serving(app_with()) as (port, server), ws_connect(port) as ws:
        await recv_json(ws)
        server.should_exit = True
        assert (await closed_code(ws))[0] == 1012
        await asyncio.wait_for(FakeSession.instances[0].closed.wait(), 10)


class DrainableSession(FakeSession):
    """A fake session with the drain hooks: busy until told "idle"."""

    def __init__(self, **ports: Any) -> None:
        super().__init__(**ports)
        self.idle = False
        self.drained = False

    async def handle(self, raw: str | bytes) -> None:
        if raw == "idle":
            self.idle = True
        await super().handle(raw)

    async def end_for_drain(self) -> None:
        self.drained = True
        await self.send(json.dumps({"type": "error", "error": {"code": "server_draining"}}))
        assert self.close is not None
        self.close(1012, "server draining: resume the session")


async def test_draining_refuses_new_sessions_and_closes_live_ones_as_they_go_idle() -> None:
    app = create_app(ServeSettings(drain_timeout_s=30), session_factory=DrainableSession,
                     loader=fake_loader)
    async with (serving(app) as (port, _), ws_connect(port) as quiet,
                ws_connect(port) as talking, httpx.AsyncClient() as http):
        await recv_json(quiet)
        await recv_json(talking)
        await quiet.send("idle")
        await recv_json(quiet)
        first, second = DrainableSession.instances
        app.state.server.begin_drain()  # what SIGTERM does (stages.common.service.serve)
        ready = await http.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert (await recv_json(quiet))["error"]["code"] == "server_draining"
        assert (await closed_code(quiet))[0] == 1012
        async with ws_connect(port) as late:  # no new session while draining
            err = await recv_json(late)
            assert err["error"]["code"] == "server_draining"
            assert (await closed_code(late))[0] == 1013
        call = await http.post(f"http://127.0.0.1:{port}/v1/realtime/calls",
                               content=b"v=0", headers={"Content-Type": "application/sdp"})
        assert call.status_code == 503 and call.json()["error"]["code"] == "server_draining"
        await asyncio.sleep(0.3)
        assert not second.drained  # mid-turn: left alone ...
        await talking.send("idle")  # ... until it goes idle
        await recv_json(talking)
        assert (await recv_json(talking))["error"]["code"] == "server_draining"
        assert (await closed_code(talking))[0] == 1012
        assert first.drained and second.drained
        assert len(DrainableSession.instances) == 2


async def test_drain_deadline_closes_sessions_still_busy() -> None:
    app = create_app(ServeSettings(drain_timeout_s=0.5), session_factory=DrainableSession,
                     loader=fake_loader)
    async with serving(app) as (port, _), ws_connect(port) as busy:
        await recv_json(busy)
        app.state.server.begin_drain()
        assert (await recv_json(busy))["error"]["code"] == "server_draining"
        assert (await closed_code(busy))[0] == 1012
    assert DrainableSession.instances[0].drained and not DrainableSession.instances[0].idle


# --- settings ---------------------------------------------------------------------------------


def test_stage_url_placements() -> None:
    with pytest.raises(ValueError, match="missing: tts_url"):
        ServeSettings(asr_url="http://asr:8001", llm_url="http://l")
    with pytest.raises(ValueError, match="missing: asr_url"):
        ServeSettings(tts_url="http://tts:8003")
    with pytest.raises(ValueError, match="missing: llm_url"):
        ServeSettings(asr_url="http://a", tts_url="http://t")
    assert ServeSettings().distributed is False
    # A remote LLM (vLLM) with the embedded ASR and TTS.
    mixed = ServeSettings(llm_url="http://vllm:8000/v1")
    assert mixed.distributed is False and mixed.llm_url
    remote = ServeSettings(asr_url="http://a", llm_url="http://l", tts_url="http://t")
    assert remote.distributed is True
    store = ServeSettings(redis_url="redis://r:6379/0", max_items=7).store_settings()
    assert store.redis_url == "redis://r:6379/0" and store.max_items == 7
    assert ServeSettings().store_settings().redis_url is None


# --- the stock openai SDK -----------------------------------------------------------------------


async def test_openai_sdk_realtime_clients_connect() -> None:
    async with serving(app_with(api_key=KEY)) as (port, _):
        client = AsyncOpenAI(api_key=KEY, websocket_base_url=f"ws://127.0.0.1:{port}/v1")
        async with client.realtime.connect(model="gpt-realtime") as conn:
            event = await asyncio.wait_for(conn.recv(), 10)
            assert event.type == "session.created"
        async with client.beta.realtime.connect(model="gpt-4o-realtime-preview") as beta:
            beta_event = await asyncio.wait_for(beta.recv(), 10)
            assert beta_event.type == "session.created"
        wrong = AsyncOpenAI(api_key="sk-wrong", websocket_base_url=f"ws://127.0.0.1:{port}/v1")
        with pytest.raises(Exception, match="403"):
            async with wrong.realtime.connect(model="gpt-realtime") as conn:
                await conn.recv()
    assert [s.beta for s in FakeSession.instances] == [False, True]


# --- cascade serve ----------------------------------------------------------------------------


def test_cli_serve_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.common.service
    from orchestrator import cli

    calls: list[tuple[FastAPI, str, int, dict[str, Any]]] = []
    monkeypatch.setattr(stages.common.service, "serve",
                        lambda app, host, port, **tls: calls.append((app, host, port, tls)))
    monkeypatch.setenv("CASCADE_PORT", "9100")
    monkeypatch.setenv("CASCADE_PIPELINE", "serial")
    monkeypatch.setenv("CASCADE_SSL_CERTFILE", "/env/cert.pem")
    monkeypatch.setenv("CASCADE_SSL_KEYFILE", "/env/key.pem")
    cli.main(["serve", "--port", "9200", "--api-key", KEY, "--ssl-certfile", "/flag/cert.pem",
              "--ssl-keyfile", "/flag/key.pem"])
    (app, host, port, tls), = calls
    settings = app.state.server.settings
    assert (host, port) == ("127.0.0.1", 9200)
    assert tls == {"ssl_certfile": "/flag/cert.pem", "ssl_keyfile": "/flag/key.pem"}
    assert settings.api_key == KEY and settings.pipeline == "serial"


def test_cli_serve_refuses_a_mix_of_stage_urls() -> None:
    from orchestrator import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--asr-url", "http://127.0.0.1:8001"])
    assert "missing: tts_url" in str(info.value.code)
