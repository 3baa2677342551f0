"""Real-browser tests: Debian's Chromium, headless, in a loopback-only network namespace.

Why a namespace: a browser test starts a real browser and a real server that speak WebRTC,
which gathers every interface address and may try STUN. Inside ``unshare --net`` only
``lo`` exists, so nothing the test does can leave the machine or depend on its network, and
a WebRTC call connects only over the loopback candidates the test set up on purpose.
The namespace also gets its own PID namespace (``--pid --fork --kill-child``): when the run
ends, or the test kills it, the kernel ends every process it started (server, Chromium,
Playwright's driver). Nothing can leak past one test.

Shape: the pytest side calls ``run_in_netns("module:function", config)``. That spawns ONE
process, ``python -m tests.support.browser module:function config.json result.json``,
inside the namespace, which checks the isolation, imports the function and calls it with
the config and a work folder. The function starts whatever it needs there (``cascade
serve``, a ``StaticSite``), drives Chromium with ``chromium_page`` and returns a JSON-able
dict, which comes back as the result. Pieces for scenarios:

- ``require_browser_tools``: what is missing (Chromium, unshare, ip, root), so a test fails
  with a clear message instead of skipping (CI installs them with deploy/install.sh);
- ``chromium_args`` / ``chromium_page``: the flags that make WebRTC work headless on
  loopback with a fake microphone fed from a WAV, and a Playwright page with ``PROBE_JS``
  installed and the console captured;
- ``speech_wav`` / ``write_fake_mic``: the fake microphone's file (48 kHz mono s16, speech
  padded with silence, played once);
- ``PROBE_JS``: an init script that measures, in the page, what a listener would hear: it
  taps the remote audio track of every RTCPeerConnection (WebAudio level, the way the page
  itself would see it), the microphone tracks from getUserMedia, and logs the events on
  every data channel. Pages under test need no hooks of their own;
- ``StaticSite``: serves a page and its scripts from a thread on a free loopback port;
- ``agents_bundle``: the esbuild bundle of the pinned @openai/agents-realtime
  (deploy/browser), built on first use.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from benchmarks.v2v.corpus import voiced_span
from stages.common.audio import Int16Array, float_to_pcm16, resample, write_wav

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CASCADE_CHROMIUM", "/usr/bin/chromium")
BROWSER_DIR = REPO / "deploy" / "browser"
AGENTS_BUNDLE = BROWSER_DIR / "build" / "agents-realtime.js"
FAKE_MIC_RATE = 48_000

Scenario = Callable[[dict[str, Any], Path], dict[str, Any]]


# --- what the tests need on the machine ---------------------------------------------------


def missing_browser_tools() -> list[str]:
    """What a browser test cannot run without, each with how to get it; empty when ready."""
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium fonts-liberation, "
                       "or bash deploy/install.sh)")
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (apt-get install {package})")
    if os.geteuid() != 0:
        missing.append("root (unshare --net needs it to make the loopback-only namespace)")
    return missing


def require_browser_tools() -> None:
    """Raise with every missing piece named: a browser test never skips silently."""
    missing = missing_browser_tools()
    if missing:
        raise RuntimeError("browser tests need: " + "; ".join(missing))


def agents_bundle(timeout_s: float = 600.0) -> Path:
    """The browser bundle of the pinned @openai/agents-realtime (deploy/browser/build.sh:
    ``npm ci`` from the committed lock file the first time, esbuild after; a no-op when it
    is up to date, as after deploy/install.sh)."""
    if shutil.which("npm") is None and not AGENTS_BUNDLE.exists():
        raise RuntimeError("the agents SDK bundle needs node and npm "
                           "(apt-get install nodejs npm, or bash deploy/install.sh)")
    proc = subprocess.run(["bash", str(BROWSER_DIR / "build.sh")], capture_output=True,
                          text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0 or not AGENTS_BUNDLE.exists():
        raise RuntimeError(f"deploy/browser/build.sh failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return AGENTS_BUNDLE


# --- the fake microphone ------------------------------------------------------------------


class FakeMic(BaseModel):
    """A WAV Chromium plays as its microphone, once, from when a page opens the device.
    Times are seconds from the start of the file (= from when getUserMedia opened it)."""

    path: str
    lead_s: float  # silence before the clip starts
    speech_s: float  # the clip itself
    tail_s: float  # silence after it (Chromium sends silence after the end as well)
    # The voiced part of the clip, by the bench's ground-truth definition
    # (benchmarks.v2v.corpus.voiced_span): what "end of the user's speech" means everywhere.
    voiced_start_s: float
    voiced_end_s: float
    text: str = ""

    @property
    def speech_end_s(self) -> float:
        return self.lead_s + self.speech_s


def write_fake_mic(path: Path, samples: Int16Array, rate: int, *, lead_s: float = 1.0,
                   tail_s: float = 2.0, text: str = "") -> FakeMic:
    """``samples`` (mono pcm16 at ``rate``) as a 48 kHz mono s16 WAV padded with silence:
    Chromium's fake capture device reads this format natively (no resampling of its own)."""
    speech = float_to_pcm16(resample(samples, rate, FAKE_MIC_RATE))
    lead = np.zeros(round(lead_s * FAKE_MIC_RATE), dtype=np.int16)
    tail = np.zeros(round(tail_s * FAKE_MIC_RATE), dtype=np.int16)
    write_wav(str(path), np.concatenate([lead, speech, tail]), FAKE_MIC_RATE)
    start, end = voiced_span(speech, FAKE_MIC_RATE)
    return FakeMic(path=str(path), lead_s=lead_s, speech_s=len(speech) / FAKE_MIC_RATE,
                   tail_s=tail_s, voiced_start_s=lead_s + start / FAKE_MIC_RATE,
                   voiced_end_s=lead_s + end / FAKE_MIC_RATE, text=text)


