"""WebRTC calls end to end with a Python aiortc client over real loopback sockets (real
HTTP signalling, ICE, DTLS, SCTP and RTP), the real session core, and fake stages with
exact timings (the real models over WebRTC: test_calls_real.py and the browser tests)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any, cast

import httpx
import numpy as np
import pytest
import pytest_asyncio
from aiortc import RTCConfiguration, RTCPeerConnection
from fastapi import FastAPI
from websockets.asyncio.client import connect

from orchestrator.backends import Backends
from orchestrator.keys import ClientSecrets
from orchestrator.realtime import RealtimeSession
from orchestrator.server import Resources, create_app
from orchestrator.settings import ServeSettings
from orchestrator.store import MemoryStore
from stages.vad.model import SileroVadModel
from tests.orchestrator.fakes import FakeAsr, FakeLlm, FakeTts, FakeVad, tone
from tests.support.rtc_client import RATE, RtcClient
from tests.support.serving import serving

# The server fixture and the tests share the session's event loop.
pytestmark = pytest.mark.asyncio(loop_scope="session")

KEY = "sk-test-webrtc"
REPLY = ["Sure. ", "The lights ", "in the kitchen ", "are on now. ", "Anything else? "]
LONG_REPLY = [f"This is sentence number {i} of a long answer. " for i in range(12)]

Served = tuple[str, FastAPI]


def speech(ms: int) -> np.ndarray[Any, Any]:
    """A tone the fake VAD and ASR hear as one word, at the call's 48 kHz."""
    return np.frombuffer(tone(ms, RATE), dtype="<i2")


def make_app(llm_tokens: list[str], **overrides: Any) -> FastAPI:
    store = MemoryStore()

    async def loader(settings: ServeSettings) -> Resources:
        backends = Backends(asr=FakeAsr(["lights", "kitchen", "please"]),
                            llm=FakeLlm(llm_tokens, first_token_s=0.05, interval_s=0.02),
                            tts=FakeTts(loud=True, ms_per_char=40.0))
        return Resources(backends=backends, vad=cast(SileroVadModel, None), store=store)

    settings = ServeSettings(api_key=KEY, ice_host_addresses=["127.0.0.1"], **overrides)
    return create_app(settings, session_factory=partial(RealtimeSession, make_vad=FakeVad),
                      loader=loader)


@pytest_asyncio.fixture(loop_scope="session")
async def served() -> AsyncIterator[Served]:
    app = make_app(REPLY)
    async with serving(app) as (port, _server):
        yield f"http://127.0.0.1:{port}", app


def without_candidates(sdp: str) -> str:
    """What a browser posts when it does not wait for ICE gathering."""
    return "".join(line + "\r\n" for line in sdp.splitlines()
                   if not line.startswith("a=candidate") and line != "a=end-of-candidates")


async def turn_on(client: RtcClient) -> None:
    await client.wait_for("session.created")
    client.send({"type": "session.update", "session": {
        "type": "realtime", "cascade": {"timings": True},
        "audio": {"input": {"turn_detection": {"type": "server_vad",
                                               "silence_duration_ms": 300}}}}})
    await client.wait_for("session.updated")


