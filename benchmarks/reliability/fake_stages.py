"""Timing-faithful fake ASR, LLM and TTS stages in one cheap process, for loading one
orchestrator far past what real models allow on a small machine.

``python -m benchmarks.reliability.fake_stages --port 9100`` serves, on three ports:

* ASR on ``port`` — ``WS /v1/stream`` exactly as ``stages.asr.client`` speaks it: binary
  pcm16 in; ``partial`` events every ``asr_partial_every_ms`` of audio received (after
  ``asr_partial_latency_ms``), and on ``finalize`` the ``final`` event after
  ``asr_final_latency_ms``, then close 1000. The transcript has ``asr_words_per_s`` words
  per second of audio received (at least one), from a fixed word list.
* LLM on ``port + 1`` — OpenAI-compatible ``POST /v1/chat/completions`` (SSE, as
  ``stages.llm.client`` and vLLM speak it) and ``GET /v1/models``: the first token after
  ``llm_ttft_ms``, then ``llm_tokens_per_s``; ``llm_reply_tokens`` words with a full stop
  every ``llm_sentence_tokens``. A primer (``X-Cascade-Prefill-Only``) answers after
  ``llm_prefill_ms`` with no text. A client that closes mid-body aborts the generation.
* TTS on ``port + 2`` — ``WS /v1/stream`` as ``stages.tts.client`` speaks it: a ``ready``
  event, then per phrase (text up to ``.!?`` and the whitespace after it, or the rest at a
  flush) a ``chunk`` header and its pcm16 audio, ``tts_ms_per_char`` of audio per
  character, synthesized in ``tts_first_chunk_ms`` (first phrase of a round) plus
  ``tts_rtf`` x its duration; ``done`` after a flush, ``cancelled`` after a cancel.

Each port also answers ``GET /healthz``, ``/readyz``, ``/load`` and ``/metrics`` (the
fake's own counters). The defaults resemble GPU stages (whisper on CUDA, vLLM, a fast
TTS); every figure is a flag or a ``CASCADE_FAKE_<NAME>`` environment variable. Audio is
generated once per sample rate and sliced: no numpy work per message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

log = logging.getLogger(__name__)

WORDS = ("hello", "could", "you", "tell", "me", "what", "the", "weather", "will", "be",
         "like", "tomorrow", "in", "the", "city", "and", "whether", "I", "need", "an",
         "umbrella", "for", "the", "walk", "to", "work")
REPLY = ("Sure", "the", "forecast", "says", "light", "rain", "in", "the", "morning",
         "and", "a", "dry", "afternoon", "so", "take", "a", "small", "umbrella", "with",
         "you", "just", "in", "case")
ENV_PREFIX = "CASCADE_FAKE_"


@dataclass(frozen=True)
class Timing:
    """The latency model (milliseconds unless named otherwise)."""

    asr_partial_every_ms: float = 320.0  # audio between two partials
    asr_partial_latency_ms: float = 30.0
    asr_final_latency_ms: float = 60.0
    asr_words_per_s: float = 2.5  # transcript words per second of audio
    llm_ttft_ms: float = 120.0
    llm_tokens_per_s: float = 60.0
    llm_reply_tokens: int = 20
    llm_sentence_tokens: int = 8  # a full stop after this many tokens
    llm_prefill_ms: float = 20.0
    tts_first_chunk_ms: float = 80.0
    tts_rtf: float = 0.05  # synthesis time / audio duration
    tts_ms_per_char: float = 60.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Timing:
        env = dict(os.environ) if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = int(raw) if f.type == "int" else float(raw)
        return cls(**values)


@dataclass
class Counters:
    asr_streams: int = 0
    asr_finals: int = 0
    asr_audio_s: float = 0.0
    llm_requests: int = 0
    llm_primers: int = 0
    llm_aborted: int = 0
    tts_streams: int = 0
    tts_chunks: int = 0
    tts_cancels: int = 0
    open_asr: int = 0
    open_tts: int = 0
    open_llm: int = 0

    def prometheus(self) -> str:
        return "".join(f"cascade_fake_{f.name} {getattr(self, f.name)}\n" for f in fields(self))


def _words(words: tuple[str, ...], n: int) -> list[str]:
    return [words[i % len(words)] for i in range(n)]


class AudioBank:
    """A few seconds of speech-like pcm16 per sample rate, made once and sliced."""

    SECONDS = 8

    def __init__(self) -> None:
        self._by_rate: dict[int, bytes] = {}

    def get(self, rate: int, ms: float) -> bytes:
        bank = self._by_rate.get(rate)
        if bank is None:
            bank = self._by_rate[rate] = _speech_like(rate, self.SECONDS)
        need = int(rate * ms / 1000) * 2
        if need <= len(bank):
            return bank[:need]
        return (bank * (need // len(bank) + 1))[:need]


def _speech_like(rate: int, seconds: int) -> bytes:
    """A voiced-sounding signal (a 130 Hz buzz with formant-ish partials, syllable-rate
    amplitude modulation), generated with the standard library once per rate."""
    n = rate * seconds
    out = bytearray(2 * n)
    for i in range(n):
        t = i / rate
        env = 0.55 + 0.45 * math.sin(2 * math.pi * 4.0 * t)
        v = (math.sin(2 * math.pi * 130 * t) + 0.5 * math.sin(2 * math.pi * 700 * t)
             + 0.3 * math.sin(2 * math.pi * 1200 * t))
        struct.pack_into("<h", out, 2 * i, int(6000 * env * v / 1.8))
    return bytes(out)


def _json_response(body: object, status: int = 200) -> Response:
    data = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"),
                       ("Content-Length", str(len(data)))])
    return Response(status, HTTPStatus(status).phrase, headers, data)


def _text_response(text: str) -> Response:
    data = text.encode()
    headers = Headers([("Content-Type", "text/plain; version=0.0.4"),
                       ("Content-Length", str(len(data)))])
    return Response(200, "OK", headers, data)


def _load(stage: str, active: int) -> dict[str, object]:
    return {"stage": stage, "ready": True, "active": active, "queued": 0,
            "capacity": 100_000, "busy": 0.0}


class FakeStages:
    """The three fake services on one event loop."""

    def __init__(self, timing: Timing) -> None:
        self.timing = timing
        self.counters = Counters()
        self.audio = AudioBank()
        self._servers: list[Server | asyncio.Server] = []
        self._llm_writers: set[asyncio.StreamWriter] = set()
        self.ports: tuple[int, int, int] = (0, 0, 0)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[int, int, int]:
        """Bind ASR, LLM, TTS on ``port``, ``port + 1``, ``port + 2`` (0: any free ports)."""
        self.audio.get(24_000, 0)  # the Realtime output rate, made before any stream waits
        asr = await serve(self._asr, host, port, process_request=self._http("asr"),
                          max_size=2**24, compression=None)
        llm = await asyncio.start_server(self._llm_connection, host, port + 1 if port else 0)
        tts = await serve(self._tts, host, port + 2 if port else 0,
                          process_request=self._http("tts"), max_size=2**24,
                          compression=None)
        self._servers = [asr, llm, tts]
        self.ports = (asr.sockets[0].getsockname()[1],
                      llm.sockets[0].getsockname()[1] if llm.sockets else 0,
                      tts.sockets[0].getsockname()[1])
        return self.ports

    def urls(self, host: str = "127.0.0.1") -> tuple[str, str, str]:
        return tuple(f"http://{host}:{p}" for p in self.ports)  # type: ignore[return-value]

    async def aclose(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._llm_writers):  # asyncio.Server.close leaves them open
            writer.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)

    def _http(self, stage: str) -> Callable[[ServerConnection, Request], Response | None]:
        def route(_conn: ServerConnection, request: Request) -> Response | None:
            path = urlsplit(request.path).path
            if path == "/v1/stream":
                return None
            if path == "/healthz":
                return _json_response({"status": "ok", "stage": stage})
            if path in ("/readyz", "/load"):
                active = self.counters.open_asr if stage == "asr" else self.counters.open_tts
                load = _load(stage, active)
                return _json_response(load if path == "/load" else
                                      {"status": "ready", "stage": stage, "load": load})
            if path == "/metrics":
                return _text_response(self.counters.prometheus())
            return _json_response({"error": {"message": "not found", "code": "not_found"}},
                                  404)
        return route

    # ------------------------------------------------------------------ ASR
    async def _asr(self, ws: ServerConnection) -> None:
        t = self.timing
        query = parse_qs(urlsplit(ws.request.path if ws.request else "").query)
        rate = int(query.get("sample_rate", ["16000"])[0])
        bytes_per_ms = rate * 2 / 1000.0
        c = self.counters
        c.asr_streams += 1
        c.open_asr += 1
        out = _Outbox(ws)
        received = 0
        next_partial = t.asr_partial_every_ms * bytes_per_ms
        revision = 0
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    received += len(message)
                    if received >= next_partial:
                        next_partial += t.asr_partial_every_ms * bytes_per_ms
                        revision += 1
                        audio_ms = received / bytes_per_ms
                        words = _words(WORDS, max(1, int(audio_ms / 1000 * t.asr_words_per_s)))
                        out.later(t.asr_partial_latency_ms, json.dumps({
                            "type": "partial", "stable": " ".join(words[:-1]),
                            "unstable": (" " if len(words) > 1 else "") + words[-1],
                            "audio_ms": int(audio_ms), "revision": revision}))
                    continue
                kind = json.loads(message).get("type")
                if kind == "finalize":
                    audio_ms = received / bytes_per_ms
                    c.asr_audio_s += audio_ms / 1000
                    c.asr_finals += 1
                    words = _words(WORDS, max(1, int(audio_ms / 1000 * t.asr_words_per_s)))
                    out.later(t.asr_final_latency_ms, json.dumps({
                        "type": "final", "text": " ".join(words), "words": [],
                        "audio_ms": int(audio_ms), "finalize_ms": t.asr_final_latency_ms}),
                        close=True)
                elif kind == "close":
                    break
        except ConnectionClosed:
            pass
        finally:
            c.open_asr -= 1
            await out.finish()

    # ------------------------------------------------------------------ TTS
    async def _tts(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path if ws.request else "").query)
        rate = int(query.get("sample_rate", ["24000"])[0])
        c = self.counters
        c.tts_streams += 1
        c.open_tts += 1
        stream = _TtsConnection(self, ws, rate)
        try:
            await ws.send(json.dumps({"type": "ready", "sample_rate": rate, "voice": "fake"}))
            async for message in ws:
                if isinstance(message, bytes):
                    continue
                event = json.loads(message)
                kind = event.get("type")
                if kind == "text":
                    stream.push(str(event.get("text", "")))
                elif kind == "flush":
                    stream.flush()
                elif kind == "cancel":
                    c.tts_cancels += 1
                    await stream.cancel()
        except ConnectionClosed:
            pass
        finally:
            c.open_tts -= 1
            stream.close()

    # ------------------------------------------------------------------ LLM
    async def _llm_connection(self, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        self._llm_writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines[1:] if line)}
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                path = urlsplit(target).path
                if method == "POST" and path == "/v1/chat/completions":
                    if not await self._completion(writer, body, headers):
                        break
                    continue
                writer.write(self._llm_get(path))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        except asyncio.CancelledError:
            # Shutdown cancels the handler mid-reply: end quietly (Python 3.11's stream
            # server logs a handler that ends cancelled as "Exception in callback").
            pass
        finally:
            self._llm_writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _llm_get(self, path: str) -> bytes:
        body: object
        status = 200
        if path == "/v1/models":
            body = {"object": "list", "data": [{"id": "fake", "object": "model",
                                                "owned_by": "cascade", "max_model_len": 8192}]}
        elif path == "/healthz" or path == "/health":
            body = {"status": "ok", "stage": "llm"}
        elif path in ("/readyz", "/load"):
            load = _load("llm", self.counters.open_llm)
            body = load if path == "/load" else {"status": "ready", "stage": "llm",
                                                   "load": load}
        elif path == "/metrics":
            text = self.counters.prometheus().encode()
            return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                    + str(len(text)).encode() + b"\r\n\r\n" + text)
        else:
            status, body = 404, {"error": {"message": "not found", "code": "not_found"}}
        data = json.dumps(body).encode()
        return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: "
                f"application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data

    async def _completion(self, writer: asyncio.StreamWriter, body: bytes,
                          headers: dict[str, str]) -> bool:
        """Stream one completion; False when the client went away mid-body."""
        t = self.timing
        c = self.counters
        primer = headers.get("x-cascade-prefill-only") == "1"
        request = json.loads(body or b"{}")
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in
                            request.get("messages", []) if isinstance(m, dict))
        limit = int(request.get("max_tokens") or t.llm_reply_tokens)
        n = 0 if primer else min(limit, t.llm_reply_tokens)
        c.llm_primers += primer
        c.llm_requests += not primer
        c.open_llm += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
        start = time.monotonic()
        try:
            if primer:
                await asyncio.sleep(t.llm_prefill_ms / 1000)
            for i in range(n):
                due = start + (t.llm_ttft_ms + i * 1000.0 / t.llm_tokens_per_s) / 1000
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if writer.transport.is_closing():
                    c.llm_aborted += 1
                    return False
                word = REPLY[i % len(REPLY)]
                stop = (i + 1) % t.llm_sentence_tokens == 0 or i == n - 1
                text = (" " if i else "") + word + ("." if stop else "")
                _chunk(writer, {"choices": [{"index": 0, "delta": {"content": text},
                                             "finish_reason": None}]})
                await writer.drain()
            _chunk(writer, {"choices": [{"index": 0, "delta": {},
                                         "finish_reason": "length" if primer else "stop"}]})
            _chunk(writer, {"choices": [], "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": n or 1,
                "total_tokens": prompt_tokens + (n or 1)}})
            data = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
            await writer.drain()
            return True
        except ConnectionError:
            c.llm_aborted += 1
            return False
        finally:
            c.open_llm -= 1


def _chunk(writer: asyncio.StreamWriter, event: dict[str, object]) -> None:
    event.update(id="chatcmpl-fake", object="chat.completion.chunk", created=0, model="fake")
    data = b"data: " + json.dumps(event).encode() + b"\n\n"
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))


class _Outbox:
    """Messages sent after a delay, in order (the delays of one stream never shrink)."""

    def __init__(self, ws: ServerConnection) -> None:
        self._ws = ws
        self._queue: deque[tuple[float, str, bool]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def later(self, delay_ms: float, message: str, close: bool = False) -> None:
        self._queue.append((time.monotonic() + delay_ms / 1000, message, close))
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                while not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                due, message, close = self._queue.popleft()
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._ws.send(message)
                if close:
                    await self._ws.close(1000)
                    return

    async def finish(self) -> None:
        """The connection ended: a pending final still goes out; then the task ends."""
        task = self._task
        if task is None:
            return
        if not self._queue or not self._queue[-1][2]:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 5)


class _TtsConnection:
    """One TTS WebSocket: phrases queued for a synthesis worker that paces them."""

    def __init__(self, owner: FakeStages, ws: ServerConnection, rate: int) -> None:
        self._owner = owner
        self._ws = ws
        self._rate = rate
        self._text = ""  # received, not yet a phrase
        self._text_at = 0  # connection offset of _text
        self._jobs: deque[tuple[str, int] | None] = deque()  # phrases; None: a flush
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._index = 0
        self._round_started = True  # the next phrase is the first of a round
        self._generation = 0
        self._worker = asyncio.create_task(self._run())

    def push(self, text: str) -> None:
        self._text += text
        cut = 0
        for i, ch in enumerate(self._text):
            if ch in ".!?" and i + 1 < len(self._text) and self._text[i + 1].isspace():
                end = i + 1
                while end < len(self._text) and self._text[end].isspace():
                    end += 1
                if end < len(self._text):  # the whitespace after it has fully arrived
                    cut = end
        if cut:
            self._jobs.append((self._text[:cut], self._text_at))
            self._text, self._text_at = self._text[cut:], self._text_at + cut
            self._wake.set()

    def flush(self) -> None:
        if self._text:
            self._jobs.append((self._text, self._text_at))
            self._text_at += len(self._text)
            self._text = ""
        self._jobs.append(None)
        self._wake.set()

    async def cancel(self) -> None:
        self._generation += 1
        self._jobs.clear()
        self._text_at += len(self._text)
        self._text = ""
        self._round_started = True
        async with self._lock:
            await self._ws.send('{"type":"cancelled"}')

    def close(self) -> None:
        self._worker.cancel()

    async def _run(self) -> None:
        t = self._owner.timing
        free_at = time.monotonic()
        with contextlib.suppress(ConnectionClosed, asyncio.CancelledError):
            while True:
                while not self._jobs:
                    self._wake.clear()
                    await self._wake.wait()
                job = self._jobs.popleft()
                generation = self._generation
                if job is None:
                    self._round_started = True
                    async with self._lock:
                        await self._ws.send('{"type":"done"}')
                    continue
                text, offset = job
                duration_ms = len(text) * t.tts_ms_per_char
                work_ms = duration_ms * t.tts_rtf
                if self._round_started:
                    work_ms += t.tts_first_chunk_ms
                    self._round_started = False
                free_at = max(free_at, time.monotonic()) + work_ms / 1000
                delay = free_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if generation != self._generation:
                    continue  # cancelled while "synthesizing"
                audio = self._owner.audio.get(self._rate, duration_ms)
                header = json.dumps({
                    "type": "chunk", "index": self._index, "text": text,
                    "text_offset": offset, "sample_rate": self._rate,
                    "duration_ms": len(audio) / 2 / self._rate * 1000, "words": None,
                    "audio_bytes": len(audio)})
                async with self._lock:
                    await self._ws.send(header)
                    await self._ws.send(audio)
                self._index += 1
                self._owner.counters.tts_chunks += 1


def main(argv: list[str] | None = None) -> None:
    defaults = Timing.from_env()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability.fake_stages",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100,
                        help="ASR port; the LLM listens on port+1, TTS on port+2")
    for f in fields(Timing):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name,
                            type=int if f.type == "int" else float,
                            default=getattr(defaults, f.name))
    args = parser.parse_args(argv)
    timing = replace(defaults, **{f.name: getattr(args, f.name) for f in fields(Timing)})
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(timing, args.host, args.port))


async def _serve(timing: Timing, host: str, port: int) -> None:
    stages = FakeStages(timing)
    ports = await stages.start(host, port)
    print(f"fake stages: asr {ports[0]} llm {ports[1]} tts {ports[2]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await stages.aclose()


if __name__ == "__main__":
    main()
