"""Hostile input: property-based fuzzing (hypothesis) of every API against live servers.

``python -m benchmarks.reliability fuzz [--quick]``. It starts, on loopback, ``cascade
serve`` (the embedded CPU default, with an API key) and the three stage services, then
replays generated inputs (``fuzz_cases``) at each of them:

- the Realtime WebSocket: every client event type, valid, broken and with junk inside,
  raw frames (not JSON, not an object, binary garbage, deep nesting, frames at and over
  ``max_event_bytes``), judged frame by frame (``fuzz_realtime``), while a bystander
  session on the same server keeps working and finally gets a real reply;
- the orchestrator's HTTP APIs: client secrets, WebRTC offers (malformed SDP, bad
  multipart and JSON bodies) and a call's sideband WebSocket;
- the stage services: ASR and TTS WebSocket streams, the LLM's chat completions, and
  the HTTP endpoints of all three (``fuzz_stages``).

A row per target passes when every input was answered (an error, a reply, or a clean
close), nothing crashed (process alive, /healthz 200, no traceback in its log, no 5xx,
no dropped connection) and the bystander kept working.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from benchmarks.reliability import fuzz_http, fuzz_stages
from benchmarks.reliability.fuzz_cases import REALTIME_CASES, Case, generate, huge_frames
from benchmarks.reliability.fuzz_oracle import Tally, alive, log_crashes
from benchmarks.reliability.fuzz_realtime import Bystander, fuzz_session, realtime_connect
from benchmarks.reliability.rows import Row
from orchestrator.launcher import CascadeProcess, StageProcess

API_KEY = "sk-fuzz"
COMMAND = "python -m benchmarks.reliability fuzz"
SHARDS = 4  # concurrent fuzzing sessions on the Realtime WebSocket
MAX_EVENT_BYTES = 15 * 1024 * 1024  # the server's default (ServeSettings.max_event_bytes)


# What fuzzing found and what was fixed: (target, input, symptom before the fix, fix).
# Each fix has a regression test next to its module's tests.
FINDINGS: tuple[tuple[str, str, str, str], ...] = (
    ("realtime", "an event nested 1000+ levels deep",
     "RecursionError: a server_error event and a traceback",
     "stages/common/jsontext.strict_loads: invalid_json"),
    ("realtime", "a lone surrogate escape (\\ud800) in any string",
     "text no UTF-8 encoder accepts (store, echo, LLM)", "strict_loads: invalid_json"),
    ("realtime", "beta session/response fields beside a non-object audio ({voice, audio: 5})",
     "TypeError in the beta-to-GA rewrite: server_error", "invalid_type error (protocol)"),
    ("realtime", "a content part whose type is a list",
     "TypeError (unhashable) in the beta content rewrite: server_error", "invalid_value"),
    ("secrets", "a session config holding a lone surrogate",
     "HTTP 500 (UnicodeEncodeError in the store codec), connection dropped",
     "strict_loads: 400 invalid_json"),
    ("offers", "a JSON offer whose sdp holds a lone surrogate",
     "HTTP 500 (UnicodeEncodeError in check_offer)", "strict_loads: 400 invalid_json"),
    ("offers", "an offer whose BUNDLE group names a missing section, or whose audio "
     "section has no direction", "aiortc failed answering it: HTTP 500 and a traceback",
     "peer.check_offer refuses both: 400 invalid_offer"),
    ("realtime", "session.update with \"audio\": null (or instructions, tools... null)",
     "AttributeError in apply_update: server_error (a 500 for client secrets)",
     "a null the session cannot hold counts as absent"),
    ("asr", "a control message nested 1000+ levels deep",
     "the stream ended silently (RecursionError)", "strict_loads: malformed_json error"),
    ("tts", "a message nested 1000+ levels deep",
     "connection dropped without a close frame (RecursionError)",
     "strict_loads: malformed_json error"),
    ("llm", "a chat completions body nested 1000+ levels deep", "HTTP 500 (RecursionError)",
     "strict_loads: 400 invalid_json"),
)


def _findings(target: str) -> tuple[int, str]:
    found = [f for f in FINDINGS if f[0] == target]
    text = "; ".join(f"{what} -> was: {symptom}; now: {fix}" for _, what, symptom, fix in found)
    return len(found), (f"fixed findings: {text}" if found else "")


def counts(quick: bool) -> dict[str, int]:
    """Inputs per target: the full run sends >= 10 000 Realtime events."""
    if quick:
        return {"realtime": 300, "sideband": 50, "http": 100, "sdp": 50, "stage": 100}
    return {"realtime": 10_000, "sideband": 500, "http": 1500, "sdp": 500, "stage": 1500}


def _ws(url: str) -> str:
    return "ws" + url.removeprefix("http")


class _Feed:
    """Realtime cases drawn chunk by chunk in a thread while they are being sent (the
    full run's 10 000 take minutes to draw); the huge frames come first."""

    CHUNK = 100

    def __init__(self, n: int) -> None:
        self.queue: asyncio.Queue[Case | None] = asyncio.Queue()
        self.drawn = 0
        self.task = asyncio.create_task(self._produce(n))

    async def _produce(self, n: int) -> None:
        try:
            for case in huge_frames(MAX_EVENT_BYTES):
                self.queue.put_nowait(case)
                self.drawn += 1
            for chunk in range(-(-n // self.CHUNK)):
                size = min(self.CHUNK, n - chunk * self.CHUNK)
                cases = await asyncio.to_thread(generate, REALTIME_CASES, size, 100 + chunk)
                self.drawn += len(cases)
                for case in cases:
                    self.queue.put_nowait(case)
        finally:
            for _ in range(SHARDS):
                self.queue.put_nowait(None)

    async def cases(self) -> AsyncIterator[Case]:
        while (case := await self.queue.get()) is not None:
            yield case


async def _realtime(serve: CascadeProcess, feed: _Feed) -> tuple[Tally, Bystander]:
    tally = Tally("realtime")
    open_ = realtime_connect(_ws(serve.url), API_KEY)
    bystander = Bystander(open_)
    stop = asyncio.Event()
    watcher = asyncio.create_task(bystander.run(stop))
    try:
        await asyncio.gather(*(fuzz_session(open_, feed.cases(), tally, f"probe{i}_")
                               for i in range(SHARDS)))
        await feed.task
    finally:
        stop.set()
        await watcher
    tally.asked = feed.drawn
    return tally, bystander


def _row(name: str, tally: Tally, extra: list[str], key: str, note: str = "",
         figures: dict[str, Any] | None = None) -> Row:
    crashes = tally.crashes + extra
    fixed, fixed_note = _findings(key)
    note = " ".join(part for part in (note, fixed_note) if part)
    passed = not crashes and tally.events >= tally.asked > 0
    result = (f"{tally.events} inputs, {len(crashes)} crashes, {tally.errors} answered by "
              f"an error, {tally.clean_closes} clean closes")
    shown = "; ".join(crashes[:3])
    return Row(section="fuzz", name=name, result=result, passed=passed, command=COMMAND,
               figures={**tally.figures(), "crashes": len(crashes),
                        "first_crashes": crashes[:5], "findings_fixed": fixed,
                        **(figures or {})},
               note=(f"crashes: {shown}" if crashes else note))


async def _checked(procs: list[CascadeProcess]) -> dict[str, list[str]]:
    """Per process: why it is not healthy, plus tracebacks in its log."""
    out: dict[str, list[str]] = {}
    for proc in procs:
        why = await alive(proc)
        out[proc.name] = ([why] if why else []) + log_crashes(proc)
    return out


async def run(quick: bool) -> list[Row]:
    n = counts(quick)
    env_before = os.environ.get("CASCADE_WEBRTC_CONNECT_TIMEOUT_S")
    os.environ["CASCADE_WEBRTC_CONNECT_TIMEOUT_S"] = "3600"  # the sideband's call lives on
    serve = CascadeProcess("serve", ["serve"], "--api-key", API_KEY)
    stages = {name: StageProcess(name) for name in ("asr", "tts", "llm")}
    if env_before is None:
        del os.environ["CASCADE_WEBRTC_CONNECT_TIMEOUT_S"]
    else:
        os.environ["CASCADE_WEBRTC_CONNECT_TIMEOUT_S"] = env_before
    procs = [serve, *stages.values()]
    started = time.monotonic()
    try:
        # The inputs are drawn while the servers load their models.
        feed = _Feed(n["realtime"])
        http_inputs = await fuzz_http.prepare(n["http"], n["sdp"], n["sideband"])
        stage_inputs = await asyncio.to_thread(fuzz_stages.prepare, n["stage"])
        for proc in procs:
            await asyncio.to_thread(proc.wait_ready, 300.0)
        (realtime, bystander), http_tallies, stage_tallies = await asyncio.gather(
            _realtime(serve, feed),
            fuzz_http.run(serve.url, API_KEY, http_inputs),
            fuzz_stages.run({k: p.url for k, p in stages.items()}, stage_inputs))
        health = await _checked(procs)
    finally:
        for proc in procs:
            await asyncio.to_thread(proc.stop)
    seconds = round(time.monotonic() - started)
    rows = [_row("Realtime WebSocket: every client event type and raw frames", realtime,
                 bystander.failures, "realtime",
                 note=f"bystander session: {bystander.checks} checks passed, final reply "
                      f"{bystander.turn!r}",
                 figures={"bystander_checks": bystander.checks, "seconds": seconds})]
    notes = {"sideband": "The call's media never connects (the run sets "
                         "CASCADE_WEBRTC_CONNECT_TIMEOUT_S=3600 so it lives through the run)."}
    rows += [_row(f"orchestrator {tally.target}", tally, [], key, notes.get(key, ""))
             for tally, key in zip(http_tallies, ("secrets", "offers", "sideband"), strict=True)]
    rows += [_row(tally.target, tally, [], key) for tally, key in
             zip(stage_tallies, ("asr", "tts", "llm", "asr_http", "tts_http"), strict=True)]
    problems = [p for found in health.values() for p in found]
    rows.append(Row(
        section="fuzz", name="the four processes after fuzzing", passed=not problems,
        result=f"{sum(not found for found in health.values())}/{len(health)} alive with "
               f"/healthz 200 and no traceback in their logs",
        command=COMMAND, figures={"problems": problems[:10]},
        note="; ".join(problems[:3])))
    return rows