async def test_spoken_turn_over_webrtc(served: Served) -> None:
    base, app = served
    client = RtcClient(base, KEY)
    try:
        resp = await client.connect()
        assert resp.status_code == 201, resp.text
        assert resp.headers["content-type"].startswith("application/sdp")
        assert resp.headers["location"] == f"/v1/realtime/calls/{client.call_id}"
        assert client.call_id is not None and client.call_id.startswith("rtc_")
        await turn_on(client)
        client.mic.say(speech(600))
        done = await client.wait_for("response.done", within=20)
        assert done["response"]["status"] == "completed"
        stopped = await client.wait_for("output_audio_buffer.stopped", within=20)
        types = client.types()
        # Audio is on the track, never in events; the buffer events frame it.
        assert "response.output_audio.delta" not in types
        started = types.index("output_audio_buffer.started")
        assert types.index("response.content_part.added") < started
        assert types.index("response.done") < types.index("output_audio_buffer.stopped")
        assert stopped["response_id"] == done["response"]["id"]
        transcript = await client.wait_for("conversation.item.input_audio_transcription"
                                           ".completed")
        assert transcript["transcript"] == "lights"
        # The reply was heard: loud frames arrived after the user stopped speaking, as
        # long as the synthesized reply (40 ms per character).
        assert client.mic.speech_ended_at is not None
        heard = client.heard.loud_since(client.mic.speech_ended_at)
        expected_s = len("".join(REPLY)) * 0.040
        assert len(heard) * 0.020 == pytest.approx(expected_s, rel=0.15)
        timings = await client.wait_for("cascade.turn.timings")
        assert timings["first_audio_ms"] is not None
        assert await client.hangup() == 200
    finally:
        await client.close()
    state = app.state.server
    for _ in range(100):
        if not state.calls:
            break
        await asyncio.sleep(0.02)
    assert state.calls == {} and state.active == 0


async def test_offer_without_candidates_connects(served: Served) -> None:
    """Browsers often post the offer before gathering; the server's loopback candidate
    and the client's peer-reflexive one still form a pair."""
    base, _app = served
    client = RtcClient(base, KEY)
    offer = await client.pc.createOffer()
    await client.pc.setLocalDescription(offer)
    assert client.pc.localDescription is not None
    sdp = without_candidates(client.pc.localDescription.sdp)
    assert "a=candidate" not in sdp
    try:
        async with httpx.AsyncClient() as http:
            resp = await http.post(f"{base}/v1/realtime/calls", content=sdp, headers={
                "Authorization": f"Bearer {KEY}", "Content-Type": "application/sdp"})
        assert resp.status_code == 201, resp.text
        assert "a=candidate" in resp.text and "127.0.0.1" in resp.text
        from aiortc import RTCSessionDescription
        await client.pc.setRemoteDescription(RTCSessionDescription(resp.text, "answer"))
        async with asyncio.timeout(15):
            await client.channel_open.wait()
        created = await client.wait_for("session.created")
        assert created["session"]["type"] == "realtime"
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def talking(reply: list[str]) -> AsyncIterator[RtcClient]:
    """A call with server VAD on, to a server whose LLM says ``reply``."""
    async with serving(make_app(reply)) as (port, _server):
        client = RtcClient(f"http://127.0.0.1:{port}", KEY)
        try:
            await client.connect()
            await turn_on(client)
            yield client
        finally:
            await client.close()


async def test_barge_in_truncates_to_what_was_played() -> None:
    async with talking(LONG_REPLY) as client:
        client.mic.say(speech(600))
        await client.wait_for("output_audio_buffer.started", within=20)
        await asyncio.sleep(1.5)  # the reply plays; then the user talks over it
        client.mic.say(speech(600))
        truncated = await client.wait_for("conversation.item.truncated", within=20)
        cleared = await client.wait_for("output_audio_buffer.cleared", within=5)
        done = await client.wait_for("response.done", within=5)
        assert done["response"]["status"] == "cancelled"
        assert cleared["response_id"] == done["response"]["id"]
        # The cut is what the track sent: frames are counted as they leave, and the
        # client received about that much loud audio (Opus edges blur one frame or two).
        cut_ms = truncated["audio_end_ms"]
        assert 1200 <= cut_ms <= 4000
        await asyncio.sleep(0.5)  # nothing more of the reply arrives after the cut
        first = client.heard.loud_at[0]
        reply_frames = [t for t in client.heard.loud_at if t - first < cut_ms / 1000 + 1.0]
        assert abs(len(reply_frames) * 20 - cut_ms) <= 200, (len(reply_frames), cut_ms)
        # The item keeps the words heard by then (40 ms a character).
        item = done["response"]["output"][0]
        heard = item["content"][0]["transcript"]
        assert heard and "".join(LONG_REPLY).startswith(heard)
        assert len(heard) * 40 <= cut_ms + 1
        assert len(heard) < len("".join(LONG_REPLY)) / 2


