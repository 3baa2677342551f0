"""The demo page against the real ``cascade serve``, driven in headless Chromium: the
scenario that runs inside the loopback-only namespace (tests/support/browser.py) for
tests/browser/test_demo_page.py, and the microphone it speaks through.

Why a microphone of our own: Chromium's fake capture device plays its WAV on its own
schedule, from when the page opens the device. A barge-in has to land while the reply
is playing, which only the running conversation can tell. ``TEST_MIC_JS`` therefore
replaces ``getUserMedia`` with a WebAudio ``MediaStreamAudioDestinationNode``: silence
until the test plays a clip into it (``testMic.play('story')``, or ``playAt`` on the
page's clock), then piper speech. The page does not know: it gets an ordinary audio
``MediaStream``, adds its track to the ``RTCPeerConnection``, and Chromium encodes it to
Opus and sends it over the real WebRTC path, like a microphone.

The same init script records what the checks need and the page does not keep: the page's
state over time (``cascadeDemo.state``, the live transcript line, the voice-to-voice
figure), the page's own remote level (``cascadeDemo.remoteLevel()``) and the transcript
deltas of the data channel with their text (``PROBE_JS`` keeps the other events whole).
It is installed before ``PROBE_JS``, so the probe taps the test microphone as well.

The scenario returns the raw record (page state, probe, marks, the server's log); the test
module turns it into figures and assertions. A step that times out ends the scenario with
``failed_step`` set, and the record up to then, so a failure shows the event sequence.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tests.browser.demo_figures import figures
from tests.support.browser import PROBE_JS, chromium_page, probe_snapshot

KEY = "sk-demo-page-test"
MIC_RATE = 48_000

# What the user says, in order. The story asks for a reply long enough to talk over.
QUESTION = "What is the capital of France?"
STORY = "Tell me a long story about a dragon."
STOP = "Stop, please."
FOLLOW_UP = "What is the capital of Italy?"
# The interruption starts this long after the story's audio started, once the page hears it.
INTERRUPT_AFTER_MS = 1500
AUDIBLE = 0.01  # RMS of full scale, as PROBE_JS: speech is ~0.05-0.3, silence < 0.003

TEST_MIC_JS = r"""
(() => {
  if (window.testMic) return;
  const now = () => Math.round(performance.now());
  const mic = {
    clips: {}, plays: [], opened: [], states: [], live: [], v2v: [], deltas: [],
    remote: [], errors: [],
  };
  window.testMic = mic;
  let ctx = null, dest = null;

  // One AudioContext; a fresh destination whenever the page stopped the last one's track
  // (hang-up), so a later getUserMedia gets a live track again.
  function graph() {
    if (!ctx) ctx = new AudioContext({ sampleRate: 48000 });
    if (!dest || dest.stream.getAudioTracks()[0].readyState === 'ended') {
      dest = ctx.createMediaStreamDestination();
      // A destination with nothing connected delivers no audio at all (Chromium then
      // sends no RTP), where a microphone delivers silence: keep a silent source on it.
      const silence = ctx.createConstantSource();
      silence.offset.value = 0;
      silence.connect(dest);
      silence.start();
    }
    if (ctx.state !== 'running') ctx.resume().catch(() => {});
    return ctx;
  }

  // A clip: mono little-endian pcm16, base64.
  mic.load = (name, b64, rate) => {
    const bin = atob(b64);
    const data = new Float32Array(bin.length >> 1);
    for (let i = 0; i < data.length; i++) {
      let v = bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8);
      if (v >= 32768) v -= 65536;
      data[i] = v / 32768;
    }
    mic.clips[name] = { data, rate };
    return data.length / rate;
  };

  mic.play = (name) => {
    const c = graph();
    const clip = mic.clips[name];
    const buffer = c.createBuffer(1, clip.data.length, clip.rate);
    buffer.copyToChannel(clip.data, 0);
    const source = c.createBufferSource();
    source.buffer = buffer;
    source.connect(dest);
    const play = { name, t: now(), duration_ms: Math.round(buffer.duration * 1000),
                   ended: null };
    source.onended = () => { play.ended = now(); };
    source.start();
    mic.plays.push(play);
    return play.t;
  };

  // Play at a time of the page's clock (performance.now()), e.g. 1.5 s after the reply's
  // audio started: no round trip to the test in between.
  mic.playAt = (name, at) => {
    setTimeout(() => {
      try { mic.play(name); } catch (e) { mic.errors.push(`play ${name}: ${e}`); }
    }, Math.max(0, at - performance.now()));
  };

  // Talk over the reply: the first moment from ``notBefore`` on that the page hears the
  // reply (its own level of the remote track), so the cut lands in speech rather than in
  // a pause between two synthesized sentences.
  mic.playWhenAudible = (name, notBefore, threshold) => {
    const timer = setInterval(() => {
      const demo = window.cascadeDemo;
      if (performance.now() < notBefore || !demo || demo.remoteLevel() < threshold) return;
      clearInterval(timer);
      try { mic.play(name); } catch (e) { mic.errors.push(`play ${name}: ${e}`); }
    }, 5);
  };

  const devices = navigator.mediaDevices;
  if (devices) {
    devices.getUserMedia = async (constraints) => {
      if (!constraints || !constraints.audio) {
        throw new DOMException('the test microphone is audio only', 'NotSupportedError');
      }
      const c = graph();
      await c.resume();
      mic.opened.push(now());
      return dest.stream;
    };
  } else {
    mic.errors.push('no navigator.mediaDevices (not a secure context?)');
  }

  // Transcript deltas with their text (the probe keeps only their type).
  const create = RTCPeerConnection.prototype.createDataChannel;
  RTCPeerConnection.prototype.createDataChannel = function (...args) {
    const channel = create.apply(this, args);
    channel.addEventListener('message', (e) => {
      try {
        const event = JSON.parse(e.data);
        if (typeof event.type === 'string' && event.type.endsWith('.delta')
            && typeof event.delta === 'string') {
          mic.deltas.push({ t: now(), type: event.type, item_id: event.item_id ?? null,
                            response_id: event.response_id ?? null, delta: event.delta });
        }
      } catch { /* not JSON */ }
    });
    return channel;
  };

  // What the page shows, as it changes, and its own level of the remote audio.
  const changed = (list, value) => {
    if (list.length === 0 || list[list.length - 1][1] !== value) list.push([now(), value]);
  };
  let observed = false;
  setInterval(() => {
    const demo = window.cascadeDemo;
    if (!demo) return;
    changed(mic.states, demo.state);
    const live = document.getElementById('user-live');
    if (live && !observed) {  // every change of the live line, even one shown briefly
      observed = true;
      const record = () => changed(mic.live,
                                   live.dataset.active === 'true' ? live.textContent : null);
      new MutationObserver(record).observe(live, { childList: true, characterData: true,
                                                   subtree: true, attributes: true });
      record();
    }
    const v2v = document.getElementById('v2v');
    if (v2v) changed(mic.v2v, v2v.textContent);
    try {
      const level = demo.remoteLevel();
      mic.remote.push([now(), Math.round(level * 10000) / 10000]);
    } catch (e) { /* no remote track yet */ }
  }, 20);

  mic.snapshot = () => JSON.parse(JSON.stringify({
    plays: mic.plays, opened: mic.opened, states: mic.states, live: mic.live, v2v: mic.v2v,
    deltas: mic.deltas, remote: mic.remote, errors: mic.errors,
  }));
})();
"""

# What the page shows, read from its DOM and state (no eval: the page's CSP forbids it,
# so everything goes through page.evaluate, which runs outside the page's policy).
PAGE_STATE_JS = r"""
() => {
  const d = window.cascadeDemo;
  const text = (el) => (el ? el.textContent.trim() : null);
  return {
    state: d.state, callId: d.callId, session: d.session, turns: d.turns, events: d.events,
    status: text(document.getElementById('status')),
    v2v: text(document.getElementById('v2v')),
    latency: [...document.querySelectorAll('#latency li')].map((li) => ({
      response_id: li.dataset.responseId, text: text(li),
      total: text(li.querySelector('strong')) })),
    log: [...document.querySelectorAll('#log li')].map((li) => ({
      role: li.classList.contains('user') ? 'user' : 'assistant',
      item_id: li.dataset.itemId || null, interrupted: li.dataset.interrupted === 'true',
      text: text(li.querySelector('.text')), meta: text(li.querySelector('.meta')) })),
    notice: text(document.getElementById('notice')),
    now: Math.round(performance.now()),
  };
}
"""


class Clip(BaseModel):
    """One thing the user says: piper speech at 48 kHz, and its voiced span (the bench's
    definition of where speech starts and ends, benchmarks.v2v.corpus.voiced_span)."""

    name: str
    text: str
    seconds: float
    voiced_start_ms: float
    voiced_end_ms: float


def make_clip(name: str, text: str) -> tuple[Clip, str]:
    """The clip and its samples as base64 little-endian pcm16 (for ``testMic.load``)."""
    from benchmarks.v2v.corpus import voiced_span
    from tests.support.speech import piper_clip

    samples = piper_clip(text, MIC_RATE)
    start, end = voiced_span(samples, MIC_RATE)
    clip = Clip(name=name, text=text, seconds=len(samples) / MIC_RATE,
                voiced_start_ms=start * 1000 / MIC_RATE, voiced_end_ms=end * 1000 / MIC_RATE)
    return clip, base64.b64encode(samples.astype("<i2").tobytes()).decode("ascii")


class StepTimeout(Exception):
    """A step of the scenario did not see what it waited for (the record says why)."""


class DemoPage:
    """The page under test, polled from Python (page.evaluate: the page's CSP forbids
    the eval Playwright's string predicates need). Times are the page's clock in ms."""

    def __init__(self, page: Any, deadline: float = float("inf")) -> None:
        self.page = page
        self.deadline = deadline  # time.monotonic() by which every wait gives up

    def now(self) -> int:
        value: int = self.page.evaluate("() => Math.round(performance.now())")
        return value

    def state(self) -> dict[str, Any]:
        result: dict[str, Any] = self.page.evaluate(PAGE_STATE_JS)
        return result

    def received(self, after: int = 0) -> list[dict[str, Any]]:
        """Server events on the data channel since ``after`` (deltas as type only)."""
        events: list[dict[str, Any]] = self.page.evaluate(
            "after => window.__cascadeProbe.events.filter("
            "e => e.dir === 'in' && e.t > after)", after)
        return events

    def first(self, event_type: str, after: int = 0,
              where: Callable[[dict[str, Any]], bool] = lambda e: True) -> dict[str, Any] | None:
        for e in self.received(after):
            if e["type"] == event_type and where(e.get("event") or {}):
                return e
        return None

    def wait(self, step: str, check: Callable[[], Any], timeout_s: float) -> Any:
        """Poll ``check`` until it returns something truthy; StepTimeout after
        ``timeout_s`` (generous: the machine is shared, and only correctness is checked)."""
        deadline = min(time.monotonic() + timeout_s, self.deadline)
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise StepTimeout(f"{step}: not seen within {timeout_s:.0f} s "
                                  "(or by the scenario's deadline)")
            time.sleep(0.1)

    def wait_event(self, step: str, event_type: str, after: int, timeout_s: float,
                   where: Callable[[dict[str, Any]], bool] = lambda e: True) -> dict[str, Any]:
        found: dict[str, Any] = self.wait(
            f"{step} ({event_type})", lambda: self.first(event_type, after, where), timeout_s)
        return found


def _response_of(event: dict[str, Any]) -> str | None:
    """The response id an event belongs to."""
    inner = event.get("event") or {}
    if "response" in inner and isinstance(inner["response"], dict):
        found: str | None = inner["response"].get("id")
        return found
    rid: str | None = inner.get("response_id")
    return rid


def of_response(response_id: str | None) -> Callable[[dict[str, Any]], bool]:
    """A filter for the events of one response (``response_id`` or ``response.id``)."""
    def match(event: dict[str, Any]) -> bool:
        rid = event.get("response_id") or (event.get("response") or {}).get("id")
        return bool(rid == response_id)
    return match


def spoken_turn(page: DemoPage, clip: str, step: str, marks: dict[str, Any],
                timeout_s: float) -> dict[str, Any]:
    """Say ``clip`` and wait until its reply has played out: the response the server
    started after the user's speech stopped, its ``output_audio_buffer.stopped`` (all its
    audio went out) and its ``cascade.turn.timings``. Returns the marks of this turn."""
    turn: dict[str, Any] = {"clip": clip}
    marks[step] = turn
    turn["played"] = page.page.evaluate("name => window.testMic.play(name)", clip)
    stopped = page.wait_event(step, "input_audio_buffer.speech_stopped", turn["played"],
                              timeout_s)
    turn["speech_stopped"] = stopped["t"]
    created = page.wait_event(step, "response.created", stopped["t"] - 1, timeout_s)
    turn["response_id"] = response_id = _response_of(created)
    this_response = of_response(response_id)
    turn["audio_started"] = page.wait_event(step, "output_audio_buffer.started",
                                            created["t"] - 1, timeout_s, this_response)["t"]
    turn["audio_stopped"] = page.wait_event(step, "output_audio_buffer.stopped",
                                            created["t"] - 1, timeout_s, this_response)["t"]
    turn["timings"] = page.wait_event(step, "cascade.turn.timings", created["t"] - 1,
                                      timeout_s, this_response)["t"]
    return turn


def demo_page_scenario(config: dict[str, Any], work: Path) -> dict[str, Any]:
    """Runs inside the namespace: ``cascade serve`` (embedded CPU models) with its demo
    page at ``/``, and Chromium driving that page through a conversation: a question, a
    story talked over (barge-in), the call hung up by the server (the page reconnects and
    resumes the session), and a follow-up question on the new call."""
    import httpx

    from orchestrator.launcher import CascadeProcess

    turn_s = float(config.get("turn_timeout_s", 120))
    # Every wait ends by then, so the record comes back before the runner's own timeout.
    deadline = time.monotonic() + float(config.get("budget_s", 420))
    console: list[str] = []
    marks: dict[str, Any] = {}
    result: dict[str, Any] = {"console": console, "marks": marks, "failed_step": None}
    os.environ["CASCADE_ICE_HOST_ADDRESSES"] = json.dumps(["127.0.0.1"])
    started = time.monotonic()
    server = CascadeProcess("serve", ["serve"], "--api-key", KEY)
    try:
        # Synthesize while the server loads its models.
        clips: dict[str, str] = {}
        result["clips"] = {}
        for name, text in (("question", QUESTION), ("story", STORY), ("stop", STOP),
                           ("follow_up", FOLLOW_UP)):
            clip, clips[name] = make_clip(name, text)
            result["clips"][name] = clip.model_dump()
        url = server.wait_ready(240)
        result["server_ready_s"] = round(time.monotonic() - started, 1)
        with chromium_page(None, probe=False, console=console) as raw:
            raw.add_init_script(TEST_MIC_JS)  # first: the probe wraps its getUserMedia
            raw.add_init_script(PROBE_JS)
            page = DemoPage(raw, deadline)
            try:
                _conversation(page, raw, url, clips, marks, turn_s, httpx)
            except StepTimeout as exc:
                result["failed_step"] = str(exc)
            except Exception as exc:  # the browser or the page broke: report, with the record
                result["failed_step"] = f"{type(exc).__name__}: {exc}"
            reads: dict[str, Callable[[], Any]] = {
                "page": page.state, "probe": lambda: probe_snapshot(raw),
                "mic": lambda: raw.evaluate("() => window.testMic.snapshot()")}
            for name, read in reads.items():
                try:
                    result[name] = read()
                except Exception as exc:
                    result[f"{name}_error"] = repr(exc)
    finally:
        result["server_log"] = server.log_tail(120)
        server.stop()
    try:
        result["figures"] = figures(result)
    except Exception as exc:  # a record too broken to measure: the test reports it
        result["figures_error"] = repr(exc)
    return result


def _conversation(page: DemoPage, raw: Any, url: str, clips: dict[str, str],
                  marks: dict[str, Any], turn_s: float, httpx: Any) -> None:
    # 1. Open the page as the README says (a loopback origin; as 127.0.0.1, since the
    # shared Chromium flags resolve no name, localhost included), connect.
    raw.goto(f"{url}/")
    for name, b64 in clips.items():
        raw.evaluate("([name, b64, rate]) => window.testMic.load(name, b64, rate)",
                     [name, b64, MIC_RATE])
    marks["click"] = page.now()
    raw.click("#connect")
    page.wait("connect", lambda: page.state()["state"] == "connected", 60)
    marks["connected"] = page.now()
    page.wait_event("connect", "session.created", 0, 30)
    page.wait_event("connect", "session.updated", 0, 30)

    # 2. A question, answered.
    spoken_turn(page, "question", "question", marks, turn_s)

    # 3. Barge-in: 1.5 s into the story's audio, the user talks over it.
    story: dict[str, Any] = {"clip": "story"}
    marks["story"] = story
    story["played"] = raw.evaluate("name => window.testMic.play(name)", "story")
    created = page.wait_event("story", "response.created", story["played"], turn_s)
    story["response_id"] = response_id = _response_of(created)
    of_story = of_response(response_id)
    audio = page.wait_event("story", "output_audio_buffer.started", created["t"] - 1, turn_s,
                            of_story)
    story["audio_started"] = audio["t"]
    story["interrupt_not_before"] = audio["t"] + INTERRUPT_AFTER_MS
    raw.evaluate("([name, at, level]) => window.testMic.playWhenAudible(name, at, level)",
                 ["stop", story["interrupt_not_before"], AUDIBLE])
    story["cleared"] = page.wait_event("barge-in", "output_audio_buffer.cleared", audio["t"],
                                       turn_s, of_story)["t"]
    story["truncated"] = page.wait_event("barge-in", "conversation.item.truncated",
                                         audio["t"], turn_s)["t"]
    story["done"] = page.wait_event("barge-in", "response.done", audio["t"], turn_s,
                                    of_story)["t"]
    # The interruption is a turn of its own; let its reply play out before going on.
    stop: dict[str, Any] = {"clip": "stop"}
    marks["stop"] = stop
    stop_created = page.wait_event("stop", "response.created", story["done"], turn_s)
    stop["response_id"] = stop_id = _response_of(stop_created)
    page.wait_event("stop", "response.done", stop_created["t"] - 1, turn_s,
                    of_response(stop_id))
    stop["done"] = page.wait(
        "stop (output_audio_buffer.stopped or never started)",
        lambda: _played_out(page, stop_id, stop_created["t"]), turn_s)

    # 4. The server ends the call; the page reconnects on its own and resumes.
    state = page.state()
    hang: dict[str, Any] = {"call_id": state["callId"], "session_id": state["session"]["id"]}
    marks["hangup"] = hang
    hang["t"] = page.now()
    response = httpx.post(f"{url}/v1/realtime/calls/{state['callId']}/hangup",
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    hang["status"] = response.status_code
    page.wait("reconnecting", lambda: _state_since(page, "reconnecting", hang["t"]), 30)
    page.wait("reconnected", lambda: _state_since(page, "connected", hang["t"]), 60)
    hang["reconnected"] = page.now()
    created_again = page.wait_event("reconnect", "session.created", hang["t"], 30)
    hang["session_created"] = created_again["t"]
    hang["new_call_id"] = page.state()["callId"]

    # 5. The conversation goes on over the new call.
    spoken_turn(page, "follow_up", "follow_up", marks, turn_s)
    marks["calls"] = call_metrics(httpx.get(f"{url}/metrics", timeout=10).text)


def call_metrics(text: str) -> dict[str, float]:
    """The server's WebRTC call gauges from /metrics: live calls, ended calls by reason."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("cascade_webrtc_calls ", "cascade_webrtc_calls_ended_total{")):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _played_out(page: DemoPage, response_id: str | None, after: int) -> int | None:
    """When a response's audio ended (``stopped``, or ``cleared``); for a response done
    without any audio, when it was done."""
    for e in page.received(after - 1):
        if _response_of(e) != response_id:
            continue
        if e["type"] in ("output_audio_buffer.stopped", "output_audio_buffer.cleared"):
            return int(e["t"])
    done = page.first("response.done", after - 1, of_response(response_id))
    started = page.first("output_audio_buffer.started", after - 1, of_response(response_id))
    if done is not None and started is None:
        return int(done["t"])
    return None


def _state_since(page: DemoPage, state: str, since: int) -> bool:
    states: list[list[Any]] = page.page.evaluate("() => window.testMic.states")
    return any(t >= since and s == state for t, s in states)
