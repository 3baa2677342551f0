"""Network ``LlmBackend``: OpenAI chat-completions streaming over SSE, with httpx.

Works against our own service (``cascade stage llm``) and vLLM's OpenAI server. Closing the
async generator (``aclose()`` / task cancellation) exits the ``httpx`` response context,
which closes the TCP connection mid-body; both servers treat that as a disconnect and
abort the generation, so a barge-in frees the GPU at once. httpx is used directly rather
than the ``openai`` SDK so the connection lifetime is explicit and no retries hide errors.

Production on GPUs, vLLM's own server (tool calling needs a parser matching the model)::

    python -m vllm.entrypoints.openai.api_server \\
        --model Qwen/Qwen2.5-7B-Instruct --served-model-name assistant \\
        --host 0.0.0.0 --port 8002 --dtype auto --max-model-len 8192 \\
        --gpu-memory-utilization 0.85 --enable-prefix-caching \\
        --enable-auto-tool-choice --tool-call-parser hermes

then point the orchestrator at it: ``OpenAICompatLlm("http://HOST:8002/v1",
model="assistant")`` (settings: ``CASCADE_LLM_BASE_URL``, ``CASCADE_LLM_API_KEY``).

Primers (``LlmRequest.prefill_only``) go out as ``max_tokens=1`` with the header
``X-Cascade-Prefill-Only: 1``: vLLM's prefix cache keeps the prompt for the real request by
itself and ignores the header; our service reads it and runs the request as a primer (never
queued). A header, not a body field: vLLM warns about unknown body fields. The one token a
server generates is dropped: a primer's stream yields at most the final delta
(``finish_reason``, ``usage``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, TypeVar

import httpx

from stages.common import tracing
from stages.common.access import StageAccess
from stages.common.aiter import closing
from stages.common.replicas import (
    NoReplicaError,
    Replica,
    ReplicaRefused,
    ReplicaSet,
    ReplicaUnreachable,
)
from stages.llm.settings import LlmSettings
from stages.llm.types import LlmDelta, LlmError, LlmRequest, LlmUsage, ToolCallDelta

_MODELS_TIMEOUT_S = 5.0
# Marks a primer (``LlmRequest.prefill_only``) on the wire; our service honours it.
PREFILL_ONLY_HEADER = "X-Cascade-Prefill-Only"


T = TypeVar("T")

# Reads and closes still running: a task is only weakly referenced by the loop.
_CLOSING: set[asyncio.Task[Any]] = set()


def _spawn(coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
    """A task nobody cancels, kept referenced until it ends."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)
    return task


def _close_later(resp: httpx.Response) -> asyncio.Task[None]:
    return _spawn(resp.aclose(), "llm-response-close")


async def _close_shielded(resp: httpx.Response) -> None:
    """``resp.aclose()`` that a second cancellation cannot cut short: interrupted half-way,
    the close left its connection checked out of the pool for good (a reply cancelled
    twice, by a barge-in and the session's end, leaked one connection each time until the
    pool's 100 were gone and every LLM request waited)."""
    await asyncio.shield(_close_later(resp))


async def _read_body(resp: httpx.Response) -> bytes:
    """``resp.aread()`` in a task of its own: a cancelled caller leaves the read (and the
    close that ends it) to finish instead of cutting httpcore's close short."""
    return await asyncio.shield(_spawn(resp.aread(), "llm-body-read"))


async def _lines(resp: httpx.Response) -> AsyncIterator[str]:
    """``resp.aiter_lines()``, read by a task of its own that is **never cancelled**.

    httpcore gives a connection back to its pool in a close guarded by anyio's
    ``CancelScope(shield=True)``, which does not hold off asyncio's ``task.cancel()``: a
    cancellation landing in that close (a reply cancelled twice, by a barge-in and the
    session's end; or a reader cancelled just as the body ended and httpcore was closing
    it) left the connection checked out for good, its response marked closed. 100 such
    and every LLM request waited for a connection (found by the 30-minute soak, twice).
    So a consumer that stops early does not cancel the reader: it closes the response
    from a task of its own (``_close_later``), the reader's pending read fails, and the
    reader ends by itself. The generator must be closed (``stages.common.aiter.closing``)."""
    queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue(maxsize=256)
    stop = asyncio.Event()

    async def pump() -> None:
        try:
            async with closing(resp.aiter_lines()) as lines:
                async for line in lines:
                    await queue.put(line)
                    if stop.is_set():
                        return
        except BaseException as exc:  # the consumer raises it (once the read was closed
            if not stop.is_set():  # under it, nobody is left to hear)
                await queue.put(exc)
            return
        await queue.put(None)

    reader = _spawn(pump(), "llm-response-read")
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        if not reader.done():
            stop.set()
            _close_later(resp)  # a pending read fails: the reader ends by itself
            while not queue.empty():  # a put waiting on a full queue goes through
                queue.get_nowait()
        await asyncio.shield(asyncio.gather(reader, return_exceptions=True))