async def test_output_audio_buffer_clear_and_append_over_webrtc() -> None:
    async with talking(LONG_REPLY) as client:
        client.send({"type": "input_audio_buffer.append", "audio": "AAAA",
                     "event_id": "evt_1"})
        error = await client.wait_for("error")
        assert error["error"]["code"] == "invalid_event_for_transport"
        assert error["error"]["event_id"] == "evt_1"
        client.send({"type": "response.create"})
        await client.wait_for("output_audio_buffer.started", within=20)
        await asyncio.sleep(0.5)
        client.send({"type": "response.cancel"})
        client.send({"type": "output_audio_buffer.clear"})
        done = await client.wait_for("response.done", within=10)
        assert done["response"]["status"] == "cancelled"
        await client.wait_for("output_audio_buffer.cleared", within=5)
        await asyncio.sleep(0.4)  # frames already in flight or in the jitter buffer
        heard_before = len(client.heard.loud_at)
        await asyncio.sleep(0.6)
        assert len(client.heard.loud_at) == heard_before  # the track went quiet


async def test_refused_offers_get_clear_errors(served: Served) -> None:
    base, app = served
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    assert pc.localDescription is not None
    good = pc.localDescription.sdp
    await pc.close()
    auth = {"Authorization": f"Bearer {KEY}"}
    sdp_type = {"Content-Type": "application/sdp"}
    expired = await ClientSecrets(app.state.server.resources.store,
                                  clock=lambda: time.time() - 3600).mint(seconds=10)
    cases: list[tuple[dict[str, str], Any, int, str]] = [
        ({"Authorization": "Bearer sk-wrong", **sdp_type}, good, 401, "invalid_api_key"),
        ({**sdp_type}, good, 401, "invalid_api_key"),
        ({"Authorization": f"Bearer {expired.value}", **sdp_type}, good, 401,
         "invalid_api_key"),
        ({**auth, **sdp_type}, "hello", 400, "invalid_offer"),
        ({**auth, **sdp_type}, "", 400, "invalid_offer"),
        ({**auth, **sdp_type}, "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", 400,
         "invalid_offer"),
        ({**auth, **sdp_type}, good.replace("a=fingerprint", "a=x-nothing"), 400,
         "invalid_offer"),
        ({**auth, **sdp_type}, "v=0\r\n" + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n" * 5, 400,
         "invalid_offer"),
        ({**auth, **sdp_type}, "x" * (300 * 1024), 413, "payload_too_large"),
        ({**auth, "Content-Type": "image/png"}, good, 415, "unsupported_media_type"),
        ({**auth, "Content-Type": "application/json"}, "{", 400, "invalid_json"),
        # found by fuzzing: a lone surrogate in the JSON was a 500 (UnicodeEncodeError)
        ({**auth, "Content-Type": "application/json"}, '{"sdp": "\\ud800"}', 400,
         "invalid_json"),
        ({**auth, "Content-Type": "application/json"},
         json.dumps({"sdp": good, "session": {"audio": {"input": 5}, "voice": "x"}}),
         400, "invalid_type"),
        ({**auth, "Content-Type": "application/json"}, json.dumps({"sdp": 3}), 400,
         "missing_required_parameter"),
        ({**auth, "Content-Type": "application/json"},
         json.dumps({"sdp": good, "session": {"type": "realtime", "temperature": "hot"}}),
         400, "invalid_type"),
    ]
    async with httpx.AsyncClient(timeout=20) as http:
        for headers, body, status, code in cases:
            resp = await http.post(f"{base}/v1/realtime/calls", content=body, headers=headers)
            assert resp.status_code == status, (code, resp.text)
            error = resp.json()["error"]
            assert error["code"] == code, (code, error)
            assert error["message"]
        resume = await http.post(f"{base}/v1/realtime/calls?session_id=sess_x",
                                 content=good, headers={**auth, **sdp_type})
        assert resume.status_code == 400 and resume.json()["error"]["code"] == "invalid_resume"
        gone = await http.post(f"{base}/v1/realtime/calls/rtc_nope/hangup", headers=auth)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "call_not_found"
    assert app.state.server.calls == {} and app.state.server.active == 0


