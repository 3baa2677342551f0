"""The browser-test machinery itself, with no cascade server: Chromium runs in a
loopback-only namespace, loads a page from a local site, opens the fake microphone (the WAV
plays once, speech after its leading silence), and a WebRTC call between two peer
connections of the page connects over loopback candidates with the microphone's audio heard
on the receiving side by the probe. If this fails, every other browser test would fail
for the same reason; this says which piece broke.
"""

from __future__ import annotations

import contextlib
import os
import time
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

PAGE = b"""<!doctype html><html><head><title>cascade browser infra</title></head>
<body><p id="hello">hello from the namespace</p></body></html>"""

# Two peer connections of one page call each other: the sender's track is the fake
# microphone (no processing, so the level is the file's), the receiver's track is tapped by
# the probe. Candidates are exchanged directly; only loopback ones can exist here.
LOOPBACK_CALL_JS = """
async (holdMs) => {
  const stream = await navigator.mediaDevices.getUserMedia({ audio: {
    echoCancellation: false, noiseSuppression: false, autoGainControl: false } });
  const a = new RTCPeerConnection(), b = new RTCPeerConnection();
  const candidates = [];
  a.onicecandidate = (e) => { if (e.candidate) { candidates.push(e.candidate.candidate);
                                                 b.addIceCandidate(e.candidate); } };
  b.onicecandidate = (e) => { if (e.candidate) a.addIceCandidate(e.candidate); };
  a.addTrack(stream.getAudioTracks()[0], stream);
  const connected = new Promise((resolve) => {
    b.onconnectionstatechange = () => { if (b.connectionState === 'connected') resolve(); };
  });
  await a.setLocalDescription(await a.createOffer());
  await b.setRemoteDescription(a.localDescription);
  await b.setLocalDescription(await b.createAnswer());
  await a.setRemoteDescription(b.localDescription);
  await Promise.race([connected, new Promise((r) => setTimeout(r, 10000))]);
  const state = b.connectionState;
  await new Promise((r) => setTimeout(r, holdMs));
  a.close(); b.close();
  for (const track of stream.getTracks()) track.stop();
  return { state, candidates };
}
"""


def infra_scenario(config: dict[str, Any], work: Path) -> dict[str, Any]:
    """Runs inside the namespace (tests.support.browser runner)."""
    import httpx

    mic = speech_wav(work / "mic.wav", config["text"], lead_s=config["lead_s"], tail_s=1.5)
    console: list[str] = []
    with StaticSite({"/": (PAGE, "text/html; charset=utf-8")}) as site:
        # The runner's own HTTP client reaches the site over loopback: the namespace's lo is up.
        assert httpx.get(site.url + "/", timeout=5).status_code == 200
        with chromium_page(mic, console=console) as page:
            page.goto(site.url + "/")
            title = page.title()
            text = page.inner_text("#hello")
            outside = page.evaluate("""async () => {
                try { await fetch('http://192.0.2.1/', {mode: 'no-cors'}); return 'reached'; }
                catch (e) { return 'failed'; } }""")
            hold_ms = round((mic.speech_end_s + 1.0) * 1000)
            call = page.evaluate(LOOPBACK_CALL_JS, hold_ms)
            probe = probe_snapshot(page)
    return {"title": title, "text": text, "outside": outside, "call": call, "probe": probe,
            "mic": mic.model_dump(), "console": console}


def test_chromium_in_a_loopback_namespace_hears_the_fake_microphone_over_webrtc(
        browser_tools: None) -> None:
    run = run_in_netns("tests.browser.test_browser_infra:infra_scenario",
                       {"text": "Please turn on the lights in the kitchen.", "lead_s": 1.0},
                       timeout_s=120)
    r = run.result
    print(f"browser infra run: {run.seconds:.1f} s")
    assert (r["title"], r["text"]) == ("cascade browser infra", "hello from the namespace")
    assert r["outside"] == "failed", "a non-loopback address was reachable from the page"

    probe, mic = r["probe"], r["mic"]
    assert not probe["errors"], probe["errors"]
    assert probe["audio_context"] == "running"
    # The fake microphone: silent for its leading silence, then the speech, played once.
    (opened,) = [g["opened"] for g in probe["getUserMedia"]]
    (mic_tap,) = [t for t in probe["taps"] if t["kind"] == "mic"]
    assert mic_tap["first_audible"] is not None, f"fake microphone silent: {mic_tap['peak']}"
    assert mic_tap["first_audible"] >= opened + mic["lead_s"] * 1000 - 100, \
        "speech heard before the WAV's leading silence was over"
    assert mic_tap["audible_ms"] <= (mic["speech_s"] + 0.5) * 1000, \
        "the fake microphone played its WAV more than once (%noloop not honoured?)"

    # The in-page call: loopback candidates only, connected, the microphone heard remotely.
    call = r["call"]
    assert call["state"] == "connected", (call, r["console"])
    assert call["candidates"], "Chromium offered no ICE candidate"
    assert all(" 127.0.0.1 " in c or " ::1 " in c for c in call["candidates"]), call
    (remote,) = [t for t in probe["taps"] if t["kind"] == "remote"]
    assert remote["peak"] >= probe["threshold"], f"remote audio silent: {remote['peak']}"
    assert remote["first_audible"] >= mic_tap["first_audible"]


def hanging_scenario(config: dict[str, Any], work: Path) -> dict[str, Any]:
    """Starts a child that would outlive everything, then hangs."""
    import subprocess
    import time

    subprocess.Popen(["sleep", config["marker"]])
    time.sleep(3600)
    return {}


def test_a_run_that_overruns_is_killed_with_everything_it_started(browser_tools: None) -> None:
    marker = f"{3000 + os.getpid() % 1000}.{time.time_ns() % 10**6}"  # unique sleep argument
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="overran"):
        run_in_netns("tests.browser.test_browser_infra:hanging_scenario", {"marker": marker},
                     timeout_s=3)
    assert time.monotonic() - started < 60
    # The kernel ended the namespace's processes when its init died (unshare --kill-child).
    deadline = time.monotonic() + 10
    while (left := sleepers(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes outlived the namespace: {left}"


def sleepers(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == \
                    [b"sleep", marker.encode()]:
                found.append(int(pid))
    return found
