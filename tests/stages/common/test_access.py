"""The stage key (StageKeyGuard) on a real uvicorn server, and the client-side settings.

A stage app here is ``add_common_routes`` alone plus one HTTP route and one WebSocket
route standing in for a stage's work routes; the real stage processes are tested with
the key and TLS in tests/orchestrator/test_tls.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI, WebSocket
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from stages.asr.settings import AsrSettings
from stages.common.access import StageAccess, StageKeyGuard, bearer
from stages.common.load import StageLoad
from stages.common.service import add_common_routes
from stages.llm.settings import LlmSettings
from tests.support.serving import serving

ON_SERVER_LOOP = pytest.mark.asyncio(loop_scope="session")  # the server fixture's loop
KEY = "stage-secret-1"


def app_with_key(api_key: str) -> FastAPI:
    app = FastAPI()
    add_common_routes(app, "tts", lambda: True,
                      lambda: StageLoad(stage="tts", ready=True, active=0, queued=0,
                                        capacity=2, busy=0.0), api_key=api_key)

    @app.post("/v1/work")
    async def work() -> dict[str, str]:
        return {"done": "yes"}

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text("hello")
        await ws.close()

    return app


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def keyed() -> AsyncIterator[str]:
    async with serving(app_with_key(KEY)) as (port, _):
        yield f"127.0.0.1:{port}"


def bearer_header(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@ON_SERVER_LOOP
@pytest.mark.parametrize("headers", [{}, bearer_header("wrong"), bearer_header(KEY + "x"),
                                     {"Authorization": KEY}, {"Authorization": "Bearer"}])
async def test_http_without_the_right_key_is_401_with_a_json_reason(
        keyed: str, headers: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=f"http://{keyed}") as http:
        for method, path in (("POST", "/v1/work"), ("GET", "/load"), ("GET", "/docs")):
            resp = await http.request(method, path, headers=headers)
            assert resp.status_code == 401, (path, resp.text)
            assert resp.json()["error"]["code"] == "invalid_api_key"
            assert resp.headers["www-authenticate"] == "Bearer"
            assert KEY not in resp.text


@ON_SERVER_LOOP
async def test_the_right_key_passes_and_probes_stay_open(keyed: str) -> None:
    async with httpx.AsyncClient(base_url=f"http://{keyed}") as http:
        assert (await http.post("/v1/work", headers=bearer_header(KEY))).json() == {
            "done": "yes"}
        load = await http.get("/load", headers={"authorization": f"bearer {KEY}"})
        assert StageLoad.model_validate_json(load.content).capacity == 2
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await http.get(path)).status_code == 200, path
        metrics = (await http.get("/metrics")).text
        assert 'cascade_stage_rejected_total{reason="unauthorized",stage="tts"}' in metrics


@ON_SERVER_LOOP
async def test_websocket_handshake_without_the_key_is_refused_with_401(keyed: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"ws://{keyed}/v1/stream", additional_headers=bearer_header("no")):
            pass
    assert refused.value.response.status_code == 401
    body = json.loads(bytes(refused.value.response.body or b""))
    assert body["error"]["code"] == "invalid_api_key"
    async with connect(f"ws://{keyed}/v1/stream", additional_headers=bearer_header(KEY)) as ws:
        assert await ws.recv() == "hello"


@ON_SERVER_LOOP
async def test_no_key_means_open() -> None:
    async with serving(app_with_key("")) as (port, _), httpx.AsyncClient() as http:
        assert (await http.post(f"http://127.0.0.1:{port}/v1/work")).status_code == 200


def test_bearer_reads_only_the_bearer_scheme() -> None:
    assert bearer([(b"authorization", b"Bearer abc ")]) == b"abc"
    assert bearer([(b"Authorization", b"bearer abc")]) == b"abc"
    assert bearer([(b"authorization", b"Basic abc")]) == b""
    assert bearer([]) == b""
    guard = StageKeyGuard(app_with_key(""), "k", "asr")
    scope = {"type": "http", "path": "/v1/stream", "headers": [(b"authorization", b"Bearer k")]}
    assert guard.allows(scope)
    assert not guard.allows({**scope, "headers": []})
    assert guard.allows({**scope, "headers": [], "path": "/healthz"})


def test_stage_settings_share_one_key_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_STAGE_API_KEY", "from-env")
    monkeypatch.setenv("CASCADE_ASR_API_KEY", "not-this")
    assert AsrSettings().stage_api_key == "from-env"
    assert LlmSettings().stage_api_key == "from-env"
    assert LlmSettings().api_key == ""  # the LLM's upstream key is another variable
    assert AsrSettings(stage_api_key="flag").stage_api_key == "flag"  # --set stage_api_key=
    with pytest.raises(ValueError, match="ssl_certfile and ssl_keyfile"):
        AsrSettings(ssl_certfile="cert.pem")


def test_stage_access_hides_the_key_and_reads_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_STAGE_API_KEY", "sekrit")
    access = StageAccess.from_env()
    assert access.headers() == {"Authorization": "Bearer sekrit"}
    assert "sekrit" not in repr(access)
    assert access.verify() is True  # no CA file: the library's default trust
    assert access.ws_ssl("wss://x") is None and access.ws_ssl("ws://x") is None
    assert StageAccess().headers() == {}