async def test_ephemeral_key_and_multipart_offer_start_configured_calls(served: Served) -> None:
    base, _app = served
    async with httpx.AsyncClient() as http:
        minted = await http.post(f"{base}/v1/realtime/client_secrets", headers={
            "Authorization": f"Bearer {KEY}"}, json={"session": {
                "type": "realtime", "instructions": "Speak like a pirate."}})
        assert minted.status_code == 200, minted.text
    ek = minted.json()["value"]
    client = RtcClient(base, ek)
    try:
        assert (await client.connect()).status_code == 201
        created = await client.wait_for("session.created")
        assert created["session"]["instructions"] == "Speak like a pirate."
    finally:
        await client.close()
    # multipart (openai-node's calls.create): the session part applies after the key's
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    await pc.setLocalDescription(await pc.createOffer())
    assert pc.localDescription is not None
    async with httpx.AsyncClient() as http:
        resp = await http.post(f"{base}/v1/realtime/calls", headers={
            "Authorization": f"Bearer {KEY}"}, files={
                "sdp": (None, pc.localDescription.sdp, "application/sdp"),
                "session": (None, json.dumps({"type": "realtime", "instructions": "Hi"}),
                            "application/json")})
        assert resp.status_code == 201, resp.text
        call_id = resp.headers["location"].rsplit("/", 1)[-1]
        assert (await http.post(f"{base}/v1/realtime/calls/{call_id}/hangup", headers={
            "Authorization": f"Bearer {KEY}"})).status_code == 200
    await pc.close()


async def test_sideband_websocket_controls_a_live_call(served: Served) -> None:
    base, _app = served
    client = RtcClient(base, KEY)
    try:
        await client.connect()
        await client.wait_for("session.created")
        url = base.replace("http://", "ws://") + f"/v1/realtime?call_id={client.call_id}"
        async with connect(url, additional_headers={"Authorization": f"Bearer {KEY}"},
                           proxy=None) as ws:
            await ws.send(json.dumps({"type": "session.update", "session": {
                "type": "realtime", "instructions": "From the backend."}}))
            seen: list[dict[str, Any]] = []
            async with asyncio.timeout(10):
                while not any(e["type"] == "session.updated" for e in seen):
                    seen.append(json.loads(await ws.recv()))
            updated = await client.wait_for("session.updated")  # the browser hears it too
            assert updated["session"]["instructions"] == "From the backend."
            await ws.send(json.dumps({"type": "response.create"}))
            await client.wait_for("output_audio_buffer.started", within=20)
        async with connect(url, additional_headers={"Authorization": "Bearer sk-nope"},
                           proxy=None) as refused:
            pytest.fail(f"a wrong key reached the sideband: {refused}")
    except Exception as exc:
        if "403" not in str(exc):
            raise
    finally:
        await client.close()


async def test_a_call_that_never_connects_is_cleaned_up() -> None:
    app = make_app(REPLY, webrtc_connect_timeout_s=1.0)
    async with serving(app) as (port, _server):
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio")
        pc.createDataChannel("oai-events")
        await pc.setLocalDescription(await pc.createOffer())
        assert pc.localDescription is not None
        async with httpx.AsyncClient() as http:
            resp = await http.post(f"http://127.0.0.1:{port}/v1/realtime/calls",
                                   content=pc.localDescription.sdp, headers={
                                       "Authorization": f"Bearer {KEY}",
                                       "Content-Type": "application/sdp"})
        assert resp.status_code == 201
        await pc.close()  # the answer is never applied: no ICE, no DTLS
        state = app.state.server
        assert len(state.calls) == 1
        call = next(iter(state.calls.values()))
        async with asyncio.timeout(5):
            await call.ended.wait()
        assert call.end_reason == "connect_timeout"
        assert state.calls == {} and state.active == 0
        assert call.pc.connectionState == "closed"
        assert call.track.readyState == "ended"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_twenty_calls_leave_no_leaked_tasks_or_sockets() -> None:
    app = make_app(REPLY)
    async with serving(app) as (port, _server):
        base = f"http://127.0.0.1:{port}"

        async def one_call() -> None:
            client = RtcClient(base, KEY)
            try:
                await client.connect()
                await client.wait_for("session.created")
                assert await client.hangup() == 200
            finally:
                await client.close()

        await one_call()  # warm: lazily created executors, caches
        await asyncio.sleep(0.5)
        gc.collect()
        tasks_before, fds_before = len(asyncio.all_tasks()), _fds()
        for _ in range(5):
            await asyncio.gather(*(one_call() for _ in range(4)))
        state = app.state.server
        for _ in range(100):
            if not state.calls and len(asyncio.all_tasks()) <= tasks_before:
                break
            await asyncio.sleep(0.1)
        gc.collect()
        assert state.active == 0
        assert len(asyncio.all_tasks()) <= tasks_before
        assert _fds() <= fds_before + 2, (fds_before, _fds())


