"""Fuzzing the stage services: the ASR and TTS WebSocket streams (``/v1/stream``) and the
HTTP APIs of all three (LLM ``/v1/chat/completions`` and ``/v1/completions``, ASR
``/v1/audio/transcriptions``, TTS ``/v1/audio/speech``, ``/load``).

WebSocket frames are judged like the Realtime ones: each fuzzed frame is followed by a
probe whose error names a number only that probe carries (an odd-sized audio frame of a
unique length for ASR, a too-long text of a unique length for TTS), so the window
between them is what the server said about the frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from benchmarks.reliability.fuzz_cases import (
    JUNK,
    NASTY_TEXT,
    NOT_INT,
    NOT_STR,
    PLAIN_TEXT,
    Case,
    dumps,
    generate,
)
from benchmarks.reliability.fuzz_oracle import CLEAN_CLOSES, Tally, bad_error, bad_http, short
from benchmarks.reliability.fuzz_realtime import Closed

PROBE_S = 30.0
TTS_MAX_TEXT = 4096  # TtsSettings.max_text_chars (the probe is one char over, plus n)
STAGE_MAX_BYTES = 4 * 1024 * 1024  # StageSettings.max_message_bytes


@dataclass(frozen=True)
class Connect:
    """A stream opened with this query (``Case`` frames follow on it)."""

    query: str


def _json_junk(label: str, types: list[str]) -> st.SearchStrategy[Case]:
    """Frames that are not a valid control message of a stream."""
    return st.one_of(
        st.text(min_size=1, max_size=40).filter(_not_json).map(lambda t: Case(label, t, "error")),
        JUNK.filter(lambda j: not isinstance(j, dict)).map(
            lambda j: Case(label, dumps(j), "error")),
        st.builds(lambda t: Case(label, dumps({"type": t}), "error"),
                  st.one_of(NASTY_TEXT, NOT_STR).filter(lambda t: t not in types)),
        st.sampled_from([100, 1000, 100_000]).map(
            lambda d: Case(label, "[" * d + "]" * d, "error")),
    )


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


ASR_CASES: st.SearchStrategy[Case | Connect] = st.one_of(
    st.integers(0, 5000).map(lambda ms: Case("end_of_speech", dumps(
        {"type": "end_of_speech", "audio_ms": ms}), "ok")),
    st.integers(1, 20).map(lambda k: Case("audio", bytes(640 * k), "ok")),
    st.binary(min_size=1, max_size=2001).filter(lambda b: len(b) % 2 == 1).map(
        lambda b: Case("odd audio", b, "error")),
    st.builds(lambda v: Case("end_of_speech", dumps({"type": "end_of_speech", "audio_ms": v}),
                             "error"), NOT_INT),
    st.builds(lambda d: Case("junk", dumps({"type": "end_of_speech", **d}), "any"),
              st.dictionaries(st.text(max_size=5), JUNK, max_size=3)),
    _json_junk("control", ["finalize", "close", "end_of_speech"]),
    st.sampled_from([Case("finalize", dumps({"type": "finalize"}), "ok"),
                     Case("close", dumps({"type": "close"}), "ok")]),
    st.builds(lambda r: Connect(f"?sample_rate={quote(r)}"),
              st.one_of(st.sampled_from(["16000", "8000", "48000", "24000"]),
                        st.text(max_size=8), st.integers().map(str))),
    st.builds(lambda lang, prompt: Connect(f"?language={quote(lang)}&prompt={quote(prompt)}"),
              st.text("abcxyz%&=", max_size=5), st.text("abc %20", max_size=20)),
)

TTS_CASES: st.SearchStrategy[Case | Connect] = st.one_of(
    st.text("abc de.", min_size=1, max_size=12).map(
        lambda t: Case("text", dumps({"type": "text", "text": t}), "ok")),
    st.just(Case("flush", dumps({"type": "flush"}), "ok")),
    st.just(Case("cancel", dumps({"type": "cancel"}), "ok")),
    st.builds(lambda v: Case("text", dumps({"type": "text", "text": v}), "error"),
              NOT_STR.filter(lambda v: v is not None)),
    st.builds(lambda t: Case("text", dumps({"type": "text", "text": t}), "any"), NASTY_TEXT),
    st.builds(lambda d: Case("junk", dumps({"type": "text", **d}), "any"),
              st.dictionaries(st.text(max_size=5), JUNK, max_size=3)),
    st.binary(min_size=0, max_size=200).map(lambda b: Case("binary", b, "error")),
    _json_junk("control", ["text", "flush", "cancel"]),
    st.builds(lambda k, v: Connect(f"?{k}={quote(v)}"),
              st.sampled_from(["sample_rate", "encoding", "voice"]),
              st.one_of(st.text("abc019%", max_size=8), st.integers().map(str),
                        st.sampled_from(["24000", "16000", "pcm16", "0", "-1", "1e9"]))),
)


async def _recv_any(ws: ClientConnection, limit_s: float) -> dict[str, Any]:
    """The next JSON event (binary audio skipped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while True:
        try:
            raw = await asyncio.wait_for(ws.recv(), max(0.01, deadline - loop.time()))
        except ConnectionClosed as exc:
            raise Closed(None if exc.rcvd is None else exc.rcvd.code, "") from None
        if isinstance(raw, str):
            event: dict[str, Any] = json.loads(raw)
            return event


async def _until_probe(ws: ClientConnection, marker: str) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROBE_S
    seen: list[dict[str, Any]] = []
    while True:
        event = await _recv_any(ws, deadline - loop.time())
        if event.get("type") == "error" and marker in str(event.get("message")):
            return seen
        seen.append(event)


def _probe(stage: str, n: int) -> tuple[str | bytes, str]:
    """A frame refused with an error that only it can cause, and that error's marker."""
    if stage == "asr":
        size = 100_001 + 2 * n
        return bytes(size), f"({size})"
    size = TTS_MAX_TEXT + 1 + n
    return dumps({"type": "text", "text": "a" * size}), f"text of {size} chars"


class _Stream:
    """One stage stream being fuzzed; reopened (plain query) after a close."""

    def __init__(self, stage: str, base: str, tally: Tally) -> None:
        self.stage, self.base, self.tally = stage, base, tally
        self.ws: ClientConnection | None = None
        self.n = 0

    async def open(self, query: str) -> list[dict[str, Any]]:
        await self.close()
        self.ws = await connect(f"{self.base}/v1/stream{query}", max_size=None,
                                open_timeout=20, ping_interval=None, close_timeout=5)
        if self.stage == "tts":  # "ready", or an error before the close
            return [await _recv_any(self.ws, PROBE_S)]
        return []

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        self.ws = None

    async def exchange(self, frame: str | bytes | None, label: str
                       ) -> list[dict[str, Any]] | None:
        """Send ``frame`` (None: only the probe); the events before the probe's answer,
        or None when the stream closed (a crash unless the close was clean)."""
        assert self.ws is not None
        self.n += 1
        probe, marker = _probe(self.stage, self.n)
        try:
            if frame is not None:
                await self.ws.send(frame)
            await self.ws.send(probe)
            return await _until_probe(self.ws, marker)
        except (Closed, ConnectionClosed) as exc:
            code = exc.code if isinstance(exc, Closed) else (
                exc.rcvd.code if exc.rcvd is not None else None)
            if code in CLEAN_CLOSES:
                self.tally.clean_closes += 1
            else:
                self.tally.crash(f"{self.stage} stream dropped ({code}) after {label}", frame)
        except TimeoutError:
            self.tally.crash(f"{self.stage} stream stopped answering after {label}", frame)
        await self.close()
        return None


async def fuzz_stream(stage: str, base: str, cases: list[Case | Connect], tally: Tally
                      ) -> None:
    stream = _Stream(stage, base, tally)
    try:
        for case in cases:
            tally.events += 1
            try:
                if isinstance(case, Connect):  # fuzzed query: a refusal or a usable stream
                    first = await stream.open(case.query)
                    window = await stream.exchange(None, f"connect {case.query}")
                    if window is not None:
                        window = first + window
                    errors = [e for e in window or first if e.get("type") == "error"]
                    tally.errors += bool(errors)
                    why = next((w for w in map(bad_error, errors) if w), None)
                    if why is not None:
                        tally.crash(f"{stage} connect: {why}", case.query)
                    continue
                if stream.ws is None:
                    await stream.open("")
            except Closed as exc:
                if exc.code not in CLEAN_CLOSES:
                    tally.crash(f"{stage} connect dropped ({exc.code})", case)
                await stream.close()
                continue
            except (OSError, InvalidStatus, TimeoutError) as exc:
                tally.crash(f"{stage} connect failed: {exc!r}", case)
                await stream.close()
                continue
            window = await stream.exchange(case.frame, case.label)
            if window is None:
                continue
            errors = [e for e in window if e.get("type") == "error"]
            tally.errors += bool(errors)
            why = next((w for w in map(bad_error, errors) if w), None)
            if why is None and case.expect == "error" and not errors:
                why = "bad input not answered by an error"
            if why is None and case.expect == "ok" and errors:
                why = f"valid input refused: {errors[0]}"
            if why is not None:
                tally.crash(f"{stage} {case.label}/{case.expect}: {why}", case.frame)
    finally:
        await stream.close()


async def _huge_frame(stage: str, base: str, tally: Tally) -> None:
    """A frame over max_message_bytes: an error, then close 1009."""
    tally.events += 1
    ws = await connect(f"{base}/v1/stream", max_size=None, open_timeout=20,
                       ping_interval=None, close_timeout=5)
    try:
        if stage == "tts":
            await _recv_any(ws, PROBE_S)
        await ws.send(dumps({"type": "text", "text": "a" * (STAGE_MAX_BYTES + 10)}))
        event = await _recv_any(ws, PROBE_S)
        if event.get("type") != "error":
            tally.crash(f"{stage}: an oversized frame not refused", event)
        await _recv_any(ws, PROBE_S)
        tally.crash(f"{stage}: still open after an oversized frame", "")
    except Closed as exc:
        if exc.code == 1009:
            tally.clean_closes += 1
        else:
            tally.crash(f"{stage}: oversized frame closed with {exc.code}", "")
    finally:
        await ws.close()


# ------------------------------------------------------------------ HTTP
@dataclass(frozen=True)
class Http:
    method: str
    path: str
    body: bytes = b""
    content_type: str | None = None
    allowed: tuple[int, ...] = (200, 400, 413, 415, 422)


CHAT_VALID = st.fixed_dictionaries({
    "messages": st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["system", "user", "assistant"]), "content": PLAIN_TEXT}),
        min_size=1, max_size=3),
    "max_tokens": st.integers(1, 2),
}, optional={"stream": st.booleans(), "temperature": st.floats(0, 2),
             "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
             "stop": st.one_of(PLAIN_TEXT, st.lists(PLAIN_TEXT, max_size=2))})


