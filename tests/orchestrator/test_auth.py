"""orchestrator.auth: which keys a request presents, and what they grant."""

from __future__ import annotations

import hmac
import logging

import pytest
from starlette.datastructures import Headers

import orchestrator.auth as auth
from orchestrator.auth import AuthUnavailable, Grant, authorize, presented_keys
from orchestrator.keys import ClientSecrets
from orchestrator.store import MemoryStore

KEY = "sk-test-standard-key"
SESSION = {"instructions": "Speak like a pirate.", "audio": {"output": {"voice": "joe"}}}


class Clock:
    def __init__(self, now: float = 1_700_000_000.25) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scope_headers(*pairs: tuple[str, str]) -> Headers:
    """Headers as starlette builds them from an ASGI scope (WebSocket or HTTP)."""
    return Headers(scope={"type": "websocket",
                          "headers": [(k.lower().encode(), v.encode()) for k, v in pairs]})


# -- presented_keys -------------------------------------------------------------------


def test_bearer_header_and_key_subprotocols() -> None:
    headers = scope_headers(("Authorization", "Bearer  sk-one "))
    protos = ["realtime", "openai-insecure-api-key.ek_two", "openai-beta.realtime-v1"]
    assert presented_keys(headers, protos) == ["sk-one", "ek_two"]
    assert presented_keys({"authorization": "bearer sk-lower"}) == ["sk-lower"]
    assert presented_keys(scope_headers(("authorization", "BEARER sk-up"))) == ["sk-up"]


def test_other_schemes_and_empty_keys_are_not_keys() -> None:
    assert presented_keys({}) == []
    assert presented_keys({"authorization": "Basic dXNlcjpwYXNz"}) == []
    assert presented_keys({"authorization": "Bearer    "}) == []
    assert presented_keys({"authorization": "sk-no-scheme"}) == []
    assert presented_keys({}, ["openai-insecure-api-key.", "realtime"]) == []


# -- authorize ------------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def secrets(clock: Clock) -> ClientSecrets:
    return ClientSecrets(MemoryStore(), clock=clock)


async def test_the_standard_key_grants_api_key(secrets: ClientSecrets) -> None:
    assert await authorize([KEY], api_key=KEY, secrets=secrets) == Grant("api_key")
    assert await authorize(["wrong", KEY], api_key=KEY, secrets=None) == Grant("api_key")
    assert await authorize([], api_key=KEY, secrets=secrets) is None
    assert await authorize(["wrong"], api_key=KEY, secrets=secrets) is None
    assert await authorize([KEY + "x", KEY[:-1]], api_key=KEY, secrets=secrets) is None


async def test_every_presented_key_is_compared(monkeypatch: pytest.MonkeyPatch,
                                               secrets: ClientSecrets) -> None:
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(a)
        return bool(real(a, b))

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = [KEY, "second", "third"]  # the match first: the others are compared anyway
    assert await authorize(keys, api_key=KEY, secrets=secrets) == Grant("api_key")
    assert calls == [k.encode() for k in keys]


async def test_an_ephemeral_key_grants_its_session_until_it_expires(
        clock: Clock, secrets: ClientSecrets) -> None:
    minted = await secrets.mint(seconds=60, session=SESSION)
    grant = await authorize([minted.value], api_key=KEY, secrets=secrets)
    assert grant == Grant("ephemeral", session=minted.session, expires_at=minted.expires_at)
    assert grant.session is not None and grant.session["instructions"] == SESSION["instructions"]
    # through the browser subprotocol too, next to other keys
    keys = presented_keys({}, ["realtime", "openai-insecure-api-key." + minted.value])
    assert await authorize(["nope", *keys], api_key=KEY, secrets=secrets) == grant
    clock.now = minted.expires_at - 0.001
    assert await authorize([minted.value], api_key=KEY, secrets=secrets) == grant
    clock.now = minted.expires_at
    assert await authorize([minted.value], api_key=KEY, secrets=secrets) is None


async def test_ephemeral_keys_can_be_refused(secrets: ClientSecrets) -> None:
    minted = await secrets.mint()
    assert await authorize([minted.value], api_key=KEY, secrets=secrets,
                           allow_ephemeral=False) is None
    # the standard key still works where ephemeral keys do not
    assert await authorize([minted.value, KEY], api_key=KEY, secrets=secrets,
                           allow_ephemeral=False) == Grant("api_key")


async def test_unknown_and_forged_ephemeral_keys_are_refused(secrets: ClientSecrets) -> None:
    minted = await secrets.mint()
    forged = minted.value[:-1] + ("A" if minted.value[-1] != "A" else "B")
    for key in (forged, "ek_", "ek_" + "x" * 43, "ek_ü" * 20, "ek_" + "a" * 100_000):
        assert await authorize([key], api_key=KEY, secrets=secrets) is None


async def test_an_open_server_lets_anyone_in_and_applies_a_key_session(
        clock: Clock, secrets: ClientSecrets) -> None:
    assert await authorize([], api_key="", secrets=None) == Grant("open")
    assert await authorize(["anything"], api_key="", secrets=secrets) == Grant("open")
    minted = await secrets.mint(seconds=30, session=SESSION)
    assert await authorize([minted.value], api_key="", secrets=secrets) == Grant(
        "open", session=minted.session, expires_at=minted.expires_at)
    assert await authorize([minted.value], api_key="", secrets=secrets,
                           allow_ephemeral=False) == Grant("open")
    clock.now = minted.expires_at + 1  # expired: still open, without the key's session
    assert await authorize([minted.value], api_key="", secrets=secrets) == Grant("open")


async def test_only_a_few_ephemeral_keys_are_looked_up(secrets: ClientSecrets) -> None:
    minted = await secrets.mint()
    looked: list[str] = []
    real = secrets.lookup

    async def counting(value: str) -> object:
        looked.append(value)
        return await real(value)

    secrets.lookup = counting  # type: ignore[method-assign,assignment]
    junk = [f"ek_{i:043d}" for i in range(50)]
    assert await authorize([*junk, minted.value], api_key=KEY, secrets=secrets) is None
    assert len(looked) == auth.MAX_EPHEMERAL_LOOKUPS
    looked.clear()
    assert (await authorize([minted.value, *junk], api_key=KEY, secrets=secrets)) is not None
    assert looked == [minted.value]


async def test_unverifiable_ephemeral_keys_are_unavailable_not_refused(
        secrets: ClientSecrets) -> None:
    minted = await secrets.mint()
    with pytest.raises(AuthUnavailable):  # server still loading its store
        await authorize([minted.value], api_key=KEY, secrets=None)
    with pytest.raises(AuthUnavailable):
        await authorize([minted.value], api_key="", secrets=None)
    closed = MemoryStore()
    await closed.aclose()
    with pytest.raises(AuthUnavailable):  # the store fails
        await authorize([minted.value], api_key=KEY, secrets=ClientSecrets(closed))
    # the standard key needs no store
    assert await authorize([KEY, minted.value], api_key=KEY, secrets=None) == Grant("api_key")


async def test_key_values_are_never_logged(caplog: pytest.LogCaptureFixture,
                                           secrets: ClientSecrets) -> None:
    caplog.set_level(logging.DEBUG)
    minted = await secrets.mint()
    for keys in ([minted.value], ["sk-wrong-secret-value"], [KEY]):
        await authorize(keys, api_key=KEY, secrets=secrets)
        await authorize(keys, api_key=KEY, secrets=secrets, allow_ephemeral=False)
    text = caplog.text + repr(minted)
    for value in (minted.value, "sk-wrong-secret-value", KEY):
        assert value not in text
