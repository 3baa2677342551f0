"""The demo page (``orchestrator/web_demo.py``, ``orchestrator/web/``).

The routes with a real ``ClientSecrets`` on a memory store: the page and its assets with
their types and caching, the token endpoint's exposure rules (loopback peer and Host,
cross-site browsers, CASCADE_DEMO_PUBLIC), the demo switch, the script parsing and naming
only elements the page has. Then the page itself in headless Chromium against a scripted
WebRTC peer (see that section). The page against the real server is tests/browser/."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aioice.ice
import numpy as np
import pytest
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.testclient import TestClient
from playwright.async_api import Page, async_playwright

from orchestrator import web_demo
from orchestrator.keys import ClientSecret, ClientSecrets, session_from_config
from orchestrator.protocol.items import ContentPart, MessageItem
from orchestrator.protocol.response import Response as Response_
from orchestrator.protocol.response import StatusDetails
from orchestrator.protocol.server_events import (
    CascadeTurnTimingsEvent,
    ConversationItemTruncatedEvent,
    ErrorDetail,
    ErrorEvent,
    InputAudioBufferCommittedEvent,
    InputAudioBufferSpeechStartedEvent,
    InputAudioBufferSpeechStoppedEvent,
    InputAudioTranscriptionCompletedEvent,
    InputAudioTranscriptionDeltaEvent,
    OutputAudioBufferClearedEvent,
    OutputAudioBufferStartedEvent,
    OutputAudioBufferStoppedEvent,
    Part,
    ResponseContentPartAddedEvent,
    ResponseCreatedEvent,
    ResponseDoneEvent,
    ResponseOutputAudioTranscriptDeltaEvent,
    ResponseOutputAudioTranscriptDoneEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ServerEventBase,
    SessionCreatedEvent,
    TranscriptionDurationUsage,
)
from orchestrator.protocol.session import ServerVad, Session, SessionConfig
from orchestrator.settings import ServeSettings
from orchestrator.store import MemoryStore, StoreError, StoreLimitError, StoreUnavailable
from tests.support.browser import CHROMIUM, chromium_args
from tests.support.serving import serving

WEB = Path(web_demo.__file__).parent / "web"
API_KEY = "sk-standard-key-never-in-the-page"
LOCAL = ("127.0.0.1", 50123)
LOCAL_URL = "http://127.0.0.1:8000"
# Elements a browser test drives (the page's contract, see the task of issue 9).
DRIVEN_IDS = ("connect", "hangup", "mute", "status", "user-live", "log", "latency")


def settings(**overrides: Any) -> ServeSettings:
    return ServeSettings(api_key=API_KEY, **overrides)


def make_app(config: ServeSettings,
             secrets: Callable[[], web_demo.SecretMinter | None]) -> FastAPI:
    app = FastAPI()
    app.include_router(web_demo.router(config, secrets))
    return app


@pytest.fixture
def secrets() -> ClientSecrets:
    return ClientSecrets(MemoryStore())


def client(secrets: ClientSecrets | None, *, peer: tuple[str, int] = LOCAL,
           base_url: str = LOCAL_URL, **overrides: Any) -> TestClient:
    app = make_app(settings(**overrides), lambda: secrets)
    return TestClient(app, client=peer, base_url=base_url)


# --- the page and its assets ----------------------------------------------------------


class _Refs(HTMLParser):
    """The ids and the same-origin asset references of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(values["id"] or "")
        for name in ("src", "href"):
            ref = values.get(name)
            if ref:
                self.refs.append(ref)


def page_refs() -> _Refs:
    parser = _Refs()
    parser.feed((WEB / "index.html").read_text("utf-8"))
    return parser


def test_the_page_and_every_asset_it_references_are_served(secrets: ClientSecrets) -> None:
    with client(secrets) as http:
        page = http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["cache-control"] == "no-cache"
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert 'id="connect"' in page.text
        refs = page_refs().refs
        assert {"web/demo.js", "web/demo.css", "web/icon.svg"} <= set(refs)
        types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".svg": "image/svg+xml"}
        for ref in refs:
            assert not re.match(r"^(https?:)?//", ref), f"external reference {ref}"
            got = http.get("/" + ref)
            assert got.status_code == 200, ref
            assert got.headers["content-type"] == types[Path(ref).suffix], ref
            assert got.content == (WEB / Path(ref).name).read_bytes()
            assert got.headers["cache-control"] == "no-cache"