def _chat(body: bytes, ctype: str | None = "application/json") -> Http:
    return Http("POST", "/v1/chat/completions", body, ctype, (200, 400, 413, 422, 429))


def _replace_one(d: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    return {**d, key: value}


LLM_HTTP = st.one_of(
    CHAT_VALID.map(lambda d: _chat(dumps(d).encode())),
    st.builds(lambda d, k, v: _chat(dumps(_replace_one(d, k, v)).encode()), CHAT_VALID,
              st.sampled_from(["messages", "max_tokens", "stream", "temperature", "tools",
                               "tool_choice", "stop", "n", "stream_options",
                               "max_completion_tokens", "prefill_only"]), JUNK)
    .filter(lambda h: json.loads(h.body).get("max_tokens") in (1, 2)),  # cheap to answer
    JUNK.map(lambda j: _chat(dumps(j).encode())),
    st.binary(max_size=300).map(lambda b: _chat(b, None)),
    st.sampled_from([100, 1000, 100_000]).map(lambda d: _chat(("[" * d + "]" * d).encode())),
    st.builds(lambda j: Http("POST", "/v1/completions", dumps(j).encode(), "application/json",
                             (404, 405)), JUNK),
    st.builds(lambda q: Http("GET", f"/load?{q}", allowed=(200,)), st.text("ab=&%", max_size=8)),
    st.just(Http("POST", "/load", b"{}", "application/json", (405,))),
    st.just(Http("GET", "/v1/models", allowed=(200,))),
)
SPEECH = st.dictionaries(st.sampled_from(["model", "input", "voice", "response_format",
                                          "speed", "stream_format", "instructions"]),
                         JUNK, max_size=4)
TTS_HTTP = st.one_of(
    SPEECH.map(lambda d: Http("POST", "/v1/audio/speech", dumps(d).encode(),
                              "application/json")),
    st.builds(lambda fmt, speed: Http("POST", "/v1/audio/speech", dumps(
        {"input": "Hi.", "response_format": fmt, "speed": speed}).encode(),
        "application/json"), st.sampled_from(["wav", "pcm", "mp3", ""]),
        st.one_of(st.floats(allow_nan=True), st.integers())),
    st.binary(max_size=200).map(lambda b: Http("POST", "/v1/audio/speech", b, None)),
    st.builds(lambda q: Http("GET", f"/load?{q}", allowed=(200,)), st.text("ab=&%", max_size=8)),
)


def _multipart(parts: list[tuple[str, bytes]]) -> Http:
    boundary = "fuzzb"
    body = b""
    for name, value in parts:
        filename = '; filename="a.wav"' if name == "file" else ""
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"{filename}"
                 "\r\n\r\n").encode() + value + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return Http("POST", "/v1/audio/transcriptions", body,
                f"multipart/form-data; boundary={boundary}")