def speech_wav(path: Path, text: str, *, lead_s: float = 1.0, tail_s: float = 2.0) -> FakeMic:
    """``text`` spoken by piper (tests/support/speech.py: natural, and the same audio every
    run) as a fake-microphone WAV."""
    from tests.support.speech import piper_clip

    rate = 24_000
    return write_fake_mic(path, piper_clip(text, rate), rate, lead_s=lead_s, tail_s=tail_s,
                          text=text)


# --- Chromium -----------------------------------------------------------------------------


def chromium_args(fake_mic: FakeMic | None = None) -> list[str]:
    """Flags for headless Chromium as root, offline, with WebRTC on loopback.

    --allow-loopback-in-peer-connection: without it Chromium offers no 127.0.0.1 candidate
    and a call in a loopback-only namespace cannot connect. WebRtcHideLocalIpsWithMdns off:
    candidates carry the address itself, not an mDNS name nobody here resolves. The fake
    capture device plays the WAV once (``%noloop``) then silence, so one turn is spoken once.
    --mute-audio keeps the reply from reaching the (absent) speakers and the echo canceller,
    which would otherwise duck the fake microphone while the page plays; WebAudio still sees
    the remote track, which is what the probe measures. The profile directory is
    Playwright's (a temporary one per launch).
    """
    args = [
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", "--disable-default-apps", "--mute-audio",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ]
    if fake_mic is not None:
        args.append(f"--use-file-for-fake-audio-capture={fake_mic.path}%noloop")
    return args


# Installed in every page before its own scripts (Playwright add_init_script). Times are the
# page's performance.now() in ms, the clock page scripts use too.
PROBE_JS = r"""
(() => {
  if (window.__cascadeProbe) return;
  const now = () => Math.round(performance.now());
  const THRESHOLD = 0.01;  // RMS of full scale: speech is ~0.05-0.3, silence/comfort noise < 0.003
  const probe = {
    threshold: THRESHOLD, taps: [], events: [], peers: [], getUserMedia: [], errors: [],
  };
  window.__cascadeProbe = probe;
  let ctx = null;
  const context = () => {
    if (!ctx) ctx = new AudioContext();
    if (ctx.state !== 'running') ctx.resume().catch(() => {});
    return ctx;
  };

  // Level of one audio track: an AnalyserNode read every 20 ms. A remote WebRTC track only
  // reaches WebAudio while it also plays in a media element (a Chromium quirk), so the tap
  // plays it in a muted <audio> of its own.
  function tap(track, kind) {
    try {
      const stream = new MediaStream([track]);
      if (kind === 'remote') {
        const el = document.createElement('audio');
        el.muted = true; el.autoplay = true; el.srcObject = stream;
        el.play().catch(() => {});
        (document.body || document.documentElement).append(el);
      }
      const audio = context();
      const analyser = audio.createAnalyser();
      analyser.fftSize = 1024;
      audio.createMediaStreamSource(stream).connect(analyser);
      const buf = new Float32Array(analyser.fftSize);
      const t = { kind, id: track.id, start: now(), end: null, peak: 0, first_audible: null,
                  last_audible: null, audible_ms: 0, samples: [] };
      probe.taps.push(t);
      const timer = setInterval(() => {
        if (track.readyState === 'ended') { t.end = now(); clearInterval(timer); return; }
        analyser.getFloatTimeDomainData(buf);
        let sum = 0;
        for (let i = 0; i < buf.length; i++) sum += buf[i] * buf[i];
        const rms = Math.sqrt(sum / buf.length);
        const at = now();
        t.samples.push([at, Math.round(rms * 10000) / 10000]);
        if (rms > t.peak) t.peak = rms;
        if (rms >= THRESHOLD) {
          if (t.first_audible === null) t.first_audible = at;
          t.last_audible = at;
          t.audible_ms += 20;
        }
      }, 20);
    } catch (e) {
      probe.errors.push(`tap ${kind}: ${e}`);
    }
  }

  function watchChannel(channel) {
    const log = (dir, data) => {
      let type = null, event = null;
      try { event = JSON.parse(data); type = event.type ?? null; } catch { type = null; }
      const keep = type && !type.endsWith('.delta') ? event : undefined;
      probe.events.push({ t: now(), dir, channel: channel.label, type, event: keep });
    };
    channel.addEventListener('message', (e) => log('in', e.data));
    const send = channel.send.bind(channel);
    channel.send = (data) => { log('out', data); return send(data); };
    for (const dir of ['open', 'close']) {
      const label = channel.label;
      channel.addEventListener(dir, () => probe.events.push({ t: now(), dir, channel: label }));
    }
  }

  function summarize(report) {
    const out = { at: now(), inbound: [], outbound: [], pair: null };
    const codecs = {};
    report.forEach((s) => { if (s.type === 'codec') codecs[s.id] = s.mimeType; });
    report.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'audio') {
        out.inbound.push({ codec: codecs[s.codecId] ?? null, packets: s.packetsReceived,
                           bytes: s.bytesReceived, lost: s.packetsLost, jitter: s.jitter,
                           energy: s.totalAudioEnergy, concealed: s.concealedSamples });
      } else if (s.type === 'outbound-rtp' && s.kind === 'audio') {
        out.outbound.push({ codec: codecs[s.codecId] ?? null, packets: s.packetsSent,
                            bytes: s.bytesSent });
      } else if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') {
        const local = report.get(s.localCandidateId), remote = report.get(s.remoteCandidateId);
        out.pair = { local: local && `${local.address}:${local.port} ${local.candidateType}`,
                     remote: remote && `${remote.address}:${remote.port} ${remote.candidateType}`,
                     rtt: s.currentRoundTripTime };
      }
    });
    return out;
  }

  const Native = window.RTCPeerConnection;
  if (Native) {
    class ProbedPeerConnection extends Native {
      constructor(...args) {
        super(...args);
        const peer = { created: now(), states: [], local_candidates: [], remote_sdp: null };
        probe.peers.push(peer);
        this.addEventListener('track', (e) => {
          if (e.track.kind === 'audio') tap(e.track, 'remote');
        });
        this.addEventListener('datachannel', (e) => watchChannel(e.channel));
        this.addEventListener('connectionstatechange', () => {
          peer.states.push([now(), this.connectionState]);
        });
        this.addEventListener('icecandidate', (e) => {
          if (e.candidate) peer.local_candidates.push(e.candidate.candidate);
        });
        this.__peer = peer;
        // RTP and ICE counters, sampled while the connection lives (a closed one has none).
        const timer = setInterval(async () => {
          if (this.connectionState === 'closed') { clearInterval(timer); return; }
          try { peer.stats = summarize(await this.getStats()); } catch (e) { /* closing */ }
        }, 500);
      }
      createDataChannel(...args) {
        const channel = super.createDataChannel(...args);
        watchChannel(channel);
        return channel;
      }
      async setRemoteDescription(desc) {
        if (desc && desc.sdp) this.__peer.remote_sdp = desc.sdp;
        return super.setRemoteDescription(desc);
      }
    }
    window.RTCPeerConnection = ProbedPeerConnection;
  }

  const devices = navigator.mediaDevices;
  if (devices && devices.getUserMedia) {
    const gum = devices.getUserMedia.bind(devices);
    devices.getUserMedia = async (constraints) => {
      const asked = now();
      const stream = await gum(constraints);
      probe.getUserMedia.push({ asked, opened: now() });
      for (const track of stream.getAudioTracks()) tap(track, 'mic');
      return stream;
    };
  }

  probe.snapshot = () => JSON.parse(JSON.stringify({
    threshold: probe.threshold, taps: probe.taps, events: probe.events, peers: probe.peers,
    getUserMedia: probe.getUserMedia, errors: probe.errors,
    audio_context: ctx ? ctx.state : null, now: now(),
  }));
})();
"""


@contextlib.contextmanager
def chromium_page(fake_mic: FakeMic | None = None, *, probe: bool = True,
                  console: list[str] | None = None) -> Iterator[Any]:
    """A Playwright page in headless Chromium (``CHROMIUM``), with ``PROBE_JS`` installed
    and console messages and page errors appended to ``console``. Sync API: the scenario runs
    in its own process, nothing else shares its loop."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=chromium_args(fake_mic))
        try:
            page = browser.new_page()
            if console is not None:
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            if probe:
                page.add_init_script(PROBE_JS)
            yield page
        finally:
            browser.close()


def probe_snapshot(page: Any) -> dict[str, Any]:
    snap: dict[str, Any] = page.evaluate("() => window.__cascadeProbe.snapshot()")
    return snap


# --- a static site --------------------------------------------------------------------------


class StaticSite:
    """Serves fixed files (path -> (bytes, content type)) on a free loopback port from a
    thread, like the application backend that hosts a page. ``url`` is its origin."""

    def __init__(self, files: dict[str, tuple[bytes, str]]) -> None:
        site_files = files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = site_files.get(self.path.split("?", 1)[0])
                if found is None:
                    self.send_error(404)
                    return
                body, content_type = found
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> StaticSite:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- the namespace runner -----------------------------------------------------------------


class NetnsRun(BaseModel):
    """What one namespace run gave back: the scenario's result and the runner's output."""

    result: dict[str, Any]
    seconds: float
    output: str


def run_in_netns(target: str, config: dict[str, Any], *, timeout_s: float = 240.0) -> NetnsRun:
    """Run the scenario ``target`` ("package.module:function") in a fresh loopback-only
    network namespace (and PID namespace) and return its result. Raises with the runner's
    output when it fails or overruns: killing ``unshare`` ends everything inside."""
    require_browser_tools()
    with tempfile.TemporaryDirectory(prefix="cascade-browser-") as tmp:
        work = Path(tmp)
        config_path, result_path = work / "config.json", work / "result.json"
        config_path.write_text(json.dumps(config))
        cmd = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "--",
               "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
               sys.executable, "-m", "tests.support.browser", target, str(config_path),
               str(result_path)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        start = time.monotonic()
        log_path = work / "runner.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()  # unshare --kill-child: the namespace's init dies, then all of it
                proc.wait()
                code = None
        seconds = time.monotonic() - start
        output = log_path.read_text(errors="replace")
        if code is None:
            raise RuntimeError(f"browser run {target} overran {timeout_s:.0f} s:\n"
                               f"{output[-8000:]}")
        if code != 0 or not result_path.exists():
            raise RuntimeError(f"browser run {target} failed (exit {code}):\n{output[-8000:]}")
        return NetnsRun(result=json.loads(result_path.read_text()), seconds=seconds,
                        output=output)


def assert_isolated() -> list[str]:
    """Inside the runner: only loopback exists and nothing else is reachable."""
    links = sorted(name for _, name in socket.if_nameindex())  # this namespace's, not /sys
    if links != ["lo"]:
        raise RuntimeError(f"not in a loopback-only network namespace: interfaces {links}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: routable only if a route exists
        except OSError:
            pass
        else:
            raise RuntimeError("a non-loopback address is routable inside the namespace")
    return links


def _main(argv: list[str]) -> int:
    target, config_path, result_path = argv
    # As the namespace's init, this process gets no default signal actions: make SIGTERM
    # end it through the normal path, so the scenario's cleanup (finally blocks) runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    assert_isolated()
    module_name, _, func_name = target.partition(":")
    scenario: Scenario = getattr(importlib.import_module(module_name), func_name)
    config = json.loads(Path(config_path).read_text())
    with tempfile.TemporaryDirectory(prefix="cascade-scenario-") as work:
        result = scenario(config, Path(work))
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