def test_revalidation_answers_304_and_head_has_no_body(secrets: ClientSecrets) -> None:
    with client(secrets) as http:
        first = http.get("/web/demo.js")
        etag = first.headers["etag"]
        again = http.get("/web/demo.js", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        assert again.headers["etag"] == etag
        assert http.get("/web/demo.js", headers={"If-None-Match": '"other"'}).status_code == 200
        assert http.get("/", headers={"If-None-Match": f"W/{etag}"}).status_code == 200
        head = http.head("/")
        assert head.status_code == 200 and head.content == b""


@pytest.mark.parametrize("path", ["/web/missing.js", "/web/index.html", "/web/..%2fweb_demo.py",
                                  "/web/../web_demo.py", "/web/", "/index.html"])
def test_only_the_page_files_are_served(secrets: ClientSecrets, path: str) -> None:
    with client(secrets) as http:
        assert http.get(path).status_code == 404


def test_the_page_never_contains_the_standard_key(secrets: ClientSecrets) -> None:
    with client(secrets) as http:
        for path in ("/", "/web/demo.js", "/web/demo.css", "/web/icon.svg"):
            assert API_KEY not in http.get(path).text
        minted = http.post("/demo/token")
        assert minted.status_code == 200 and API_KEY not in minted.text


def test_demo_off_serves_nothing(secrets: ClientSecrets) -> None:
    with client(secrets, demo=False) as http:
        assert http.get("/").status_code == 404
        assert http.get("/web/demo.js").status_code == 404
        assert http.post("/demo/token").status_code == 404
    assert web_demo.router(settings(demo=False), lambda: secrets).routes == []


# --- the token endpoint ---------------------------------------------------------------


@pytest.mark.parametrize(("peer", "base_url"), [
    (("127.0.0.1", 40000), "http://127.0.0.1:8000"),
    (("::1", 40000), "http://[::1]:8000"),
    (("127.0.0.1", 40000), "http://localhost:8000"),
])
async def test_token_from_loopback_is_a_live_key_with_the_demo_session(
        secrets: ClientSecrets, peer: tuple[str, int], base_url: str) -> None:
    with client(secrets, peer=peer, base_url=base_url) as http:
        answer = http.post("/demo/token")
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert set(body) == {"value", "expires_at"}
    assert body["value"].startswith("ek_")
    assert abs(body["expires_at"] - (time.time() + web_demo.TOKEN_SECONDS)) < 60
    found = await secrets.lookup(body["value"])
    assert isinstance(found, ClientSecret)
    assert found.expires_at == body["expires_at"]
    session = session_from_config(found.session)
    assert session.cascade.timings is True
    vad = session.audio.input.turn_detection if session.audio.input else None
    assert isinstance(vad, ServerVad) and vad.interrupt_response is True


def test_demo_session_is_a_valid_session_update() -> None:
    config = SessionConfig.model_validate(web_demo.DEMO_SESSION)
    assert config.cascade is not None and config.cascade.timings
    # The page sends the same session in its session.update.
    script = (WEB / "demo.js").read_text("utf-8")
    assert "cascade: { timings: true }" in script and "type: 'server_vad'" in script


@pytest.mark.parametrize("peer", [("10.1.2.3", 5000), ("192.0.2.7", 5000), ("::ffff:10.0.0.1", 1),
                                  ("testclient", 50000)])
def test_token_refused_for_other_machines(secrets: ClientSecrets,
                                          peer: tuple[str, int]) -> None:
    with client(secrets, peer=peer) as http:
        answer = http.post("/demo/token", headers={"X-Forwarded-For": "127.0.0.1"})
    assert answer.status_code == 403
    error = answer.json()["error"]
    assert error["code"] == "demo_not_public"
    assert error["type"] == "invalid_request_error"
    assert "CASCADE_DEMO_PUBLIC=true" in error["message"]
    assert peer[0] in error["message"]


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded", "X-Real-IP", "Via"])
def test_token_refused_through_a_local_reverse_proxy(secrets: ClientSecrets,
                                                     header: str) -> None:
    """A proxy on this machine: loopback peer, loopback Host (nginx's default), but the
    visitor is anywhere; its forwarding headers give it away."""
    with client(secrets) as http:
        answer = http.post("/demo/token", headers={header: "for=198.51.100.4"})
        assert http.post("/demo/token").status_code == 200
    assert answer.status_code == 403
    error = answer.json()["error"]
    assert error["code"] == "demo_not_public" and "proxy" in error["message"]
    assert header.lower() in error["message"]
    with client(secrets, demo_public=True) as http:
        assert http.post("/demo/token", headers={header: "x"}).status_code == 200


def test_token_refused_to_a_rebinding_host_name(secrets: ClientSecrets) -> None:
    """A loopback peer whose page was loaded under another name (DNS rebinding)."""
    with client(secrets, base_url="http://attacker.example:8000") as http:
        answer = http.post("/demo/token")
    assert answer.status_code == 403
    assert "CASCADE_DEMO_PUBLIC=true" in answer.json()["error"]["message"]
    with client(secrets, base_url="http://demo.example:8000", demo_public=True) as http:
        assert http.post("/demo/token").status_code == 200


def test_public_demo_answers_anyone(secrets: ClientSecrets) -> None:
    with client(secrets, peer=("203.0.113.9", 6000), base_url="http://demo.example",
                demo_public=True) as http:
        answer = http.post("/demo/token")
    assert answer.status_code == 200 and answer.json()["value"].startswith("ek_")


@pytest.mark.parametrize("public", [False, True])
def test_cross_site_browser_requests_are_refused(secrets: ClientSecrets, public: bool) -> None:
    with client(secrets, demo_public=public) as http:
        for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                        {"Origin": "http://evil.example"}, {"Origin": "null"}):
            answer = http.post("/demo/token", headers=headers)
            assert answer.status_code == 403, headers
            assert answer.json()["error"]["code"] == "cross_origin_forbidden"
        for headers in ({"Sec-Fetch-Site": "same-origin", "Origin": LOCAL_URL},
                        {"Origin": LOCAL_URL}, {}):
            assert http.post("/demo/token", headers=headers).status_code == 200, headers