ASR_HTTP = st.one_of(
    st.lists(st.tuples(st.sampled_from(["file", "model", "language", "response_format",
                                        "prompt", "x"]), st.binary(max_size=120)),
             max_size=4).map(_multipart),
    st.binary(max_size=300).map(lambda b: Http("POST", "/v1/audio/transcriptions", b,
                                                "multipart/form-data; boundary=zz")),
    st.binary(max_size=100).map(lambda b: Http("POST", "/v1/audio/transcriptions", b,
                                                "application/json")),
    st.just(b"RIFF\x24\x00\x00\x00WAVEfmt ").map(lambda b: _multipart([("file", b)])),
)


async def _http(base: str, requests: list[Http], tally: Tally) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        for req in requests:
            tally.events += 1
            headers = {} if req.content_type is None else {"Content-Type": req.content_type}
            try:
                async with http.stream(req.method, f"{base}{req.path}", content=req.body,
                                       headers=headers) as response:
                    body = await response.aread()
            except httpx.HTTPError as exc:
                tally.crash(f"{req.method} {req.path}: no answer ({type(exc).__name__})",
                            req.body)
                continue
            why = bad_http(response.status_code, body, req.allowed)
            if why is None and response.headers.get("content-type", "").startswith(
                    "text/event-stream") and not body.rstrip().endswith(b"data: [DONE]"):
                why = f"event stream not ended by [DONE]: {short(body[-200:])}"
            if why is not None:
                tally.crash(f"{req.method} {req.path}: {why}", req.body)
            elif response.status_code >= 400:
                tally.errors += 1


