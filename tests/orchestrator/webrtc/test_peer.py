"""ICE configuration from the settings, the host-candidate override, offer checks, CORS."""

from __future__ import annotations

import asyncio

import aioice.ice
import httpx
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from orchestrator.settings import ServeSettings
from orchestrator.webrtc import peer
from tests.orchestrator.webrtc.test_calls import KEY, REPLY, make_app
from tests.support.serving import serving

SESSION_LOOP = pytest.mark.asyncio(loop_scope="session")  # the server shares the loop


def test_no_ice_servers_unless_configured() -> None:
    assert peer.configuration(ServeSettings()).iceServers == []  # never aiortc's public STUN
    config = peer.configuration(ServeSettings(ice_servers=[
        {"urls": "stun:stun.example.org:3478"},
        {"urls": ["turn:turn.example.org:3478"], "username": "u", "credential": "p"}]))
    assert config.iceServers is not None
    stun, turn = config.iceServers
    assert stun.urls == "stun:stun.example.org:3478" and stun.username is None
    assert turn.urls == ["turn:turn.example.org:3478"]
    assert (turn.username, turn.credential) == ("u", "p")
    with pytest.raises(ValueError, match="without urls"):
        peer.configuration(ServeSettings(ice_servers=[{"username": "u"}]))


@SESSION_LOOP
async def test_host_addresses_override_is_per_task() -> None:
    async def gathered(addresses: list[str]) -> list[str]:
        peer.use_host_addresses(addresses)
        return aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True)

    assert await asyncio.create_task(gathered(["127.0.0.1", "::1"])) == ["127.0.0.1", "::1"]
    default = await asyncio.create_task(gathered([]))
    assert "127.0.0.1" not in default  # aioice's own choice: no loopback
    with pytest.raises(ValueError):
        peer.use_host_addresses(["not-an-ip"])


@SESSION_LOOP
async def test_answer_offers_exactly_the_configured_host_address() -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    await pc.setLocalDescription(await pc.createOffer())
    assert pc.localDescription is not None
    offer = pc.localDescription.sdp
    await pc.close()
    async with serving(make_app(REPLY)) as (port, _server):
        async with httpx.AsyncClient() as http:
            for path in ("/v1/realtime/calls", "/v1/realtime?model=gpt-realtime"):  # + legacy
                resp = await http.post(f"http://127.0.0.1:{port}{path}", content=offer,
                                       headers={"Authorization": f"Bearer {KEY}",
                                                "Content-Type": "application/sdp"})
                assert resp.status_code == 201, resp.text
                candidates = [line for line in resp.text.splitlines()
                              if line.startswith("a=candidate")]
                assert candidates and all(" 127.0.0.1 " in c for c in candidates)
                call_id = resp.headers["location"].rsplit("/", 1)[-1]
                hangup = await http.post(
                    f"http://127.0.0.1:{port}/v1/realtime/calls/{call_id}/hangup",
                    headers={"Authorization": f"Bearer {KEY}"})
                assert hangup.status_code == 200


@SESSION_LOOP
async def test_cors_preflight_and_exposed_location() -> None:
    origin = "https://app.example.com"
    async with serving(make_app(REPLY, cors_origins=[origin])) as (port, _server):
        async with httpx.AsyncClient() as http:
            pre = await http.options(f"http://127.0.0.1:{port}/v1/realtime/calls", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"})
            assert pre.status_code == 200
            assert pre.headers["access-control-allow-origin"] == origin
            allowed = pre.headers["access-control-allow-headers"].lower()
            assert "authorization" in allowed and "content-type" in allowed
            other = await http.options(f"http://127.0.0.1:{port}/v1/realtime/calls", headers={
                "Origin": "https://evil.example.net", "Access-Control-Request-Method": "POST"})
            assert "access-control-allow-origin" not in other.headers
            refused = await http.post(f"http://127.0.0.1:{port}/v1/realtime/calls",
                                      content="x", headers={"Origin": origin})
            assert refused.headers["access-control-allow-origin"] == origin
            assert "location" in refused.headers["access-control-expose-headers"].lower()


@pytest.mark.parametrize(("sdp", "reason"), [
    ("", "empty"),
    ("hello", "must start with 'v=0'"),
    ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=fingerprint:sha-256 AA\r\n", "ICE"),
    ("v=0\r\na=ice-ufrag:x\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "DTLS"),
    ("v=0\r\na=ice-ufrag:x\r\na=fingerprint:sha-256 AA\r\nm=video 9 RTP 96\r\n", "no audio"),
])
def test_offer_checks_say_what_is_wrong(sdp: str, reason: str) -> None:
    with pytest.raises(peer.InvalidOffer, match=reason):
        peer.check_offer(sdp)


async def _browser_offer() -> str:
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    assert pc.localDescription is not None
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def test_offers_aiortc_cannot_answer_are_refused_first() -> None:
    # found by fuzzing: aiortc accepted these offers, then failed answering them (an
    # AttributeError / ValueError: a 500 and a traceback)
    good = await _browser_offer()
    peer.check_offer(good)
    bad_bundle = good.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 4294967296 0")
    no_direction = good.replace("a=sendrecv\r\n", "", 1)
    assert bad_bundle != good and no_direction != good
    with pytest.raises(peer.InvalidOffer, match="BUNDLE"):
        peer.check_offer(bad_bundle)
    with pytest.raises(peer.InvalidOffer, match="direction"):
        peer.check_offer(no_direction)


async def test_audio_is_decoded_as_soon_as_the_next_packet_arrives() -> None:
    """The server feeds a VAD, not a speaker: no 80 ms prefetch before decoding."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    (transceiver,) = pc.getTransceivers()
    assert hasattr(transceiver.receiver, peer._JITTER_ATTR), "aiortc moved its jitter buffer"
    peer.decode_promptly(pc)
    buffer = getattr(transceiver.receiver, peer._JITTER_ATTR)
    assert buffer._prefetch == peer.RECEIVE_PREFETCH == 1
    await pc.close()