def test_token_needs_no_standard_key_and_is_post_only(secrets: ClientSecrets) -> None:
    with client(secrets) as http:
        assert http.post("/demo/token").status_code == 200  # no Authorization header
        assert http.get("/demo/token").status_code == 405


def test_token_while_loading_is_503() -> None:
    with client(None) as http:
        answer = http.post("/demo/token")
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "2"
    assert answer.json()["error"]["code"] == "not_ready"


class FailingMinter:
    def __init__(self, error: StoreError) -> None:
        self.error = error

    async def mint(self, *, seconds: int = 600,
                   session: dict[str, Any] | None = None) -> ClientSecret:
        raise self.error


@pytest.mark.parametrize(("error", "status"), [(StoreUnavailable("redis is down"), 503),
                                               (StoreLimitError("too many keys"), 429)])
def test_store_failures_are_json_errors(error: StoreError, status: int) -> None:
    minter = FailingMinter(error)
    app = make_app(settings(), lambda: minter)
    with TestClient(app, client=LOCAL, base_url=LOCAL_URL) as http:
        answer = http.post("/demo/token")
    assert answer.status_code == status
    assert answer.json()["error"]["code"] == error.code


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("testclient", False), ("", False),
    (None, False), ("localhost", False),  # a peer address is never a name
])
def test_loopback_peer_addresses(host: str | None, loopback: bool) -> None:
    assert web_demo.is_loopback_address(host) is loopback


@pytest.mark.parametrize(("host", "loopback"), [
    ("localhost:8000", True), ("LOCALHOST", True), ("127.0.0.1:8000", True),
    ("[::1]:8000", True), ("app.localhost", True), ("127.0.0.1.nip.io", False),
    ("evil.example:8000", False), ("10.0.0.1", False), ("", False),
])
def test_loopback_host_headers(host: str, loopback: bool) -> None:
    assert web_demo.is_loopback_host(host) is loopback


# --- the page's script ------------------------------------------------------------------


