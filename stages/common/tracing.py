"""OpenTelemetry traces of the stage streams: off unless an OTLP endpoint is configured.

The switch is the standard OpenTelemetry environment, nothing of cascade's own: tracing is
on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set
(and ``OTEL_SDK_DISABLED`` is not true). ``OTEL_SERVICE_NAME`` (or ``service.name`` in
``OTEL_RESOURCE_ATTRIBUTES``) names the service, else ``cascade-<role>``; the exporter's
headers, timeout and compression, the batch processor's queue (``OTEL_BSP_*``) and the
rest of ``OTEL_RESOURCE_ATTRIBUTES`` are read by the SDK itself.

Off: the OpenTelemetry SDK and exporter are not even imported, no provider is installed,
and every hook below returns at its first line. Hooks exist per turn, per stream and per
request, never per audio frame or token, so tracing on costs a few spans per turn.

On: one SDK ``TracerProvider`` with a ``BatchSpanProcessor`` (a bounded queue; spans are
exported over OTLP/HTTP protobuf from the processor's own thread, never the event loop).
The provider is cascade's own, not the global one: FastAPI's native telemetry traces
every request once a global provider is set (health and metrics probes included, with
spans per dependency), which would bury the spans below. An application that wants those
too sets the global provider itself.

Span names (dashboards and docs cite them):

* client side, in the orchestrator: ``asr.stream``, ``tts.stream`` (one per stream, open
  to close) and ``llm.request`` (one per chat-completions request), with
  ``cascade.stage`` and ``cascade.replica.url`` (the replica the stream runs on; a
  failover adds a ``replica.moved`` event and counts ``cascade.replica.failovers``);
* server side, in the stage services: ``asr.session``, ``tts.session`` (one per
  WebSocket stream) and ``llm.generate`` (one per generation, ``first_token`` event).

W3C trace context travels in the ``traceparent`` (and ``tracestate``) header of the
WebSocket handshake or the HTTP request, so a stage's server span joins the
orchestrator's trace of the turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from stages.common.aiter import closing

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span as Span
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
INSTRUMENTATION = "cascade"

T = TypeVar("T")
P = ParamSpec("P")

_tracer: Tracer | None = None  # None: tracing is off (the hooks' first check)
_provider: TracerProvider | None = None  # the SDK provider ``configure`` made (to flush)


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces (an OTLP endpoint, the SDK not disabled)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def configure(service_name: str) -> bool:
    """Turn tracing on for this process if the environment asks for it (``wanted``);
    ``service_name`` is the default ``service.name``. Once per process: later calls (a
    second app in the same process) keep the first provider. Returns whether it is on."""
    global _provider
    if _tracer is not None:
        return True
    if not wanted():
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
    named = str(resource.attributes.get(SERVICE_NAME, ""))
    if not named or named.startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider = provider
    install(provider)
    log.info("tracing on: service.name=%s, OTLP/HTTP export",
             provider.resource.attributes.get(SERVICE_NAME))
    return True


def setup(app: Any, service_name: str) -> bool:
    """``configure``, and when tracing is on, flush the queued spans as ``app`` (a
    FastAPI/Starlette app) shuts down: after its own lifespan, while the process still
    runs (uvicorn re-raises a SIGTERM once it has stopped, and ``serve`` ends with
    ``os._exit``: the SDK's atexit flush would never run)."""
    if not configure(service_name):
        return False
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(scope_app: Any) -> AsyncIterator[Any]:
        try:
            async with inner(scope_app) as state:
                yield state
        finally:
            await asyncio.to_thread(flush)

    app.router.lifespan_context = lifespan
    return True


def install(provider: Any) -> None:
    """Trace through ``provider`` (an SDK ``TracerProvider``; tests pass one with an
    in-memory exporter). ``configure`` calls it."""
    global _tracer
    _tracer = provider.get_tracer(INSTRUMENTATION)


def uninstall() -> None:
    """Tracing off again (tests)."""
    global _tracer
    _tracer = None


def enabled() -> bool:
    return _tracer is not None


def tracer() -> Tracer | None:
    """The tracer, or None when tracing is off."""
    return _tracer


def flush(timeout_s: float = 3.0) -> None:
    """Export what is queued, waiting at most ``timeout_s``: the SDK's flush waits on the
    exporter (up to its own timeout, 10 s by default, when the collector is down), so it
    runs in a thread of its own that a process about to exit leaves behind."""
    provider = _provider
    if provider is None:
        return
    done = threading.Thread(target=provider.force_flush, name="cascade-trace-flush",
                            daemon=True)
    done.start()
    done.join(timeout_s)


# ---------------------------------------------------------------------- spans


def start_client(name: str, stage: str, attributes: Mapping[str, Any] | None = None,
                 ) -> Span | None:
    """A CLIENT span, child of the current context (the orchestrator's turn), for a
    stream or request to a stage; None when tracing is off."""
    if _tracer is None:
        return None
    from opentelemetry.trace import SpanKind

    span = _tracer.start_span(name, kind=SpanKind.CLIENT)
    span.set_attribute("cascade.stage", stage)
    if attributes:
        span.set_attributes(dict(attributes))
    return span


def headers(span: Span | None) -> dict[str, str] | None:
    """The ``traceparent`` (and ``tracestate``) headers naming ``span`` as the parent of
    the server's work; None when there is no span (tracing off)."""
    if span is None:
        return None
    from opentelemetry.trace import set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(span))
    return carrier


def with_headers(base: dict[str, str], span: Span | None) -> dict[str, str]:
    """``base`` plus the trace headers of ``span`` (``base`` itself when there is none)."""
    extra = headers(span)
    return base if not extra else {**base, **extra}


