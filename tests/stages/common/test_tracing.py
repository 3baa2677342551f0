"""Tracing switched by the OTel environment (stages/common/tracing.py), over real sockets.

A real TTS service process exports its ``tts.session`` spans over OTLP/HTTP to a small
receiver on loopback that decodes the protobuf ``ExportTraceServiceRequest``: each span
carries the trace id and parent of the ``traceparent`` the client's handshake sent, and the
service's name. The batch processor exports from its own thread while the service runs,
and the spans still queued when it stops are flushed before the process exits. Without an
endpoint (or with the SDK disabled) nothing of OpenTelemetry is even imported.
"""

from __future__ import annotations

import asyncio
import gzip
import importlib
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.testclient import TestClient, WebSocketDenialResponse
from websockets.asyncio.client import connect

from orchestrator.launcher import StageProcess
from stages.common import tracing

ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    resource: dict[str, Any]
    attributes: dict[str, Any]


def _value(v: AnyValue) -> Any:
    field = v.WhichOneof("value")
    return getattr(v, field) if field else None


class OtlpReceiver:
    """An OTLP/HTTP trace receiver (``POST /v1/traces``, protobuf) on 127.0.0.1."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = self.path == "/v1/traces"
                if ok:
                    receiver._add(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _add(self, request: ExportTraceServiceRequest) -> None:
        got = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(ReceivedSpan(
                        s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                        s.kind, resource, {a.key: _value(a.value) for a in s.attributes}))
        with self._lock:
            self.requests += 1
            self.spans.extend(got)

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for_trace(self, trace_id: str, timeout_s: float = 15.0) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout_s
        while not (found := self.of_trace(trace_id)):
            assert time.monotonic() < deadline, f"no span of trace {trace_id} received"
            time.sleep(0.05)
        return found

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


def new_traceparent() -> tuple[str, str, str]:
    """(traceparent, trace id, parent span id) of a fresh sampled W3C trace context."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


async def speak_once(url: str, traceparent: str) -> None:
    """One real stream: text, flush, every chunk up to ``done``, close."""
    ws_url = "ws" + url.removeprefix("http") + "/v1/stream?sample_rate=24000"
    async with connect(ws_url, additional_headers={"traceparent": traceparent}) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(json.dumps({"type": "text", "text": "Hi there."}))
        await ws.send(json.dumps({"type": "flush"}))
        chunks = 0
        while True:
            message = await ws.recv()
            if isinstance(message, bytes):
                continue
            kind = json.loads(message)["type"]
            if kind == "done":
                break
            assert kind == "chunk", message
            chunks += 1
        assert chunks >= 1


def wait_idle(url: str, timeout_s: float = 10.0) -> None:
    """The service counts no stream (its handler, and so its span, has ended)."""
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{url}/load", timeout=2.0).json()["active"]:
        assert time.monotonic() < deadline, "the stream did not end"
        time.sleep(0.05)