def test_the_script_parses() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("needs node (apt-get install nodejs, or bash deploy/install.sh)",
                    pytrace=False)
    done = subprocess.run([node, "--check", str(WEB / "demo.js")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def test_the_script_names_only_elements_the_page_has() -> None:
    ids = page_refs().ids
    assert set(DRIVEN_IDS) <= ids
    script = (WEB / "demo.js").read_text("utf-8")
    used = set(re.findall(r"\$\('([\w-]+)'\)", script))
    assert used and used <= ids, used - ids
    assert "window.cascadeDemo" in script


# --- the page in a real browser, against a scripted WebRTC peer ---------------------------
#
# Headless Chromium (fake microphone) runs the page against the demo router and a stand-in
# for POST /v1/realtime/calls: an aiortc peer that checks the ek_ key, answers the offer,
# plays a tone, and sends the server events each step scripts (built with the protocol's
# own models, so the page is held to the real wire shapes). The page's rendering of turns,
# partial transcripts, barge-in, latency, reconnect with resume, mute and hang-up are
# checked here without the speech stages.

WAIT_MS = 20_000  # hang guard for each step, not a speed requirement
BEEP = 1000  # a peak (s16) only the fake microphone's beep reaches
OPUS_NOISE = 4  # the decoder's peak on a silent (muted) track
TONE_RATE = 48_000
TONE_SAMPLES = 960  # 20 ms


class Tone(MediaStreamTrack):
    """An outbound audio track: a 440 Hz tone in paced 20 ms frames."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._sent = 0
        self._start: float | None = None

    async def recv(self) -> AudioFrame:
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        due = self._start + self._sent / TONE_RATE
        await asyncio.sleep(max(0.0, due - loop.time()))
        t = (np.arange(TONE_SAMPLES) + self._sent) / TONE_RATE
        pcm = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2")
        frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = TONE_RATE
        frame.pts = self._sent
        frame.time_base = Fraction(1, TONE_RATE)
        self._sent += TONE_SAMPLES
        return frame


@dataclass
class Call:
    id: str
    pc: RTCPeerConnection
    key: str
    query: dict[str, str]
    channel: RTCDataChannel | None = None
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    received: list[dict[str, Any]] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)  # per inbound frame, the mic's peak
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def send(self, *events: ServerEventBase) -> None:
        assert self.channel is not None
        for event in events:
            self.channel.send(event.to_json())


class ScriptedCalls:
    """The stand-in for the server's WebRTC signalling (the page's side of the contract)."""

    def __init__(self, secrets: ClientSecrets) -> None:
        self.secrets = secrets
        self.calls: list[Call] = []
        self.hangups: list[tuple[str, str]] = []  # (call id, key)
        self.router = APIRouter()
        self.router.add_api_route("/v1/realtime/calls", self.create, methods=["POST"])
        self.router.add_api_route("/v1/realtime/calls/{call_id}/hangup", self.hangup,
                                  methods=["POST"])

    async def _key(self, request: Request) -> str | None:
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        return key if await self.secrets.lookup(key) is not None else None

    async def create(self, request: Request) -> Response:
        key = await self._key(request)
        if key is None:
            return web_demo.error_response(401, "invalid_api_key", "not a live ek_ key")
        assert request.headers["content-type"] == "application/sdp"
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        call = Call(f"rtc_{len(self.calls) + 1}", pc, key, dict(request.query_params))
        self.calls.append(call)

        @pc.on("datachannel")
        def on_channel(channel: RTCDataChannel) -> None:
            assert channel.label == "oai-events"
            call.channel = channel
            channel.on("message", lambda raw: call.received.append(json.loads(raw)))
            call.opened.set()

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            call.tasks.append(asyncio.create_task(self._drain(track, call)))

        offer = (await request.body()).decode()
        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        pc.addTrack(Tone())
        await pc.setLocalDescription(await pc.createAnswer())
        return Response(pc.localDescription.sdp, status_code=201, media_type="application/sdp",
                        headers={"Location": f"/v1/realtime/calls/{call.id}"})

    @staticmethod
    async def _drain(track: MediaStreamTrack, call: Call) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                assert isinstance(frame, AudioFrame)
                call.peaks.append(int(np.abs(frame.to_ndarray()).max()))

    async def hangup(self, call_id: str, request: Request) -> Response:
        key = await self._key(request)
        if key is None:
            return web_demo.error_response(401, "invalid_api_key", "not a live ek_ key")
        self.hangups.append((call_id, key))
        for call in self.calls:
            if call.id == call_id:
                await call.pc.close()
        return Response(status_code=200)

    async def aclose(self) -> None:
        for call in self.calls:
            await call.pc.close()
            for task in call.tasks:
                task.cancel()
            await asyncio.gather(*call.tasks, return_exceptions=True)


def assistant(item_id: str, transcript: str, *, cancelled: bool = False) -> MessageItem:
    return MessageItem(id=item_id, role="assistant", object="realtime.item",
                       status="incomplete" if cancelled else "completed",
                       content=[ContentPart(type="output_audio", transcript=transcript)])


def user_turn(item_id: str, words: list[str]) -> list[ServerEventBase]:
    """The events of one spoken user turn, up to its final transcript."""
    events: list[ServerEventBase] = [
        InputAudioBufferSpeechStartedEvent(audio_start_ms=100, item_id=item_id)]
    events += [InputAudioTranscriptionDeltaEvent(item_id=item_id, delta=w) for w in words]
    events += [
        InputAudioBufferSpeechStoppedEvent(audio_end_ms=900, item_id=item_id),
        InputAudioBufferCommittedEvent(item_id=item_id),
        InputAudioTranscriptionCompletedEvent(
            item_id=item_id, transcript="".join(words),
            usage=TranscriptionDurationUsage(seconds=0.8)),
    ]
    return events


def reply(response_id: str, item_id: str, pieces: list[str]) -> list[ServerEventBase]:
    """A response speaking ``pieces``, up to its last transcript delta."""
    ids: dict[str, Any] = {"response_id": response_id, "item_id": item_id,
                           "output_index": 0, "content_index": 0}
    item = MessageItem(id=item_id, role="assistant", object="realtime.item",
                       status="in_progress", content=[])
    events: list[ServerEventBase] = [
        ResponseCreatedEvent(response=Response_(id=response_id)),
        ResponseOutputItemAddedEvent(response_id=response_id, output_index=0, item=item),
        ResponseContentPartAddedEvent(**ids, part=Part(type="audio", transcript="")),
        OutputAudioBufferStartedEvent(response_id=response_id),
    ]
    events += [ResponseOutputAudioTranscriptDeltaEvent(**ids, delta=p) for p in pieces]
    return events


def reply_done(response_id: str, item_id: str, heard: str, *,
               cancelled: bool = False) -> list[ServerEventBase]:
    ids: dict[str, Any] = {"response_id": response_id, "item_id": item_id,
                           "output_index": 0, "content_index": 0}
    status: Any = "cancelled" if cancelled else "completed"
    item = assistant(item_id, heard, cancelled=cancelled)
    details = StatusDetails(type="cancelled", reason="turn_detected") if cancelled else None
    return [
        ResponseOutputAudioTranscriptDoneEvent(**ids, transcript=heard),
        ResponseOutputItemDoneEvent(response_id=response_id, output_index=0, item=item),
        ResponseDoneEvent(response=Response_(id=response_id, status=status,
                                             status_details=details, output=[item])),
    ]


def timings(response_id: str, first_audio_ms: float) -> CascadeTurnTimingsEvent:
    return CascadeTurnTimingsEvent(
        response_id=response_id, pipeline="streaming", speculative_hit=True,
        status="completed", endpoint_ms=520.0, first_transcript_delta_ms=-600.0,
        final_transcript_ms=610.0, llm_first_token_ms=700.0, first_audio_ms=first_audio_ms)


def session_created(session_id: str, token: str) -> SessionCreatedEvent:
    session = Session(id=session_id)
    session.cascade.resume_token = token
    return SessionCreatedEvent(session=session)


@dataclass
class PageRun:
    page: Page
    calls: ScriptedCalls

    async def until(self, expression: str, arg: Any = None) -> Any:
        handle = await self.page.wait_for_function(expression, arg=arg, timeout=WAIT_MS)
        return await handle.json_value()

    async def demo(self, expression: str) -> Any:
        return await self.page.evaluate(f"(() => {{ const d = window.cascadeDemo; "
                                        f"return {expression}; }})()")

    async def call(self, index: int) -> Call:
        for _ in range(WAIT_MS // 10):
            if len(self.calls.calls) > index:
                break
            await asyncio.sleep(0.01)
        call = self.calls.calls[index]
        await asyncio.wait_for(call.opened.wait(), WAIT_MS / 1000)
        return call

    async def received(self, call: Call, event_type: str) -> dict[str, Any]:
        for _ in range(WAIT_MS // 10):
            found = [e for e in call.received if e.get("type") == event_type]
            if found:
                return found[-1]
            await asyncio.sleep(0.01)
        raise AssertionError(f"the page never sent {event_type}: {call.received}")


@contextlib.asynccontextmanager
async def page_run(monkeypatch: pytest.MonkeyPatch,
                   ready: bool = True) -> AsyncIterator[PageRun]:
    # aioice leaves 127.0.0.1 out of its host candidates; everything here is loopback.
    monkeypatch.setattr(aioice.ice, "get_host_addresses",
                        lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    secrets = ClientSecrets(MemoryStore())
    calls = ScriptedCalls(secrets)
    console: list[str] = []
    app = make_app(settings(), lambda: secrets if ready else None)
    app.include_router(calls.router)
    try:
        async with serving(app, wait_ready=False, lifespan="off") as (port, _), \
                async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=chromium_args())
            try:
                # The page's CSP forbids eval; Playwright's string predicates need it.
                context = await browser.new_context(bypass_csp=True)
                page = await context.new_page()
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
                await page.goto(f"http://127.0.0.1:{port}/?raw=1")
                yield PageRun(page, calls)
                assert not [c for c in console if c.startswith("pageerror")], console
            finally:
                await browser.close()
    finally:
        await calls.aclose()


@pytest.fixture
def browser_ready() -> None:
    """Chromium must be there (CI installs it): a browser test fails, never skips."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"needs Chromium at {CHROMIUM} (apt-get install chromium "
                    "fonts-liberation, or bash deploy/install.sh)", pytrace=False)


async def test_the_page_holds_a_conversation(monkeypatch: pytest.MonkeyPatch,
                                             browser_ready: None) -> None:
    async with page_run(monkeypatch) as run:
        assert await run.demo("d.state") == "idle"
        await run.page.click("#connect")
        call = await run.call(0)
        await run.until("window.cascadeDemo.state === 'connected'")
        update = await run.received(call, "session.update")
        assert update["session"]["cascade"] == {"timings": True}
        assert update["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        assert await secrets_of(run).lookup(call.key) is not None
        call.send(session_created("sess_demo", "resume-1"))

        # A turn: the partial transcript shows live, then the log and the latency.
        turn = user_turn("item_u1", ["What's ", "the ", "weather"])
        call.send(*turn[:3])
        assert await run.until("(() => { const t = document.querySelector('#user-live')"
                               ".textContent; return t === \"What's the \" && t; })()")
        call.send(*turn[3:])
        call.send(*reply("resp_1", "item_a1", ["It is sunny ", "and warm."]))
        assert await run.until("window.cascadeDemo.turns[0]?.assistant === "
                               "'It is sunny and warm.'")
        call.send(*reply_done("resp_1", "item_a1", "It is sunny and warm."),
                  OutputAudioBufferStoppedEvent(response_id="resp_1"),
                  timings("resp_1", 812.0))
        await run.until("window.cascadeDemo.turns[0]?.timings !== null")
        turns = await run.demo("d.turns")
        assert turns[0]["user"] == "What's the weather"
        assert turns[0]["assistant"] == "It is sunny and warm."
        assert turns[0]["interrupted"] is False
        assert turns[0]["timings"]["first_audio_ms"] == 812.0
        assert await run.page.text_content("#v2v") == "812"
        assert "812 ms" in (await run.page.text_content("#latency") or "")
        assert await run.page.locator("#latency .stage").count() == 4
        bubbles = await run.page.locator("#log li").all_text_contents()
        assert ["What's the weather" in bubbles[0], "It is sunny and warm." in bubbles[1]] \
            == [True, True]
        assert await run.page.text_content("#user-live") == ""
        # The reply's audio reaches WebAudio through the remote track.
        assert await run.until("window.cascadeDemo.remoteLevel() > 0.02")

        # Barge-in: the user talks over the reply; the bubble keeps only what was heard.
        call.send(*user_turn("item_u2", ["Tell ", "me ", "a ", "story."]))
        call.send(*reply("resp_2", "item_a2", ["Once upon a time ", "there was a dragon ",
                                               "who lived in a castle."]))
        await run.until("window.cascadeDemo.turns[1]?.assistant.endsWith('castle.')")
        call.send(InputAudioBufferSpeechStartedEvent(audio_start_ms=5000, item_id="item_u3"),
                  OutputAudioBufferClearedEvent(response_id="resp_2"),
                  ConversationItemTruncatedEvent(item_id="item_a2", content_index=0,
                                                 audio_end_ms=1400),
                  *reply_done("resp_2", "item_a2", "Once upon a time", cancelled=True))
        await run.until("window.cascadeDemo.turns[1]?.assistant === 'Once upon a time'")
        assert (await run.demo("d.turns[1]"))["interrupted"] is True
        interrupted = run.page.locator("#log li.assistant[data-interrupted=true]")
        assert await interrupted.count() == 1
        assert "interrupted" in (await interrupted.text_content() or "")
        call.send(*user_turn("item_u3", ["Stop."])[1:])
        await run.until("window.cascadeDemo.turns[2]?.user === 'Stop.'")

        # An error event from the server is shown.
        call.send(ErrorEvent(error=ErrorDetail(type="invalid_request_error",
                                               code="x", message="Something went wrong")))
        await run.until("document.querySelector('#notice').textContent"
                        ".includes('Something went wrong')")
        assert "error" in await run.demo("d.events")

        # Mute: the microphone track is disabled, so the server hears silence instead of
        # the fake microphone's beep (one a second, near full scale).
        assert await beeped(call, 0), "the fake microphone never beeped"
        await run.page.click("#mute")
        assert await run.page.get_attribute("#mute", "aria-pressed") == "true"
        await asyncio.sleep(0.5)  # frames captured before the click may still arrive
        muted_from = len(call.peaks)
        await frames(call, muted_from + 100)  # 2 s: two beeps' worth
        assert max(call.peaks[muted_from:]) <= OPUS_NOISE
        await run.page.click("#mute")
        assert await run.page.get_attribute("#mute", "aria-pressed") == "false"
        assert await beeped(call, len(call.peaks)), "no beep after unmuting"

        # The server drops the call: the page resumes the same session on a new call.
        await call.pc.close()
        await run.until("window.cascadeDemo.state === 'reconnecting'")
        second = await run.call(1)
        assert second.query == {"session_id": "sess_demo", "resume_token": "resume-1"}
        await run.until("window.cascadeDemo.state === 'connected'")
        assert await run.demo("d.callId") == "rtc_2"
        second.send(session_created("sess_demo", "resume-2"))
        second.send(*user_turn("item_u4", ["Thanks!"]),
                    *reply("resp_4", "item_a4", ["You're welcome."]),
                    *reply_done("resp_4", "item_a4", "You're welcome."))
        await run.until("window.cascadeDemo.turns[3]?.assistant === \"You're welcome.\"")
        texts = await run.page.locator("#log li .text").all_text_contents()
        assert texts == ["What's the weather", "It is sunny and warm.", "Tell me a story.",
                         "Once upon a time", "Stop.", "Thanks!", "You're welcome."]
        assert await run.demo("d.session.resumeToken") == "resume-2"

        # Hang up: the page tells the server with its key and returns to idle.
        await run.page.click("#hangup")
        await run.until("window.cascadeDemo.state === 'idle'")
        for _ in range(WAIT_MS // 10):
            if ("rtc_2", second.key) in run.calls.hangups:
                break
            await asyncio.sleep(0.01)
        assert ("rtc_2", second.key) in run.calls.hangups
        assert await run.page.is_enabled("#connect")
        assert not await run.page.is_enabled("#hangup")


async def beeped(call: Call, since: int) -> bool:
    """Whether a beep of the fake microphone (one a second) reaches the peer in frames
    from index ``since`` on, waiting up to WAIT_MS for it: a scripted scenario can run
    faster than the first beep."""
    for _ in range(WAIT_MS // 10):
        if max(call.peaks[since:] or [0]) > BEEP:
            return True
        await asyncio.sleep(0.01)
    return False


async def frames(call: Call, count: int) -> None:
    """Wait until the call has received ``count`` microphone frames (hang-guarded)."""
    for _ in range(WAIT_MS // 10):
        if len(call.peaks) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {len(call.peaks)} of {count} microphone frames arrived")


def secrets_of(run: PageRun) -> ClientSecrets:
    return run.calls.secrets


async def test_a_refused_token_is_shown(monkeypatch: pytest.MonkeyPatch,
                                       browser_ready: None) -> None:
    """While the server is still loading, the token endpoint's reason reaches the user and
    the page stays usable."""
    async with page_run(monkeypatch, ready=False) as run:
        await run.page.click("#connect")
        await run.until("window.cascadeDemo.state === 'error'")
        assert "still loading" in (await run.page.text_content("#notice") or "")
        assert await run.page.is_enabled("#connect")
        assert not await run.page.is_enabled("#hangup")
        assert run.calls.calls == []
