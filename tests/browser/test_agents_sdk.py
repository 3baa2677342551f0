"""The official OpenAI Agents SDK for JavaScript, in a real browser, holds a spoken turn with
``cascade serve`` over WebRTC.

Everything is what an application would ship: ``@openai/agents-realtime`` 0.20.0 from npm
(pinned by deploy/browser/package-lock.json, bundled with esbuild, unmodified), a page on
the application's own origin (a different port, so the SDK's call is cross-origin and
CORS is exercised), and an ephemeral ``ek_`` key that the application's backend — here the
test runner, holding the server's standard key — mints with
``POST /v1/realtime/client_secrets`` and hands to the page. The page builds
``new RealtimeSession(new RealtimeAgent(...), {transport: new OpenAIRealtimeWebRTC(...)})``
and calls ``session.connect({apiKey: ek, url: <server>/v1/realtime/calls})``; the SDK opens
the microphone itself (Chromium's fake device playing a piper sentence once) and plays the
reply into an <audio> element.

What is checked: the call connects through the SDK's own signalling (the call id from
``Location``), the server's events are what the SDK expects over WebRTC (no audio deltas on
the data channel; output_audio_buffer.started/stopped), the user's words come back as the
SDK's transcript and history item, and the reply is *heard* in the page: the probe's
WebAudio level on the remote track rises above the threshold while the SDK reports the
assistant's audio. The browser and the server run in a loopback-only network namespace
(tests/support/browser.py); the server offers a 127.0.0.1 ICE candidate there
(CASCADE_ICE_HOST_ADDRESSES).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import (
    StaticSite,
    chromium_page,
    probe_snapshot,
    run_in_netns,
    speech_wav,
)
from tests.support.speech import near_word_errors

pytestmark = pytest.mark.slow

KEY = "sk-browser-test"
SDK_VERSION = "0.20.0"
SENTENCE = "What time does the train to Boston leave tomorrow morning?"
INSTRUCTIONS = "You are a helpful voice assistant. Answer in one short sentence."

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>cascade x agents sdk</title>
<script src="/agents-realtime.js"></script></head><body></body></html>"""


def agents_sdk_scenario(config: dict[str, Any], work: Path) -> dict[str, Any]:
    """Runs inside the namespace: cascade serve, the application's site, Chromium."""
    import httpx

    from orchestrator.launcher import CascadeProcess

    mic = speech_wav(work / "mic.wav", config["text"], lead_s=config["lead_s"], tail_s=3.0)
    bundle = Path(config["bundle"]).read_bytes()
    files = {"/": (PAGE, "text/html; charset=utf-8"),
             "/agents-realtime.js": (bundle, "text/javascript; charset=utf-8")}
    console: list[str] = []
    result: dict[str, Any] = {"mic": mic.model_dump(), "console": console}
    with StaticSite(files) as site:
        os.environ["CASCADE_ICE_HOST_ADDRESSES"] = json.dumps(["127.0.0.1"])
        os.environ["CASCADE_CORS_ORIGINS"] = json.dumps([site.url])
        server = CascadeProcess("serve", ["serve"], "--api-key", KEY)
        try:
            url = server.wait_ready(240)
            # The application's backend: the standard key stays here, the page gets an ek_.
            minted = httpx.post(f"{url}/v1/realtime/client_secrets",
                                headers={"Authorization": f"Bearer {KEY}"},
                                json={"expires_after": {"anchor": "created_at", "seconds": 600},
                                      "session": {"type": "realtime",
                                                  "instructions": config["instructions"],
                                                  # cascade.turn.timings: the server's marks
                                                  "cascade": {"timings": True}}},
                                timeout=10)
            result["client_secret_status"] = minted.status_code
            if minted.status_code != 200:
                result["client_secret_error"] = minted.text
                return result
            secret = minted.json()
            result["client_secret"] = {"prefix": secret["value"][:3],
                                       "expires_at": secret.get("expires_at")}
            with chromium_page(mic, console=console) as page:
                page.goto(site.url + "/")
                page.wait_for_function("() => window.cascadeAgentsTest !== undefined")
                result["sdk"] = page.evaluate(
                    "config => window.cascadeAgentsTest.run(config)",
                    {"apiKey": secret["value"], "url": f"{url}/v1/realtime/calls",
                     "instructions": config["instructions"], "timeoutMs": 90_000,
                     "speechTimeoutMs": round((mic.speech_end_s + 15) * 1000)})
                result["probe"] = probe_snapshot(page)
            result["calls_after_close"] = calls_after_close(url)
        finally:
            result["server_log"] = server.log_tail(80)
            server.stop()
    return result


def calls_after_close(url: str, hang_guard_s: float = 20.0) -> dict[str, float]:
    """The server's WebRTC call gauges once the page has closed its session: polls
    /metrics until no call is live (or the hang guard passes) and returns the live count
    and the ended calls by reason."""
    import time

    import httpx

    deadline = time.monotonic() + hang_guard_s
    while True:
        values: dict[str, float] = {}
        for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
            if line.startswith(("cascade_webrtc_calls ", "cascade_webrtc_calls_ended_total{")):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        if values.get("cascade_webrtc_calls") == 0 or time.monotonic() > deadline:
            return values
        time.sleep(0.2)