async def test_a_dropped_call_resumes_its_conversation_on_a_new_call(served: Served) -> None:
    """The page's reconnect: a new call with session_id + resume_token continues the same
    conversation; the old call, if still alive, is told and ended."""
    base, _app = served
    first = RtcClient(base, KEY)
    try:
        await first.connect()
        await turn_on(first)
        first.mic.say(speech(600))
        done = await first.wait_for("response.done", within=20)
        created = first.events[0]
        session_id = created["session"]["id"]
        token = created["session"]["cascade"]["resume_token"]
        assistant_item = done["response"]["output"][0]["id"]
        second = RtcClient(base, KEY, query=f"?session_id={session_id}&resume_token={token}")
        try:
            assert (await second.connect()).status_code == 201
            resumed = await second.wait_for("session.created")
            assert resumed["session"]["id"] == session_id
            # the config set on the first call carried over
            assert resumed["session"]["audio"]["input"]["turn_detection"][
                "silence_duration_ms"] == 300
            second.send({"type": "conversation.item.retrieve", "item_id": assistant_item})
            item = await second.wait_for("conversation.item.retrieved")
            assert item["item"]["content"][0]["transcript"] == "".join(REPLY)
            taken = await first.wait_for("error", within=10)
            assert taken["error"]["code"] == "session_taken_over"
            # the conversation goes on on the new call
            second.mic.say(speech(600))
            again = await second.wait_for("response.done", within=20)
            assert again["response"]["status"] == "completed"
        finally:
            await second.close()
    finally:
        await first.close()
    async with httpx.AsyncClient() as http:
        bad = await http.post(f"{base}/v1/realtime/calls?session_id={session_id}"
                              "&resume_token=wrong", content=first.pc.localDescription.sdp
                              if first.pc.localDescription else "", headers={
                                  "Authorization": f"Bearer {KEY}",
                                  "Content-Type": "application/sdp"})
    assert bad.status_code in (400, 401, 403, 404), bad.text
    assert bad.json()["error"]["message"]


async def test_pcmu_when_the_client_prefers_it(served: Served) -> None:
    base, _app = served
    client = RtcClient(base, KEY)
    from aiortc.rtcrtpsender import RTCRtpSender
    pcmu = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType == "audio/PCMU"]
    for transceiver in client.pc.getTransceivers():
        if transceiver.kind == "audio":
            transceiver.setCodecPreferences(pcmu)
    try:
        resp = await client.connect()
        assert resp.status_code == 201
        audio_section = resp.text.split("m=audio", 1)[1].split("m=", 1)[0]
        assert "PCMU/8000" in audio_section and "opus" not in audio_section.lower()
        await turn_on(client)
        client.mic.say(speech(600))
        done = await client.wait_for("response.done", within=20)
        assert done["response"]["status"] == "completed"
        await client.wait_for("output_audio_buffer.stopped", within=20)
        assert client.mic.speech_ended_at is not None
        assert len(client.heard.loud_since(client.mic.speech_ended_at)) > 20
    finally:
        await client.close()
