"""One user turn's streaming ASR, fed without ever making the caller wait on the stage.

The turn controller runs VAD and barge-in on every 20 ms client frame; it must never
block on the ASR stage (a remote ASR service may be slow, hung or gone). So audio is
handed to :meth:`AsrTurn.feed`, a plain append to a bounded buffer, and a feeder task
opens the stage's stream and pushes the buffer in the background. A stage that cannot
keep up (buffer full), fails, or misses its deadline marks the turn ``failed``; the turn
then ends on the newest hypothesis it had (possibly empty) instead of waiting.

Positions: the turn records ``origin``, the session sample (16 kHz audio clock) of the
first sample fed, so a hypothesis's ``audio_ms`` (counted from the stream's start) maps
onto the session's clock. Turn 30 of a connection compares positions exactly like turn 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from stages.asr.types import AsrBackend, AsrPartial, AsrStream

log = logging.getLogger(__name__)
RATE = 16_000

OnPartial = Callable[["AsrTurn", AsrPartial], Awaitable[None]]


@dataclass(frozen=True)
class AsrResult:
    """How a turn's transcription ended: ``text`` is the final transcript, or the last
    hypothesis when ``error`` says why the final one could not be had."""

    text: str
    error: str | None = None


class AsrTurn:
    def __init__(self, backend: AsrBackend, *, turn: int, origin: int, on_partial: OnPartial,
                 open_timeout_s: float = 5.0, max_pending_ms: int = 30_000,
                 coalesce_ms: int = 60) -> None:
        self.turn = turn
        self.origin = origin
        self.latest: AsrPartial | None = None
        self.sent_stable = ""  # the stable prefix already sent as transcription deltas
        self.error: str | None = None
        self.samples = 0  # audio fed so far
        self._backend = backend
        self._on_partial = on_partial
        self._open_timeout_s = open_timeout_s
        self._max_pending = max_pending_ms * RATE // 1000 * 2  # bytes
        # Audio goes to the stage in pushes of >= coalesce_ms (clients send 20 ms frames:
        # one WebSocket message per frame was most of the feeder's cost); an end of
        # speech or the end of the turn sends what is pending at once.
        self._coalesce_bytes = coalesce_ms * RATE // 1000 * 2
        # Audio, and end-of-speech hints (an int: stream ms) kept in order with it.
        self._pending: deque[bytes | int] = deque()
        self._pending_bytes = 0
        self._wake = asyncio.Event()
        self._input_done = False
        self._stream: AsrStream | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._feeder = asyncio.create_task(self._feed_loop(), name=f"asr-feed-{turn}")

    # ------------------------------------------------------------------ caller side
    def feed(self, pcm16: bytes) -> None:
        """Queue 16 kHz pcm16 for the stage. Never waits; drops audio once failed."""
        if self.error is not None or self._input_done or not pcm16:
            return
        if self._pending_bytes + len(pcm16) > self._max_pending:
            self._fail(f"the ASR stage fell {self._pending_bytes // 32} ms behind")
            return
        self._pending.append(pcm16)
        self._pending_bytes += len(pcm16)
        self.samples += len(pcm16) // 2
        if self._pending_bytes >= self._coalesce_bytes:
            self._wake.set()

    def end_of_speech(self, sample: int) -> None:
        """The VAD heard the speech pause at session sample ``sample``: the stage decodes
        up to there at once (``AsrStream.end_of_speech``), after the audio before it."""
        if self.error is not None or self._input_done:
            return
        self._pending.append(max(0, (sample - self.origin) * 1000 // RATE))
        self._wake.set()

    def covered_until(self) -> int:
        """Session sample up to which the newest hypothesis has heard the audio."""
        if self.latest is None:
            return self.origin
        return self.origin + self.latest.audio_ms * RATE // 1000

    def hypothesis(self) -> str:
        latest = self.latest
        if latest is None:
            return ""
        # Both parts are stripped on the wire: "order a" + "pizza." is two words.
        return " ".join(part for part in (latest.stable.strip(), latest.unstable.strip()) if part)

    async def finish(self, timeout_s: float) -> AsrResult:
        """No more audio: the final transcript within ``timeout_s``, else the newest
        hypothesis with the reason. The stream is closed in the background."""
        self._input_done = True
        self._wake.set()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.wait({self._feeder})
                stream = self._stream
                if self.error is None and stream is not None and not self._feeder.cancelled():
                    final = await stream.finalize()
                    return AsrResult(final.text.strip())
        except TimeoutError:
            self._fail(f"the ASR stage gave no final transcript within {timeout_s:g} s")
        except Exception as exc:  # the stage failed (connection lost, error event)
            self._fail(f"the ASR stage failed: {type(exc).__name__}: {exc}")
        finally:
            self.close()
        return AsrResult(self.hypothesis(), self.error)

    def close(self) -> None:
        """Abandon the turn now; the stage's stream is closed in the background."""
        self._input_done = True
        self._wake.set()
        if not self._feeder.done():
            self._feeder.cancel()
        stream, self._stream = self._stream, None
        watcher, self._watcher = self._watcher, None
        if stream is not None or watcher is not None:
            _background(_close(stream, watcher), f"asr-close-{self.turn}")

    # ------------------------------------------------------------------ feeder
    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
            log.warning("turn %d: %s", self.turn, reason)
        self._pending.clear()
        self._pending_bytes = 0
        if not self._feeder.done() and asyncio.current_task() is not self._feeder:
            self._feeder.cancel()

    async def _feed_loop(self) -> None:
        try:
            async with asyncio.timeout(self._open_timeout_s):
                self._stream = await self._backend.open_stream()
        except TimeoutError:
            self._fail(f"the ASR stage did not open a stream within {self._open_timeout_s:g} s")
            return
        except Exception as exc:
            self._fail(f"the ASR stage refused a stream: {type(exc).__name__}: {exc}")
            return
        stream = self._stream
        self._watcher = asyncio.create_task(self._watch(stream), name=f"asr-partials-{self.turn}")
        try:
            while True:
                while self._pending:
                    chunk = self._pending.popleft()
                    if isinstance(chunk, int):
                        await stream.end_of_speech(chunk)
                        continue
                    if self._pending and not isinstance(self._pending[0], int):
                        chunks = [chunk]
                        while self._pending and not isinstance(self._pending[0], int):
                            chunks.append(self._pending.popleft())  # type: ignore[arg-type]
                        chunk = b"".join(chunks)
                    self._pending_bytes -= len(chunk)
                    await stream.push(chunk)
                if self._input_done:
                    return
                self._wake.clear()
                await self._wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(f"the ASR stage failed: {type(exc).__name__}: {exc}")

    async def _watch(self, stream: AsrStream) -> None:
        try:
            async for partial in stream.partials():
                self.latest = partial
                await self._on_partial(self, partial)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(f"the ASR stage failed: {type(exc).__name__}: {exc}")


_BACKGROUND: set[asyncio.Task[None]] = set()


def _background(coro: Awaitable[None], name: str) -> None:
    task = asyncio.ensure_future(coro)
    task.set_name(name)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


async def _close(stream: AsrStream | None, watcher: asyncio.Task[None] | None,
                 timeout_s: float = 5.0) -> None:
    """Close a stream without letting a hung stage hold anything up for long."""
    if stream is not None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout_s):
                await stream.aclose()
    if watcher is not None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