def test_a_stage_service_exports_its_spans_in_the_callers_trace(
        receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=ci-test")
    # Export when 2 spans are queued, else only after 60 s (or at exit): the first two
    # streams' spans must come from the processor's thread while the service runs, the
    # third's only from the flush at shutdown.
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    proc = StageProcess("tts")
    try:
        url = proc.wait_ready(120.0)
        contexts = [new_traceparent() for _ in range(3)]
        for traceparent, _, _ in contexts[:2]:
            asyncio.run(speak_once(url, traceparent))
        for _, trace_id, parent in contexts[:2]:  # exported while the service runs
            found = receiver.wait_for_trace(trace_id)
            assert len(found) == 1, (found, receiver.requests)
            [span] = found
            assert span.name == "tts.session"
            assert span.parent_span_id == parent
            assert span.kind == 2  # SPAN_KIND_SERVER
            assert span.resource["service.name"] == "cascade-tts"
            assert span.resource["deployment.environment"] == "ci-test"
        traceparent, trace_id, parent = contexts[2]
        asyncio.run(speak_once(url, traceparent))
        wait_idle(url)
        time.sleep(0.3)
        assert not receiver.of_trace(trace_id)  # queued: one span is not a batch
    finally:
        proc.stop()  # SIGTERM: drain, shut down, flush the queue, exit
    assert proc.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the SIGTERM
    [span] = receiver.wait_for_trace(trace_id, timeout_s=2.0)  # already flushed at exit
    assert (span.name, span.parent_span_id) == ("tts.session", parent)
    assert {s.name for s in receiver.spans} == {"tts.session"}  # health probes: no spans


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.uninstall()
    provider.shutdown()


@pytest.mark.parametrize("stage", ["asr", "tts"])
@pytest.mark.parametrize("on", [False, True])
def test_the_traced_stream_endpoints_keep_their_parameters(
        stage: str, on: bool, spans: InMemorySpanExporter) -> None:
    """FastAPI still reads each stream endpoint's own parameters through the decorator
    (the ASR's query parameters too): no model loaded, the handshake is refused as the
    handler says (503 not_ready), not by parameter validation."""
    if not on:
        tracing.uninstall()
    service = importlib.import_module(f"stages.{stage}.service")
    settings = importlib.import_module(f"stages.{stage}.settings").SETTINGS_CLASS()
    client = TestClient(service.create_app(settings))  # no lifespan: nothing loaded
    traceparent, trace_id, parent = new_traceparent()
    with pytest.raises(WebSocketDenialResponse) as denied:
        with client.websocket_connect("/v1/stream?sample_rate=16000&language=en",
                                      headers={"traceparent": traceparent}):
            pass
    assert denied.value.status_code == 503
    assert denied.value.json()["error"]["code"] == "not_ready"
    finished = spans.get_finished_spans()
    if not on:
        assert finished == ()
        return
    [span] = finished
    assert span.name == f"{stage}.session"
    assert span.kind == SpanKind.SERVER
    assert f"{span.context.trace_id:032x}" == trace_id
    assert span.parent is not None and f"{span.parent.span_id:016x}" == parent
    assert span.parent.is_remote


# ---------------------------------------------------------------- the switch

PROBE = textwrap.dedent("""
    import json, sys, threading
    from fastapi.testclient import TestClient
    from orchestrator.server import create_app as serve_app
    from stages.common import tracing
    from stages.llm.service import create_app
    from stages.llm.settings import LlmSettings
    from tests.orchestrator.fakes import FakeLlm

    with TestClient(create_app(LlmSettings(), engine=FakeLlm(["Hi", "."]))) as client:
        answer = client.post("/v1/chat/completions", headers={"traceparent": sys.argv[1]},
                             json={"messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200, answer.text
    serve_app()  # the orchestrator's app configures too (the first one wins)
    from opentelemetry import trace  # FastAPI imports the API itself
    print(json.dumps({
        "enabled": tracing.enabled(), "tracer": repr(tracing.tracer()),
        "global_provider": type(trace.get_tracer_provider()).__name__,
        "modules": sorted(m for m in sys.modules
                          if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))),
        "threads": [t.name for t in threading.enumerate()]}))
""")


def probe(env: dict[str, str], traceparent: str) -> dict[str, Any]:
    """The app's view of tracing in a fresh interpreter with exactly ``env``'s OTel
    variables, after one traced request through the LLM service."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", PROBE, traceparent], cwd=ROOT,
                         env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_tracing_is_off_and_costs_nothing_without_an_endpoint() -> None:
    state = probe({}, new_traceparent()[0])
    assert state["enabled"] is False and state["tracer"] == "None"  # hooks return at once
    assert state["modules"] == []  # neither the SDK nor an exporter is even imported
    assert state["global_provider"] == "ProxyTracerProvider"  # the API's no-op default
    assert not [t for t in state["threads"] if t.startswith("OtelBatch")]


def test_the_sdk_switch_wins_over_an_endpoint(receiver: OtlpReceiver) -> None:
    traceparent, trace_id, _ = new_traceparent()
    state = probe({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SDK_DISABLED": "true"},
                  traceparent)
    assert state["enabled"] is False and state["modules"] == []
    assert not receiver.of_trace(trace_id)


def test_a_traces_endpoint_turns_it_on(receiver: OtlpReceiver) -> None:
    traceparent, trace_id, parent = new_traceparent()
    state = probe({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.url}/v1/traces",
                   "OTEL_SERVICE_NAME": "llm-eu-1"}, traceparent)
    assert state["enabled"] is True
    assert "opentelemetry.sdk.trace" in state["modules"]
    assert "OtelBatchSpanRecordProcessor" in state["threads"]  # export off the loop
    # cascade's own provider: FastAPI's native telemetry (which follows the global one)
    # stays off, so the probes and routes add no spans of their own.
    assert state["global_provider"] == "ProxyTracerProvider"
    [span] = receiver.wait_for_trace(trace_id)  # flushed by the SDK at interpreter exit
    assert (span.name, span.parent_span_id) == ("llm.generate", parent)
    assert span.resource["service.name"] == "llm-eu-1"
    assert span.attributes["cascade.llm.prefill_only"] is False
    assert span.attributes["cascade.items"] == 3  # two tokens and the finish


@pytest.mark.parametrize(("env", "on"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "TRUE"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "false"}, True),
    ({"OTEL_SERVICE_NAME": "x"}, False),
])
def test_wanted(env: dict[str, str], on: bool) -> None:
    assert tracing.wanted(env) is on