async def _send_or_close(http: httpx.AsyncClient, req: httpx.Request) -> httpx.Response:
    """``http.send(req, stream=True)``; cancelled while it runs, the request goes on in the
    background and its response, if one comes, is closed (its connection back to the
    pool) instead of left open."""
    sending = asyncio.ensure_future(http.send(req, stream=True))
    try:
        return await asyncio.shield(sending)
    except asyncio.CancelledError:
        def settle(done: asyncio.Future[httpx.Response]) -> None:
            if not done.cancelled() and done.exception() is None:
                _close_later(done.result())

        sending.add_done_callback(settle)
        raise


class OpenAICompatLlm:
    """``LlmBackend`` speaking to any OpenAI-compatible ``/v1/chat/completions``."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        api_key: str | None = None,
        model: str = "smollm2-135m-instruct",
        *,
        timeout: float = 60.0,
        http_client: httpx.AsyncClient | None = None,
        access: StageAccess | None = None,
    ) -> None:
        urls = [u.strip().rstrip("/") for u in
                (base_url.split(",") if isinstance(base_url, str) else base_url) if u.strip()]
        urls = [u if u.endswith("/v1") else u + "/v1" for u in urls]
        # ``access``: cascade's stage key and TLS trust (the orchestrator's). The key is
        # sent only when no ``api_key`` is given: the LLM may be another party's server.
        access = access or StageAccess()
        api_key = api_key or access.api_key
        self._headers = {"Accept": "text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # Several servers (a list, or a DNS name with many addresses): each request goes to
        # the least-loaded healthy one, a session's requests to the same one when possible
        # (``LlmRequest.affinity``), the next one on refusal (429/503) or no connection.
        self.replicas = ReplicaSet("llm", urls, headers={
            k: v for k, v in self._headers.items() if k == "Authorization"},
            verify=access.verify())
        self.base_url = self.replicas.specs[0]
        self.model = model
        self._timeout = timeout
        self._window: int | None = None
        self._window_known = False
        self._window_lock = asyncio.Lock()
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=2.0), verify=access.verify()
        )

    @classmethod
    def from_settings(cls, settings: LlmSettings) -> OpenAICompatLlm:
        """Client for ``settings.base_url`` (e.g. vLLM) naming ``served_model_name``."""
        if not settings.base_url:
            raise ValueError("LlmSettings.base_url is empty: no upstream LLM server configured")
        return cls(settings.base_url, settings.api_key or None,
                   model=settings.served_model_name)

    def _body(self, request: LlmRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [m.model_dump(exclude_none=True) for m in request.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            body["tools"] = [t.model_dump(exclude_none=True) for t in request.tools]
        for key in ("tool_choice", "temperature", "max_tokens", "stop"):
            value = getattr(request, key)
            if value is not None:
                body[key] = value
        if request.prefill_only:
            body["max_tokens"] = 1
        return body

    def _request_headers(self, request: LlmRequest) -> dict[str, str]:
        if request.prefill_only:
            return {**self._headers, PREFILL_ONLY_HEADER: "1"}
        return self._headers

    async def _open(self, request: LlmRequest, span: tracing.Span | None = None
                    ) -> tuple[Replica, httpx.Response]:
        """Send the request to a replica; the response's status and headers are in, the
        body is not read yet. Refusals and unreachable replicas move it to the next."""
        body = self._body(request)
        headers = tracing.with_headers(self._request_headers(request), span)
        last_refusal: list[httpx.Response] = []

        async def send_to(replica: Replica) -> tuple[Replica, httpx.Response]:
            req = self._http.build_request("POST", f"{replica.url}/chat/completions",
                                           json=body, headers=headers)
            try:
                resp = await _send_or_close(self._http, req)
            except httpx.TransportError as exc:
                raise ReplicaUnreachable(f"{type(exc).__name__}: {exc}") from exc
            if resp.status_code in (429, 503):
                await _read_body(resp)
                await _close_shielded(resp)
                last_refusal[:] = [resp]
                raise ReplicaRefused(f"HTTP {resp.status_code}")
            return replica, resp

        try:
            return await self.replicas.attempt(send_to, deadline_s=self._timeout,
                                               affinity=request.affinity)
        except NoReplicaError as exc:
            if last_refusal:  # every replica busy: the server's own answer (429 / 503)
                raise _http_error(last_refusal[0].status_code, last_refusal[0].content) from exc
            raise LlmError(f"LLM server unreachable: {exc}", code="unavailable",
                           status=503) from exc

    def stream(self, request: LlmRequest) -> AsyncIterator[LlmDelta]:
        """The reply's deltas (an ``llm.request`` trace span around them when tracing)."""
        return tracing.client_stream(
            "llm.request", "llm", lambda span: self._stream(request, span),
            {"cascade.llm.prefill_only": request.prefill_only})

    async def _stream(self, request: LlmRequest, span: tracing.Span | None
                      ) -> AsyncIterator[LlmDelta]:
        finish: str | None = None
        usage: LlmUsage | None = None
        yielded = False
        for attempt in range(2):
            replica, resp = await self._open(request, span)
            tracing.set_replica(span, replica.url)
            url = f"{replica.url}/chat/completions"
            try:
                if resp.status_code != 200:
                    raise _http_error(resp.status_code, await _read_body(resp))
                async with closing(_lines(resp)) as lines:
                    async for line in lines:
                        if not line.startswith("data:"):
                            continue  # blank separators, comments, "event:" lines
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        chunk = _parse_chunk(data)
                        if chunk.get("usage"):
                            u = chunk["usage"]
                            usage = LlmUsage(prompt_tokens=int(u.get("prompt_tokens", 0)),
                                             completion_tokens=int(u.get("completion_tokens", 0)))
                        for choice in chunk.get("choices") or []:
                            finish = choice.get("finish_reason") or finish
                            delta = choice.get("delta") or {}
                            text = delta.get("content") or ""
                            calls = [ToolCallDelta.model_validate(c)
                                     for c in delta.get("tool_calls") or []]
                            if (text or calls) and not request.prefill_only:
                                yielded = True
                                yield LlmDelta(text=text, tool_calls=calls or None)
                break
            except httpx.HTTPError as exc:
                self.replicas.failed(replica, f"{type(exc).__name__}: {exc}")
                if attempt == 0 and not yielded:
                    continue  # died before its first token: the request moves, once
                raise LlmError(f"LLM server unreachable at {url}: {exc}", code="unavailable",
                               status=503) from exc
            finally:
                # mid-body: closes the connection, the server aborts
                await _close_shielded(resp)
                self.replicas.finished(replica)
        if finish is not None or usage is not None:
            yield LlmDelta(finish_reason=finish or "stop", usage=usage)

    async def context_window(self) -> int | None:
        """The served model's context window: ``max_model_len`` of its ``/v1/models`` entry
        (vLLM and our service report it). Asked once and cached; None when the server does
        not say. Never raises: an unreachable server gives None and is asked again next
        time, with a short timeout so a hung server cannot hold a reply for long."""
        if self._window_known:
            return self._window
        async with self._window_lock:
            if self._window_known:
                return self._window
            try:
                resp = await self._http.get(f"{self.base_url}/models", headers=self._headers,
                                            timeout=_MODELS_TIMEOUT_S)
            except httpx.HTTPError:
                return None
            self._window = _max_model_len(resp, self.model)
            self._window_known = True
            return self._window

    async def list_models(self) -> list[str]:
        resp = await self._http.get(f"{self.base_url}/models", headers=self._headers)
        if resp.status_code != 200:
            raise _http_error(resp.status_code, resp.content)
        return [str(m["id"]) for m in resp.json().get("data", [])]

    async def aclose(self) -> None:
        await self.replicas.aclose()
        if self._owns_http:
            await self._http.aclose()


