"""A turn's trace (orchestrator/tracing.py) through the real session and turn controller.

The SDK records into an in-memory exporter. With the deterministic fake stages: the span
tree, the attributes, and that each timing span is the histogram's observation (the same
timestamps as the session's turn log line). With the real stage clients against loopback
servers (the LLM service itself on a fake engine; minimal ASR and TTS WebSocket servers
that record the handshake): the client spans, the replica, the ``traceparent`` header and
the LLM service's own span in the same trace.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvicorn
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from orchestrator import tracing as turn_tracing
from orchestrator.backends import Backends
from orchestrator.realtime import RealtimeSession
from orchestrator.settings import ServeSettings
from orchestrator.store import MemoryStore
from stages.asr.client import AsrClient
from stages.common import tracing
from stages.llm.client import OpenAICompatLlm
from stages.llm.service import create_app as llm_app
from stages.llm.settings import LlmSettings
from stages.tts.client import TtsClient
from tests.orchestrator.fakes import FakeAsr, FakeLlm, FakeTts, FakeVad, silence, tone

REPLY = ["Sure", ",", " the", " lights", " are", " on", " now", "."]
WORDS = ["turn", "on", "the", "lights"]
TIMING = list(turn_tracing.TIMING_SPANS)
# The session's turn log line names the same marks (orchestrator/realtime.py).
LOGGED = {"endpoint": "endpoint_ms", "asr.final": "final_transcript_ms",
          "llm.first_token": "llm_first_token_ms", "first_audio_out": "first_audio_ms"}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.uninstall()
    provider.shutdown()


class Client:
    """A RealtimeSession over ``backends``, fed like a WebSocket client."""

    def __init__(self, backends: Backends, **settings: Any) -> None:
        self.events: list[dict[str, Any]] = []
        self.session = RealtimeSession(
            backends=backends, vad=None, store=MemoryStore(),
            settings=ServeSettings(max_audio_rate=1000.0, **settings), send=self._recv,
            make_vad=FakeVad)

    async def _recv(self, text: str) -> None:
        self.events.append(json.loads(text))

    async def speak(self, pcm16_24k: bytes) -> None:
        """20 ms frames in real time, as a microphone sends them (the session dates the end
        of speech on the audio clock: audio sent faster would date it before the turn)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n, i in enumerate(range(0, len(pcm16_24k), 960)):
            await self.session.handle(json.dumps({
                "type": "input_audio_buffer.append",
                "audio": base64.b64encode(pcm16_24k[i:i + 960]).decode()}))
            await asyncio.sleep(max(0.0, start + (n + 1) * 0.02 - loop.time()))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    async def wait_for(self, kind: str, count: int = 1, limit_s: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + limit_s
        while len(self.of(kind)) < count:
            assert asyncio.get_running_loop().time() < deadline, kind
            await asyncio.sleep(0.005)


def speech_24k() -> bytes:
    """Four 'words' (tone bursts) at 24 kHz, then 800 ms of silence."""
    words = b"".join(tone(240, 24000) + silence(100, 24000) for _ in range(4))
    return silence(300, 24000) + words + silence(800, 24000)


async def finished_turns(exporter: InMemorySpanExporter, count: int = 1,
                         limit_s: float = 5.0) -> list[ReadableSpan]:
    """The ``turn`` spans, once ``count`` have ended (the reply's done-callback ends one)."""
    async with asyncio.timeout(limit_s):
        while True:
            turns = [s for s in exporter.get_finished_spans() if s.name == "turn"]
            if len(turns) >= count:
                return turns
            await asyncio.sleep(0.005)


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> dict[str, ReadableSpan]:
    ctx = parent.get_span_context()
    assert ctx is not None
    kids = [s for s in exporter.get_finished_spans()
            if s.parent is not None and s.parent.span_id == ctx.span_id]
    by_name = {s.name: s for s in kids}
    assert len(by_name) == len(kids), [s.name for s in kids]  # one of each
    return by_name


def turn_log(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "orchestrator.realtime" and r.getMessage().startswith('{"event": "turn"')]
    assert len(lines) == 1, lines
    record: dict[str, Any] = lines[0]
    return record


def ns(span: ReadableSpan, edge: str) -> int:
    value = span.start_time if edge == "start" else span.end_time
    assert value is not None
    return value


def check_timing_spans(turn: ReadableSpan, timing: dict[str, ReadableSpan],
                       record: dict[str, Any]) -> None:
    """Every timing span starts at the end of speech, inside the turn, and lasts what
    the session logged (and observed in its histogram) for the same mark."""
    assert set(TIMING) <= set(timing)
    eos = {ns(timing[name], "start") for name in TIMING}
    assert len(eos) == 1  # one origin: the end of speech
    assert ns(turn, "start") <= eos.pop()
    for name in TIMING:
        span = timing[name]
        assert ns(span, "end") <= ns(turn, "end")
        latency_ms = (ns(span, "end") - ns(span, "start")) / 1e6
        attrs = span.attributes or {}
        assert attrs["cascade.latency_ms"] == pytest.approx(latency_ms, abs=0.06)
        if name in LOGGED:
            assert attrs["cascade.latency_ms"] == record[LOGGED[name]], name


async def test_a_turn_with_a_speculative_hit(spans: InMemorySpanExporter,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator.realtime")
    llm = FakeLlm(REPLY, interval_s=0.001)
    c = Client(Backends(asr=FakeAsr(WORDS), llm=llm, tts=FakeTts(ms_per_char=5.0)))
    await c.session.start()
    await c.speak(speech_24k())
    await c.wait_for("response.done")
    [turn] = await finished_turns(spans)
    record = turn_log(caplog)
    await c.session.aclose()

    assert turn.parent is None and turn.kind == SpanKind.INTERNAL  # a trace per turn
    attrs = dict(turn.attributes or {})
    user_item = c.of("input_audio_buffer.committed")[0]["item_id"]
    response = c.of("response.done")[0]["response"]
    assert attrs == {
        "cascade.session.id": c.session.session_id, "cascade.turn.number": 1,
        "cascade.turn.item_id": user_item, "cascade.pipeline": "streaming",
        "cascade.turn.outcome": "replied",
        "cascade.speculation": "hit", "cascade.speculations": 1,
        "cascade.endpoint.reason": "silence",
        "cascade.response.id": response["id"], "cascade.response.status": "completed"}
    assert record["speculative_hit"] is True
    timing = children(spans, turn)
    assert set(timing) == set(TIMING)  # fake stages: no stage client spans
    check_timing_spans(turn, timing, record)
    # A speculative hit: the reply (and its first token) began before the endpoint; the
    # audio only leaves once the final transcript confirmed it.
    end = {name: ns(span, "end") for name, span in timing.items()}
    assert end["endpoint"] <= end["asr.final"] <= end["first_audio_out"]
    assert end["llm.first_token"] <= end["tts.first_audio"] <= end["first_audio_out"]
    assert end["llm.first_token"] < end["endpoint"]
    events = {e.name: e.timestamp for e in turn.events}
    assert set(events) == {"transcript.first_delta", "reply.started"}
    assert events["reply.started"] < end["endpoint"]
    assert turn.status.status_code == StatusCode.UNSET


async def test_a_speculation_miss_orders_the_marks_as_the_vocabulary_does(
        spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture) -> None:
    """The final transcript differs from the speculation: the reply restarts after it,
    so every mark follows the previous one (metrics.py's order)."""
    caplog.set_level(logging.INFO, logger="orchestrator.realtime")
    c = Client(Backends(asr=FakeAsr(WORDS, final_suffix=" please"),
                        llm=FakeLlm(REPLY, interval_s=0.001), tts=FakeTts(ms_per_char=5.0)))
    await c.session.start()
    await c.speak(speech_24k())
    await c.wait_for("response.done")
    [turn] = await finished_turns(spans)
    record = turn_log(caplog)
    await c.session.aclose()

    attrs = turn.attributes or {}
    assert attrs["cascade.speculation"] == "miss" and attrs["cascade.speculations"] == 1
    assert attrs["cascade.turn.outcome"] == "replied"
    timing = children(spans, turn)
    check_timing_spans(turn, timing, record)
    ends = [ns(timing[name], "end") for name in TIMING]
    assert ends == sorted(ends), dict(zip(TIMING, ends, strict=True))
    assert len(set(ends)) == len(ends)


async def test_a_barge_in_ends_the_turn_barged_in_and_the_next_turn_opens(
        spans: InMemorySpanExporter) -> None:
    c = Client(Backends(asr=FakeAsr(WORDS), llm=FakeLlm(REPLY, interval_s=0.001),
                        tts=FakeTts(ms_per_char=60.0)),  # 2 s of reply audio, paced
               llm_prime_instructions=False)
    await c.session.start()
    await c.speak(speech_24k())
    await c.wait_for("response.output_audio.delta", count=5)
    await c.speak(tone(400, 24000))  # the user talks over the reply
    await c.wait_for("response.done")
    [first] = await finished_turns(spans)
    assert (first.attributes or {})["cascade.turn.outcome"] == "barged_in"
    assert (first.attributes or {})["cascade.turn.number"] == 1
    await c.session.aclose()  # the interrupting turn, still open, ends with the session
    turns = {(s.attributes or {})["cascade.turn.number"]: s
             for s in await finished_turns(spans, 2)}
    assert (turns[2].attributes or {})["cascade.turn.outcome"] == "cancelled"
    assert turns[1].context.trace_id != turns[2].context.trace_id


async def test_a_turn_without_a_reply_and_manual_turns(spans: InMemorySpanExporter) -> None:
    c = Client(Backends(asr=FakeAsr(WORDS), llm=FakeLlm(REPLY), tts=FakeTts()),
               llm_prime_instructions=False)
    await c.session.start()
    await c.session.handle(json.dumps({"type": "session.update", "session": {
        "type": "realtime", "audio": {"input": {"turn_detection": None}}}}))
    await c.speak(speech_24k())
    await c.session.handle(json.dumps({"type": "input_audio_buffer.commit"}))
    await c.wait_for("conversation.item.input_audio_transcription.completed")
    [turn] = await finished_turns(spans)
    await c.session.aclose()
    attrs = turn.attributes or {}
    assert attrs["cascade.turn.outcome"] == "no_reply"
    assert attrs["cascade.session.id"] == c.session.session_id
    assert not children(spans, turn)  # no end of speech, no reply: no timing spans


async def test_a_sampled_out_turn_records_nothing_and_leaves_nothing_open() -> None:
    """OTEL_TRACES_SAMPLER (the SDK reads it) may drop a turn's trace: its stage spans
    are not recorded either, and the session keeps no state for it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        c = Client(Backends(asr=FakeAsr(WORDS), llm=FakeLlm(REPLY, interval_s=0.001),
                            tts=FakeTts(ms_per_char=5.0)))
        await c.session.start()
        await c.speak(speech_24k())
        await c.wait_for("response.done")
        controller = c.session._controller
        deadline = asyncio.get_running_loop().time() + 5.0
        while turn_tracing.open_turns(controller):  # ended by the reply, not by the close
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        await c.session.aclose()
    finally:
        tracing.uninstall()
        provider.shutdown()
    assert exporter.get_finished_spans() == ()


# ---------------------------------------------------------------- real stage clients


class StageServers:
    """Minimal ASR and TTS stream servers on loopback that record each handshake's
    ``traceparent`` (the real services' server spans are tested in tests/stages/)."""

    def __init__(self) -> None:
        self.asr_traceparents: list[str | None] = []
        self.tts_traceparents: list[str | None] = []

    async def asr(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.asr_traceparents.append(ws.request.headers.get("traceparent"))
        async for message in ws:
            if isinstance(message, str) and json.loads(message)["type"] == "finalize":
                await ws.send(json.dumps({"type": "final", "text": " ".join(WORDS),
                                          "words": [], "audio_ms": 1000, "finalize_ms": 5.0}))
                await ws.close(1000)
                return

    async def tts(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.tts_traceparents.append(ws.request.headers.get("traceparent"))
        await ws.send(json.dumps({"type": "ready", "sample_rate": 24000, "voice": "joe"}))
        text = ""
        async for message in ws:
            event = json.loads(message)
            if event["type"] == "text":
                text += event["text"]
            elif event["type"] == "flush":
                audio = bytes(4800)  # 100 ms at 24 kHz
                await ws.send(json.dumps({
                    "type": "chunk", "index": 0, "text": text, "text_offset": 0,
                    "sample_rate": 24000, "duration_ms": 100.0, "words": None,
                    "audio_bytes": len(audio)}))
                await ws.send(audio)
                await ws.send(json.dumps({"type": "done"}))
            elif event["type"] == "cancel":
                with contextlib.suppress(ConnectionClosed):  # the client may close at once
                    await ws.send(json.dumps({"type": "cancelled"}))


@contextlib.asynccontextmanager
async def llm_service(llm: FakeLlm) -> AsyncIterator[str]:
    """The real LLM service (stages/llm/service.py) on a fake engine, on loopback."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(llm_app(LlmSettings(), engine=llm),
                                           lifespan="on", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                assert not task.done(), "uvicorn did not start"
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()


def traceparent_of(span: ReadableSpan) -> str:
    ctx = span.context
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


async def test_stage_clients_trace_their_streams_and_propagate_the_context(
        spans: InMemorySpanExporter) -> None:
    servers = StageServers()
    async with (serve(servers.asr, "127.0.0.1", 0) as asr_server,
                serve(servers.tts, "127.0.0.1", 0) as tts_server,
                llm_service(FakeLlm(REPLY, interval_s=0.001)) as llm_url):
        asr_url = f"http://127.0.0.1:{asr_server.sockets[0].getsockname()[1]}"
        tts_url = f"http://127.0.0.1:{tts_server.sockets[0].getsockname()[1]}"
        backends = Backends(asr=AsrClient(asr_url), llm=OpenAICompatLlm(llm_url),
                            tts=TtsClient(tts_url))
        c = Client(backends, llm_prime_instructions=False)
        await c.session.start()
        await c.speak(speech_24k())
        await c.wait_for("response.done")
        [turn] = await finished_turns(spans)
        await c.session.aclose()
        await backends.aclose()

    assert (turn.attributes or {})["cascade.turn.outcome"] == "replied"
    kids = children(spans, turn)
    assert set(kids) == set(TIMING) | {"asr.stream", "llm.request", "tts.stream"}
    for name, stage, url in (("asr.stream", "asr", asr_url), ("llm.request", "llm", llm_url),
                             ("tts.stream", "tts", tts_url)):
        span = kids[name]
        assert span.kind == SpanKind.CLIENT
        assert span.context.trace_id == turn.context.trace_id
        attrs = span.attributes or {}
        assert attrs["cascade.stage"] == stage
        assert str(attrs["cascade.replica.url"]).startswith(url), attrs
        assert span.status.status_code == StatusCode.UNSET, span.status
    # The handshakes named the client spans as their parents (W3C traceparent) ...
    assert servers.asr_traceparents == [traceparent_of(kids["asr.stream"])]
    assert servers.tts_traceparents == [traceparent_of(kids["tts.stream"])]
    # ... and the LLM service's own span joined the trace under the request.
    [generate] = children(spans, kids["llm.request"]).values()
    assert generate.name == "llm.generate" and generate.kind == SpanKind.SERVER
    assert (generate.attributes or {})["cascade.items"] == len(REPLY) + 1  # + finish
    assert (kids["llm.request"].attributes or {})["cascade.llm.prefill_only"] is False
    request, gen = kids["llm.request"], generate
    assert ns(request, "start") <= ns(gen, "start") <= ns(gen, "end") <= ns(request, "end")