def set_replica(span: Span | None, url: str) -> None:
    if span is not None:
        span.set_attribute("cascade.replica.url", url)


def moved(span: Span | None, url: str, failovers: int) -> None:
    """The stream moved to replica ``url`` (its ``failovers``-th move)."""
    if span is not None:
        span.add_event("replica.moved", {"cascade.replica.url": url})
        span.set_attribute("cascade.replica.url", url)
        span.set_attribute("cascade.replica.failovers", failovers)


def end(span: Span | None, error: BaseException | None = None) -> None:
    """End ``span`` (once; later calls do nothing). ``error``: how it failed; a
    cancellation (barge-in, closed early) is marked ``cascade.cancelled``, not an error."""
    if span is None or not span.is_recording():
        return
    if error is not None:
        _fail(span, error)
    span.end()


def _fail(span: Span, error: BaseException) -> None:
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        span.set_attribute("cascade.cancelled", True)
        return
    from opentelemetry.trace import Status, StatusCode

    span.record_exception(error)
    code = getattr(error, "code", None)
    if isinstance(code, str) and code:
        span.set_attribute("cascade.error.code", code)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:300]))


@contextlib.contextmanager
def failing(span: Span | None) -> Iterator[None]:
    """Ends ``span`` with the error when the block raises (an open that failed); a block
    that succeeds leaves it open for its owner to end."""
    try:
        yield
    except BaseException as exc:
        end(span, exc)
        raise


@contextlib.contextmanager
def attached(context: Context | None) -> Iterator[None]:
    """Make ``context`` current for the block (tasks created inside inherit it). Never
    across a ``yield`` of an async generator: its caller would inherit it."""
    if context is None:
        yield
        return
    from opentelemetry import context as otel_context

    token = otel_context.attach(context)
    try:
        yield
    finally:
        otel_context.detach(token)


def client_stream(name: str, stage: str, make: Callable[[Span | None], AsyncIterator[T]],
                  attributes: Mapping[str, Any] | None = None) -> AsyncIterator[T]:
    """``make(span)``'s items inside a CLIENT span named ``name`` that starts with the first
    item asked for (a child of the caller's context then) and ends with the iteration:
    exhausted, failed, or closed early (``aclose``, which also closes ``make``'s iterator at
    once). Off: ``make(None)`` itself, nothing in between."""
    if _tracer is None:
        return make(None)
    return _client_stream(name, stage, make, attributes)


async def _client_stream(name: str, stage: str,
                         make: Callable[[Span | None], AsyncIterator[T]],
                         attributes: Mapping[str, Any] | None) -> AsyncIterator[T]:
    span = start_client(name, stage, attributes)
    try:
        async with closing(make(span)) as inner:
            async for item in inner:
                yield item
    except BaseException as exc:
        end(span, exc)
        raise
    end(span)


# ---------------------------------------------------------------------- server side


def _parent(carrier: Mapping[str, str]) -> Context:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(carrier)


def start_server(name: str, carrier: Mapping[str, str],
                 attributes: Mapping[str, Any] | None = None) -> Span | None:
    """A SERVER span for work a request asked for, child of the request's
    ``traceparent`` (a new trace without one); None when tracing is off."""
    if _tracer is None:
        return None
    from opentelemetry.trace import SpanKind

    span = _tracer.start_span(name, context=_parent(carrier), kind=SpanKind.SERVER)
    if attributes:
        span.set_attributes(dict(attributes))
    return span


def server_stream(name: str, carrier: Mapping[str, str], items: AsyncIterator[T],
                  attributes: Mapping[str, Any] | None = None) -> AsyncIterator[T]:
    """``items`` inside a SERVER span (see ``start_server``) from the first item asked for
    to the end of the iteration, with a ``first_token`` event at the first item and the
    count in ``cascade.items``. Off: ``items`` itself."""
    if _tracer is None:
        return items
    return _server_stream(name, dict(carrier), items, attributes)


async def _server_stream(name: str, carrier: Mapping[str, str], items: AsyncIterator[T],
                         attributes: Mapping[str, Any] | None) -> AsyncIterator[T]:
    span = start_server(name, carrier, attributes)
    count = 0
    try:
        async with closing(items) as inner:
            async for item in inner:
                if count == 0 and span is not None:
                    span.add_event("first_token")
                count += 1
                yield item
    except BaseException as exc:
        if span is not None:
            span.set_attribute("cascade.items", count)
        end(span, exc)
        raise
    if span is not None:
        span.set_attribute("cascade.items", count)
    end(span)


def server_session(name: str) -> Callable[[Callable[P, Awaitable[None]]],
                                          Callable[P, Awaitable[None]]]:
    """Decorates a WebSocket endpoint: the whole session runs inside a SERVER span
    ``name``, current for the handler, child of the handshake's ``traceparent``. The
    endpoint keeps its signature (FastAPI reads it through ``functools.wraps``)."""

    def decorate(handler: Callable[P, Awaitable[None]]) -> Callable[P, Awaitable[None]]:
        @functools.wraps(handler)
        async def traced(*args: P.args, **kwargs: P.kwargs) -> None:
            if _tracer is None:
                await handler(*args, **kwargs)
                return
            from opentelemetry.trace import set_span_in_context
            from starlette.websockets import WebSocket

            ws = next((a for a in (*args, *kwargs.values()) if isinstance(a, WebSocket)), None)
            span = start_server(name, ws.headers if ws is not None else {})
            try:
                with attached(set_span_in_context(span) if span is not None else None):
                    await handler(*args, **kwargs)
            except BaseException as exc:
                end(span, exc)
                raise
            end(span)

        return traced

    return decorate
