"""orchestrator.keys: minting and looking up ek_ keys, and POST /v1/realtime/client_secrets
(in process through httpx's ASGI transport, and with the real openai SDK against uvicorn)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from openai import AsyncOpenAI
from openai.types.realtime import ClientSecretCreateResponse, RealtimeSessionCreateResponse

from orchestrator.keys import (
    CLIENT_SECRETS_PATH,
    MAX_BODY_BYTES,
    ClientSecrets,
    secret_id,
    secrets_router,
    session_from_config,
)
from orchestrator.protocol.session import Session, SessionConfig, apply_update
from orchestrator.settings import ServeSettings
from orchestrator.store import MemoryStore

KEY = "sk-test-standard-key"
NOW = 1_700_000_000.75
SESSION = {
    "type": "realtime",
    "instructions": "You are a helpful pirate.",
    "output_modalities": ["audio"],
    "audio": {
        "input": {"format": {"type": "audio/pcm", "rate": 24000},
                  "turn_detection": {"type": "server_vad", "threshold": 0.7},
                  "transcription": {"model": "whisper-1", "language": "en"}},
        "output": {"voice": "joe"},
    },
    "tools": [{"type": "function", "name": "get_weather", "description": "Weather",
               "parameters": {"type": "object", "properties": {}}}],
}


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def without_id(session: Session) -> dict[str, Any]:
    return session.model_dump(mode="json", exclude={"id"})


# -- ClientSecrets --------------------------------------------------------------------


async def test_mint_then_lookup_until_the_exact_second_of_expiry() -> None:
    clock = Clock()
    secrets = ClientSecrets(MemoryStore(clock=clock), clock=clock)
    minted = await secrets.mint(seconds=10, session=SESSION)
    assert minted.value.startswith("ek_") and len(minted.value) >= 40
    assert minted.expires_at == 1_700_000_010  # whole seconds from the creation second
    found = await secrets.lookup(minted.value)
    assert found == minted
    clock.now = minted.expires_at - 0.001
    assert await secrets.lookup(minted.value) == minted
    clock.now = minted.expires_at
    assert await secrets.lookup(minted.value) is None


async def test_expires_at_is_checked_even_while_the_store_still_holds_the_key() -> None:
    clock = Clock()
    store = MemoryStore()  # its own (real) clock: the record lives 600 s
    secrets = ClientSecrets(store, clock=clock)
    minted = await secrets.mint()
    assert minted.expires_at == int(NOW) + 600
    clock.now += 600
    assert await store.get_client_secret(secret_id(minted.value)) is not None
    assert await secrets.lookup(minted.value) is None


async def test_the_store_expiry_ends_a_key_too() -> None:
    clock = Clock()
    secrets = ClientSecrets(MemoryStore(clock=clock), clock=Clock())  # wall clock frozen
    minted = await secrets.mint(seconds=10)
    clock.now += 10
    assert await secrets.lookup(minted.value) is None


async def test_keys_are_unique_and_only_their_digest_is_stored() -> None:
    store = MemoryStore()
    secrets = ClientSecrets(store)
    values = {(await secrets.mint()).value for _ in range(50)}
    assert len(values) == 50
    assert set(store._secrets) == {hashlib.sha256(v.encode()).hexdigest() for v in values}
    assert not any(v in repr(store._secrets) for v in values)


async def test_mint_refuses_bad_seconds_and_sessions() -> None:
    secrets = ClientSecrets(MemoryStore())
    for seconds in (9, 7201, 0, -600, True, 600.0, "600"):
        with pytest.raises(ValueError, match="between 10 and 7200"):
            await secrets.mint(seconds=seconds)  # type: ignore[arg-type]
    for bad in ({"voice_typo": 1}, {"audio": {"output": {"speed": 9}}},
                {"turn_detection": {"type": "nope"}}):
        with pytest.raises(ValueError):
            await secrets.mint(session=bad)
    assert (await secrets.mint(seconds=10)).session is None
    assert (await secrets.mint(seconds=7200)).session is None


async def test_lookup_of_garbage_is_none() -> None:
    secrets = ClientSecrets(MemoryStore())
    minted = await secrets.mint()
    for junk in ("", "ek_", "sk-" + minted.value[3:], minted.value + "x", minted.value[:-1],
                 minted.value.upper(), "ek_" + "\ud800" * 43, "ek_" + "é" * 43,
                 "ek_" + "a" * 1_000_000, "\x00" * 10_000, "ek_ " + minted.value[3:]):
        assert await secrets.lookup(junk) is None
    assert await secrets.lookup(None) is None  # type: ignore[arg-type]
    assert await secrets.lookup(minted.value) is not None


async def test_the_stored_session_is_the_update_and_applies_to_a_new_session() -> None:
    secrets = ClientSecrets(MemoryStore())
    minted = await secrets.mint(session=SESSION)
    found = await secrets.lookup(minted.value)
    assert found is not None and found.session is not None
    # only what the client set, nothing defaulted
    assert "temperature" not in found.session and "tool_choice" not in found.session
    assert found.session["instructions"] == SESSION["instructions"]
    expected = apply_update(Session(), SessionConfig.model_validate(SESSION))
    assert without_id(session_from_config(found.session)) == without_id(expected)
    assert found.session_config() == SessionConfig.model_validate(found.session)
    base = Session(instructions="base", temperature=0.3)
    assert session_from_config(found.session, base).temperature == 0.3
    assert session_from_config(None, base) is base


# -- the endpoint, in process ---------------------------------------------------------


def app_for(secrets: ClientSecrets | None, **settings: Any) -> FastAPI:
    app = FastAPI()
    app.include_router(secrets_router(ServeSettings(**settings), lambda: secrets))
    return app


@contextlib.asynccontextmanager
async def client_for(secrets: ClientSecrets | None,
                     **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app_for(secrets, **settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error_of(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error, dict)
    return error


async def test_mint_answers_value_expiry_and_the_effective_session() -> None:
    clock = Clock()
    secrets = ClientSecrets(MemoryStore(), clock=clock)
    async with client_for(secrets, api_key=KEY, pipeline="serial") as http:
        resp = await http.post(CLIENT_SECRETS_PATH, headers=bearer(KEY), json={
            "expires_after": {"anchor": "created_at", "seconds": 120}, "session": SESSION})
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"
    body = resp.json()
    assert set(body) == {"value", "expires_at", "session"}
    assert body["value"].startswith("ek_") and body["expires_at"] == int(NOW) + 120
    shown = body["session"]
    assert shown["object"] == "realtime.session" and shown["type"] == "realtime"
    assert shown["id"].startswith("sess_")
    assert shown["instructions"] == SESSION["instructions"]
    assert shown["audio"]["input"]["turn_detection"] == {
        "type": "server_vad", "threshold": 0.7, "prefix_padding_ms": 300,
        "silence_duration_ms": 500, "create_response": True, "interrupt_response": True,
        "idle_timeout_ms": None}
    assert shown["audio"]["output"]["voice"] == "joe"
    assert shown["tools"][0]["name"] == "get_weather"
    assert shown["cascade"]["pipeline"] == "serial"  # this server's default pipeline
    assert "temperature" not in shown  # GA wire shape, as session.created shows it
    found = await secrets.lookup(body["value"])
    assert found is not None and found.expires_at == body["expires_at"]
    assert found.session is not None and found.session["instructions"] == SESSION["instructions"]


async def test_defaults_with_an_empty_body_or_empty_object() -> None:
    secrets = ClientSecrets(MemoryStore(), clock=Clock())
    async with client_for(secrets) as http:  # no api_key: anyone may mint
        for content in (b"", b"{}", b"  \n"):
            resp = await http.post(CLIENT_SECRETS_PATH, content=content)
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["expires_at"] == int(NOW) + 600
            assert body["session"]["instructions"] == ""
            found = await secrets.lookup(body["value"])
            assert found is not None and found.session is None
        resp = await http.post(CLIENT_SECRETS_PATH, json={"expires_after": {"seconds": 10}})
        assert resp.json()["expires_at"] == int(NOW) + 10
        resp = await http.post(CLIENT_SECRETS_PATH, json={"expires_after": {"seconds": 7200}})
        assert resp.json()["expires_at"] == int(NOW) + 7200


async def test_only_the_standard_key_may_mint() -> None:
    secrets = ClientSecrets(MemoryStore())
    browser_key = (await secrets.mint()).value
    async with client_for(secrets, api_key=KEY) as http:
        for headers in ({}, bearer("sk-wrong"), {"Authorization": KEY}, bearer(browser_key)):
            resp = await http.post(CLIENT_SECRETS_PATH, headers=headers, json={})
            assert resp.status_code == 401
            error = error_of(resp)
            assert error["code"] == "invalid_api_key"
            assert error["type"] == "invalid_request_error"
            assert browser_key not in resp.text and "sk-wrong" not in resp.text
            if headers == bearer(browser_key):
                assert "ek_" in error["message"]
        assert (await http.post(CLIENT_SECRETS_PATH, headers=bearer(KEY))).status_code == 200
    async with client_for(secrets) as http:  # no auth configured: an ek_ key is no key
        assert (await http.post(CLIENT_SECRETS_PATH,
                                headers=bearer(browser_key))).status_code == 200


@pytest.mark.parametrize(("body", "code", "param"), [
    (b"{not json", "invalid_json", None),
    (b"\xff\xfe", "invalid_json", None),
    (b"[" * 100_000, "invalid_json", None),
    # lone surrogates (found by fuzzing: a 500 when the store encoded the secret)
    (b'{"session": {"tracing": {"": "\\ud800"}}}', "invalid_json", None),
    (b'{"\\udc00": 1}', "invalid_json", None),
    (b"[1, 2]", "invalid_type", None),
    (b'"text"', "invalid_type", None),
    (b'{"expires_after": {"seconds": 9}}', "invalid_value", "expires_after.seconds"),
    (b'{"expires_after": {"seconds": 7201}}', "invalid_value", "expires_after.seconds"),
    (b'{"expires_after": {"seconds": "600"}}', "invalid_type", "expires_after.seconds"),
    (b'{"expires_after": {"seconds": 60.5}}', "invalid_type", "expires_after.seconds"),
    (b'{"expires_after": {"seconds": true}}', "invalid_type", "expires_after.seconds"),
    (b'{"expires_after": {"anchor": "now", "seconds": 60}}', "invalid_value",
     "expires_after.anchor"),
    (b'{"expires_after": {"seconds": 60, "extra": 1}}', "unknown_parameter",
     "expires_after.extra"),
    (b'{"expires_after": 60}', "invalid_type", "expires_after"),
    (b'{"ttl": 60}', "unknown_parameter", "ttl"),
    (b'{"session": {"type": "transcription"}}', "invalid_value", "session.type"),
    (b'{"session": {"voice_typo": "joe"}}', "unknown_parameter", "session.voice_typo"),
    (b'{"session": {"audio": {"output": {"speed": 9}}}}', "invalid_value",
     "session.audio.output.speed"),
    (b'{"session": {"audio": {"input": {"turn_detection": {"type": "magic"}}}}}',
     "invalid_value", "session.audio.input.turn_detection.type"),
    (b'{"session": {"instructions": 5}}', "invalid_type", "session.instructions"),
    (b'{"session": []}', "invalid_type", "session"),
])
async def test_bad_requests_get_openai_style_errors(body: bytes, code: str,
                                                    param: str | None) -> None:
    store = MemoryStore()
    async with client_for(ClientSecrets(store), api_key=KEY) as http:
        resp = await http.post(CLIENT_SECRETS_PATH, headers=bearer(KEY), content=body)
    assert resp.status_code == 400, resp.text
    error = error_of(resp)
    assert (error["code"], error["param"], error["type"]) == (code, param,
                                                              "invalid_request_error")
    assert not store._secrets  # nothing minted


async def test_bad_seconds_message_names_the_range() -> None:
    async with client_for(ClientSecrets(MemoryStore())) as http:
        resp = await http.post(CLIENT_SECRETS_PATH, json={"expires_after": {"seconds": 5}})
    assert "between 10 and 7200" in error_of(resp)["message"]


async def test_oversized_bodies_are_refused_unread() -> None:
    async with client_for(ClientSecrets(MemoryStore())) as http:
        big = json.dumps({"session": {"instructions": "x" * MAX_BODY_BYTES}}).encode()
        resp = await http.post(CLIENT_SECRETS_PATH, content=big)
        assert resp.status_code == 413
        assert error_of(resp)["code"] == "payload_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as read
            for _ in range(MAX_BODY_BYTES // 65536 + 2):
                yield b" " * 65536

        resp = await http.post(CLIENT_SECRETS_PATH, content=chunks())
        assert resp.status_code == 413


async def test_not_ready_and_store_failures_are_server_errors() -> None:
    async with client_for(None, api_key=KEY) as http:
        resp = await http.post(CLIENT_SECRETS_PATH, headers=bearer(KEY), json={})
        assert resp.status_code == 503
        assert error_of(resp)["type"] == "server_error"
        # auth is still checked first
        resp = await http.post(CLIENT_SECRETS_PATH, json={})
        assert resp.status_code == 401
    closed = MemoryStore()
    await closed.aclose()
    async with client_for(ClientSecrets(closed)) as http:
        resp = await http.post(CLIENT_SECRETS_PATH, json={})
        assert resp.status_code == 503
        assert error_of(resp)["code"] == "store_closed"
    from orchestrator.store import StoreSettings

    full = MemoryStore(StoreSettings(max_client_secrets=1))
    async with client_for(ClientSecrets(full)) as http:
        assert (await http.post(CLIENT_SECRETS_PATH, json={})).status_code == 200
        resp = await http.post(CLIENT_SECRETS_PATH, json={})
        assert resp.status_code == 429
        assert error_of(resp)["code"] == "store_limit"


async def test_minted_values_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with client_for(ClientSecrets(MemoryStore()), api_key=KEY) as http:
        resp = await http.post(CLIENT_SECRETS_PATH, headers=bearer(KEY), json={})
    assert resp.status_code == 200
    assert resp.json()["value"] not in caplog.text and KEY not in caplog.text


# -- the real openai SDK against uvicorn ----------------------------------------------


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning",
                                           timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(1000):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()


async def test_the_openai_sdk_creates_a_client_secret() -> None:
    secrets = ClientSecrets(MemoryStore())
    async with serving(app_for(secrets, api_key=KEY)) as port:
        base_url = f"http://127.0.0.1:{port}/v1"
        client = AsyncOpenAI(api_key=KEY, base_url=base_url, max_retries=0)
        resp = await client.realtime.client_secrets.create(
            expires_after={"anchor": "created_at", "seconds": 300},
            session={"type": "realtime", "model": "gpt-realtime",
                     "instructions": "You are a helpful pirate.",
                     "audio": {"output": {"voice": "marin"},
                               "input": {"turn_detection": {"type": "semantic_vad"}}}})
        assert isinstance(resp, ClientSecretCreateResponse)
        assert resp.value.startswith("ek_") and isinstance(resp.expires_at, int)
        assert isinstance(resp.session, RealtimeSessionCreateResponse)
        assert resp.session.type == "realtime" and resp.session.id.startswith("sess_")
        assert resp.session.instructions == "You are a helpful pirate."
        assert resp.session.model == "gpt-realtime"
        assert resp.session.audio is not None and resp.session.audio.output is not None
        assert resp.session.audio.output.voice == "marin"
        assert resp.session.audio.input is not None
        detection = resp.session.audio.input.turn_detection
        assert detection is not None and detection.type == "semantic_vad"
        found = await secrets.lookup(resp.value)
        assert found is not None and found.expires_at == resp.expires_at
        assert found.session is not None and found.session["model"] == "gpt-realtime"

        plain = await client.realtime.client_secrets.create()
        assert plain.value.startswith("ek_") and plain.value != resp.value

        with pytest.raises(openai.BadRequestError) as bad:
            await client.realtime.client_secrets.create(
                expires_after={"anchor": "created_at", "seconds": 7201})
        assert bad.value.code == "invalid_value" and bad.value.param == "expires_after.seconds"

        for key in ("sk-wrong", resp.value):
            wrong = AsyncOpenAI(api_key=key, base_url=base_url, max_retries=0)
            with pytest.raises(openai.AuthenticationError) as denied:
                await wrong.realtime.client_secrets.create()
            assert denied.value.code == "invalid_api_key"
            await wrong.close()
        await client.close()