def _max_model_len(resp: httpx.Response, model: str) -> int | None:
    """``max_model_len`` of ``model`` in a ``/v1/models`` answer (of its only entry when no
    id matches); None when absent or malformed."""
    if resp.status_code != 200:
        return None
    try:
        data = resp.json().get("data")
    except (ValueError, AttributeError):
        return None
    if not isinstance(data, list):
        return None
    entries = [m for m in data if isinstance(m, dict)]
    matching = [m for m in entries if m.get("id") == model]
    chosen = matching or (entries if len(entries) == 1 else [])
    value = chosen[0].get("max_model_len") if chosen else None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _parse_chunk(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError as exc:
        raise LlmError(f"malformed SSE chunk from LLM server: {data[:200]!r}",
                       code="bad_upstream", status=502) from exc
    if not isinstance(chunk, dict):
        raise LlmError("SSE chunk is not a JSON object", code="bad_upstream", status=502)
    if "error" in chunk:
        err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk["error"]}
        raise LlmError(f"LLM server error mid-stream: {err.get('message')}",
                       code=str(err.get("code") or "llm_error"), status=502)
    return chunk


def _http_error(status: int, raw: bytes) -> LlmError:
    message = raw.decode("utf-8", "replace")[:500]
    code = "http_error"
    try:
        err = json.loads(raw).get("error") or {}
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            code = str(err.get("code") or code)
    except (ValueError, AttributeError):
        pass
    return LlmError(f"LLM server returned {status}: {message}", code=code, status=status)