@dataclass(frozen=True)
class Inputs:
    asr: list[Case | Connect]
    tts: list[Case | Connect]
    llm_http: list[Http]
    asr_http: list[Http]
    tts_http: list[Http]


def prepare(n: int) -> Inputs:
    """``n`` frames for each stream and the LLM, half as many for the other HTTP APIs."""
    return Inputs(generate(ASR_CASES, n, 5), generate(TTS_CASES, n, 6),
                  generate(LLM_HTTP, n, 7), generate(ASR_HTTP, n // 2, 8),
                  generate(TTS_HTTP, n // 2, 9))


async def run(urls: dict[str, str], inputs: Inputs) -> list[Tally]:
    """Every stage target, concurrently."""
    asr_ws = Tally("asr WebSocket /v1/stream", len(inputs.asr) + 1)
    tts_ws = Tally("tts WebSocket /v1/stream", len(inputs.tts) + 1)
    llm_http = Tally("llm HTTP /v1/chat/completions, /v1/completions, /v1/models, /load",
                     len(inputs.llm_http))
    asr_http = Tally("asr HTTP /v1/audio/transcriptions, /load", len(inputs.asr_http))
    tts_http = Tally("tts HTTP /v1/audio/speech, /load", len(inputs.tts_http))
    asr_base = "ws" + urls["asr"].removeprefix("http")
    tts_base = "ws" + urls["tts"].removeprefix("http")

    async def asr() -> None:
        await fuzz_stream("asr", asr_base, inputs.asr, asr_ws)
        await _huge_frame("asr", asr_base, asr_ws)

    async def tts() -> None:
        await fuzz_stream("tts", tts_base, inputs.tts, tts_ws)
        await _huge_frame("tts", tts_base, tts_ws)

    await asyncio.gather(asr(), tts(), _http(urls["llm"], inputs.llm_http, llm_http),
                         _http(urls["asr"], inputs.asr_http, asr_http),
                         _http(urls["tts"], inputs.tts_http, tts_http))
    return [asr_ws, tts_ws, llm_http, asr_http, tts_http]