def turn_timings(r: dict[str, Any]) -> dict[str, int | None]:
    """Milliseconds in the page's clock, from the end of the user's speech (when the fake
    microphone opened + the voiced end of its WAV, the bench's definition) to what the SDK
    and the listener saw; ``first_audio_heard_ms`` is voice-to-voice as heard in the page."""
    sdk, probe, mic = r["sdk"], r["probe"], r["mic"]
    marks = sdk["marks"]
    opened = probe["getUserMedia"][0]["opened"]
    speech_end = opened + round(mic["voiced_end_s"] * 1000)
    remote = [t for t in probe["taps"] if t["kind"] == "remote"]
    heard = remote[0]["first_audible"] if remote else None

    def since_end(name: str) -> int | None:
        return marks[name] - speech_end if name in marks else None

    return {
        "connect_ms": marks["connected"] - marks["connect_start"] if "connected" in marks
        else None,
        "connected_before_speech_ms": opened + round(mic["voiced_start_s"] * 1000)
        - marks["connected"]
        if "connected" in marks else None,
        "speech_stopped_ms": since_end("event:input_audio_buffer.speech_stopped"),
        "transcript_ms": since_end(
            "event:conversation.item.input_audio_transcription.completed"),
        "audio_started_event_ms": since_end("event:output_audio_buffer.started"),
        "first_audio_heard_ms": heard - speech_end if heard is not None else None,
        "reply_audible_ms": remote[0]["audible_ms"] if remote else None,
        "response_done_ms": since_end("event:response.done"),
    }


def test_openai_agents_sdk_holds_a_spoken_turn_over_webrtc(
        agents_sdk_bundle: Path, record_property: Any) -> None:
    run = run_in_netns("tests.browser.test_agents_sdk:agents_sdk_scenario",
                       {"text": SENTENCE, "lead_s": 2.5, "instructions": INSTRUCTIONS,
                        "bundle": str(agents_sdk_bundle)},
                       timeout_s=420)
    r = run.result
    context = ("\n--- console ---\n" + "\n".join(r["console"][-40:])
               + f"\n--- server log ---\n{r.get('server_log', '')}")
    assert r["client_secret_status"] == 200, r.get("client_secret_error")
    assert r["client_secret"]["prefix"] == "ek_"

    sdk, probe = r["sdk"], r["probe"]
    timings = turn_timings(r)
    for name, value in timings.items():
        record_property(name, value)
    print(f"\nagents SDK turn in the browser: run {run.seconds:.1f} s, {timings}")
    print("events:", [e for _, e in sdk["events"]])
    server_marks = [e["event"] for e in probe["events"] if e.get("type") == "cascade.turn.timings"]
    print("server timings:", server_marks)

    assert sdk["version"] == SDK_VERSION
    assert not sdk["errors"], f"{sdk['errors']}{context}"
    assert not probe["errors"], probe["errors"]
    assert "connected" in sdk["marks"], f"the SDK never connected{context}"
    assert (sdk["callId"] or "").startswith("rtc_"), sdk["callId"]  # from Location

    # The protocol as the SDK sees it over WebRTC.
    received = [e["type"] for e in probe["events"] if e["dir"] == "in"]
    sent = [e["type"] for e in probe["events"] if e["dir"] == "out"]
    assert "session.update" in sent and "session.updated" in received, (sent, received)
    assert "response.output_audio.delta" not in received, "audio deltas on the data channel"
    assert "input_audio_buffer.append" not in sent
    for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "conversation.item.input_audio_transcription.completed", "response.created",
                 "output_audio_buffer.started", "response.done", "output_audio_buffer.stopped"):
        assert kind in received, f"no {kind} (timings {timings}): {received}{context}"
    assert received.index("output_audio_buffer.started") \
        < received.index("output_audio_buffer.stopped")
    assert sdk["responseDone"] and sdk["audioStopped"]

    # The user's words, as the SDK's transcript event and its history item.
    (heard,) = sdk["transcripts"]["user"]
    assert near_word_errors(SENTENCE, heard) <= 2, heard
    users = [i for i in sdk["history"] if i["role"] == "user"]
    assert len(users) == 1 and users[0]["content"], sdk["history"]
    assert users[0]["content"][0]["text"] == heard, sdk["history"]

    # The reply: an assistant item with its transcript, and audio a listener heard.
    assistants = [i for i in sdk["history"] if i["role"] == "assistant"]
    assert len(assistants) == 1, sdk["history"]
    said = " ".join(p["text"] or "" for p in assistants[0]["content"]).strip()
    assert said, assistants[0]
    assert said == "".join(sdk["transcripts"]["assistant"].values()).strip()
    (remote,) = [t for t in probe["taps"] if t["kind"] == "remote"]
    assert remote["peak"] >= probe["threshold"], \
        f"the reply was not heard in the page (peak RMS {remote['peak']:.4f}){context}"
    # Heard when the server said the reply's audio plays, not before the user's turn ended.
    started = sdk["marks"]["event:output_audio_buffer.started"]
    speech_stopped = sdk["marks"]["event:input_audio_buffer.speech_stopped"]
    assert remote["first_audible"] > speech_stopped
    assert remote["last_audible"] >= started

    # The page closed the session (data channel and peer connection, no hang-up request):
    # the server ended the call and holds none.
    calls = r["calls_after_close"]
    assert calls.get("cascade_webrtc_calls") == 0, calls
    assert calls.get('cascade_webrtc_calls_ended_total{reason="client_left"}') == 1, calls
