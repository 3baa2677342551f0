"""The official openai SDK drives WebRTC calls as a backend does: ``calls.create`` (the
multipart offer + session), a sideband ``realtime.connect(call_id=...)`` that controls the
call, ``calls.hangup``; the media runs on an aiortc peer over loopback."""

from __future__ import annotations

import asyncio

import pytest
from aiortc import RTCSessionDescription
from openai import AsyncOpenAI, BadRequestError

from tests.orchestrator.webrtc.test_calls import KEY, REPLY, make_app
from tests.support.rtc_client import RtcClient
from tests.support.serving import serving

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_openai_sdk_creates_controls_and_hangs_up_a_call() -> None:
    app = make_app(REPLY)
    async with serving(app) as (port, _server):
        base = f"http://127.0.0.1:{port}"
        sdk = AsyncOpenAI(api_key=KEY, base_url=f"{base}/v1",
                          websocket_base_url=f"ws://127.0.0.1:{port}/v1")
        peer = RtcClient(base, KEY)
        try:
            await peer.pc.setLocalDescription(await peer.pc.createOffer())
            assert peer.pc.localDescription is not None
            answer = await sdk.realtime.calls.create(
                sdp=peer.pc.localDescription.sdp,
                session={"type": "realtime", "model": "gpt-realtime",
                         "instructions": "Answer in one word."})
            location = answer.response.headers["location"]
            call_id = location.rsplit("/", 1)[-1]
            assert answer.response.status_code == 201 and call_id.startswith("rtc_")
            await peer.pc.setRemoteDescription(RTCSessionDescription(answer.text, "answer"))
            async with asyncio.timeout(15):
                await peer.channel_open.wait()
            created = await peer.wait_for("session.created")
            assert created["session"]["instructions"] == "Answer in one word."

            async with sdk.realtime.connect(call_id=call_id) as side:
                await side.session.update(session={"type": "realtime",
                                                   "instructions": "Be brief."})
                await side.response.create()
                kinds: list[str] = []
                async with asyncio.timeout(30):
                    async for event in side:
                        kinds.append(event.type)
                        if event.type == "response.done":
                            assert event.response.status == "completed"
                            break
                assert "session.updated" in kinds
                assert "response.output_audio_transcript.delta" in kinds
                assert "response.output_audio.delta" not in kinds  # audio is on the track
            # the peer heard the reply the sideband asked for, and saw the same events
            await peer.wait_for("response.done", within=10)
            await peer.wait_for("output_audio_buffer.started")
            assert len(peer.heard.loud_at) > 10
            await sdk.realtime.calls.hangup(call_id)
            assert app.state.server.calls == {}  # torn down before the hang-up answered
            with pytest.raises(BadRequestError):  # a bad offer, as the SDK reports it
                await sdk.realtime.calls.create(sdp="not an offer")
        finally:
            await peer.close()
            await sdk.close()
