"""Per-stream state of streaming recognition: the audio window, the decode loop, partials.

Design (why it looks like this)
-------------------------------
Whisper pads every input to 30 s, so one decode costs about the same (~0.4 s for tiny.en
on 2 CPU cores) whether the window holds 1 s or 20 s of audio. Streaming therefore means
*re-decoding the growing window* periodically rather than decoding small chunks:

* ``push()`` copies the audio into a preallocated float32 window (bounded: when it is full,
  ``push`` awaits until the decode loop has trimmed it — that is the backpressure).
* One decode loop task per stream wakes on new audio and re-decodes the whole uncommitted
  window, at most one decode in flight per stream. The pace is adaptive: the next decode
  starts no sooner than ``max(decode_interval_s, decode_cost_factor * recent decode time)``
  after the previous one started, so a busy CPU (many streams) automatically decodes each
  stream less often instead of queueing work.
* Local agreement (``agreement.py``) commits the words on which two consecutive
  hypotheses agree. Committed text is the ``stable`` part of each partial and never
  changes; the rest of the latest hypothesis is ``unstable``.
* After each decode the window is cut after committed words, so it stays short in long
  turns (decode cost grows with the text in the window) and ``finalize()`` only decodes the
  uncommitted tail. The cut goes in the middle of the latest real pause (>= 160 ms of quiet
  20 ms frames) before the first uncommitted word: Whisper's word timestamps are often
  0.1-0.3 s off, and a window that starts mid-word makes tiny models mishear or drop
  words. Only when the window outgrows ``trim_window_s`` without any pause is it cut at
  the widest gap between committed words' timestamps. Committed text before the cut is
  passed as the prompt (previous-text context); committed words still inside the window
  are removed from each new hypothesis (``agreement.strip_committed``). If agreement stalls
  and the window exceeds ``max_window_s``, older tentative words are committed by force.
* ``finalize()``: if the last *finished* decode heard all the speech and only silence came
  after it (the usual case when the caller finalizes after a VAD silence), its hypothesis
  is reused at once — even while another decode is in flight (that result is dropped) —
  so finalize is nearly free. Otherwise it waits for the decode in flight, and decodes the
  uncommitted tail once more only if speech arrived after that decode's window.
* ``end_of_speech(ms)``: the caller's VAD heard a pause. The next decode starts at once
  (no waiting for the decode interval), so a hypothesis covering the whole utterance is
  ready ~one decode after the pause begins; with ``finalize()`` after the endpoint that
  decode is the final one. This is what lets the turn controller start the reply
  speculatively during the pause.
* No decode is scheduled while only silence arrived since the last one (the pause in
  which the reply starts speculatively is when the CPU matters most).
* Hypothesis words lying on digital silence are dropped (Whisper's "Thank you." on
  pauses).

The session knows nothing about Whisper: it calls a ``Decoder`` (window audio, prompt,
language) -> words with times relative to the window start, provided by the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np

from stages.asr.agreement import LocalAgreement, join_words
from stages.asr.types import AsrFinal, AsrPartial, AsrWord
from stages.common.audio import ASR_RATE, Float32Array, Int16Array, pcm16_from_bytes
from stages.common.metrics import ASR_ACTIVE_STREAMS, ASR_AUDIO_SECONDS, ASR_FINALIZE_SECONDS

log = logging.getLogger(__name__)

# (window audio, prompt, language, kind) -> words, times relative to the window start.
Decoder = Callable[[Float32Array, str | None, str | None, str], Awaitable[list[AsrWord]]]

_PROMPT_CHARS = 200  # committed text passed back as the prompt (Whisper keeps ~224 tokens)
_FRAME = 320  # 20 ms analysis frames for pause detection
_MIN_PAUSE_FRAMES = 8  # 160 ms


class StreamClosedError(RuntimeError):
    """push()/finalize() on a stream that was already finalized or closed."""


class StreamConfig:
    """The knobs a session needs (a subset of AsrSettings, kept small for unit tests)."""

    def __init__(
        self,
        *,
        decode_interval_s: float = 0.35,
        decode_cost_factor: float = 1.0,
        min_decode_audio_s: float = 0.5,
        max_window_s: float = 20.0,
        trim_window_s: float = 4.0,
        silence_rms: float = 0.006,
        queue_size: int = 256,
    ) -> None:
        self.decode_interval_s = decode_interval_s
        self.decode_cost_factor = decode_cost_factor
        self.min_decode_audio_s = min_decode_audio_s
        self.max_window_s = max_window_s
        self.trim_window_s = trim_window_s
        self.silence_rms = silence_rms
        self.queue_size = queue_size


class WhisperStream:
    """Implements ``AsrStream`` on top of a ``Decoder``. Create via ``WhisperAsr.open_stream``."""

    def __init__(
        self,
        decoder: Decoder,
        config: StreamConfig,
        *,
        language: str | None = None,
        prompt: str | None = None,
        on_close: Callable[[WhisperStream], None] | None = None,
    ) -> None:
        self._decoder = decoder
        self._cfg = config
        self._language = language
        self._user_prompt = prompt.strip() if prompt else None
        self._on_close = on_close
        # Window: capacity = max window + 5 s of slack for audio arriving during a decode.
        self._buf = np.zeros(int((config.max_window_s + 5.0) * ASR_RATE), dtype=np.float32)
        self._len = 0  # samples in the window
        self._window_start = 0  # absolute sample index of _buf[0]
        self._total = 0  # samples received
        self._decoded_upto = 0  # absolute end sample covered by the latest hypothesis
        self._agree = LocalAgreement()
        self._revision = 0
        self._decodes = 0
        self._cost_ema = 0.0
        self._last_decode_start = -1e9
        self._urgent = False  # end_of_speech(): decode now, skip the interval
        self._partials: asyncio.Queue[AsrPartial | None] = asyncio.Queue(
            maxsize=max(2, config.queue_size)
        )
        self._audio_event = asyncio.Event()
        self._space_event = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._closing = False
        self._decoding = False  # a decode of this stream is in flight
        self._decode_started_at = 0  # absolute end sample of the window in flight
        self._abandon = False  # finalize() went ahead without the decode in flight
        self._closed = False
        self._final: AsrFinal | None = None
        self._finalize_lock = asyncio.Lock()
        self._loop_task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            self._decode_loop()
        )
        ASR_ACTIVE_STREAMS.inc()

    # ----------------------------------------------------------------- AsrStream API
    @property
    def audio_ms(self) -> int:
        return self._total * 1000 // ASR_RATE

    @property
    def window_seconds(self) -> float:
        """Length of the audio window the next decode would see."""
        return self._len / ASR_RATE

    @property
    def decodes(self) -> int:
        """Decodes run so far (partial and final)."""
        return self._decodes

    async def push(self, pcm16: bytes) -> None:
        await self.push_samples(pcm16_from_bytes(pcm16))

    async def push_samples(self, samples: Int16Array | Float32Array) -> None:
        """Append 16 kHz samples (int16, or float32 in [-1, 1] from a resampler)."""
        if self._closing:
            raise StreamClosedError("stream is finalized or closed")
        if samples.size == 0:
            return
        scale = np.float32(1.0 / 32768.0) if samples.dtype == np.int16 else np.float32(1.0)
        pos = 0
        while pos < samples.size:
            room = self._buf.size - self._len
            if room == 0:
                # Bounded buffer full: wait for the decode loop to trim the window.
                self._space_event.clear()
                self._audio_event.set()
                await self._space_event.wait()
                if self._closing:
                    raise StreamClosedError("stream is finalized or closed")
                continue
            take = min(room, samples.size - pos)
            dst = self._buf[self._len : self._len + take]
            np.multiply(samples[pos : pos + take], scale, out=dst, casting="unsafe")
            self._len += take
            self._total += take
            pos += take
        ASR_AUDIO_SECONDS.inc(samples.size / ASR_RATE)
        self._audio_event.set()

    async def partials(self) -> AsyncIterator[AsrPartial]:
        while True:
            item = await self._partials.get()
            if item is None:
                return
            yield item

    async def end_of_speech(self, audio_ms: int) -> None:
        if self._closing:
            return
        end = min(self._total, audio_ms * ASR_RATE // 1000)
        if self._decoded_upto < end or (self._decoding and self._decode_started_at < end):
            self._urgent = True
            self._audio_event.set()
            self._stop_event.set()  # cut short a wait for the decode interval

    async def finalize(self) -> AsrFinal:
        async with self._finalize_lock:
            if self._final is not None:
                return self._final
            if self._closed:
                raise StreamClosedError("stream was closed")
            t0 = time.perf_counter()
            if self._decoding and self._tail_is_quiet():
                # The last finished decode already heard all the speech; only silence came
                # after it. Reuse its hypothesis now instead of waiting for the decode in
                # flight (its result is dropped).
                self._abandon = True
                self._closing = True
                self._stop_event.set()
                self._space_event.set()
                self._agree.commit_all()
            else:
                await self._stop_loop()
                if self._needs_final_decode():
                    self._agree.commit_all(await self._decode_window("final"))
                else:
                    self._agree.commit_all()  # reuse the latest hypothesis
            finalize_ms = (time.perf_counter() - t0) * 1000.0
            ASR_FINALIZE_SECONDS.observe(finalize_ms / 1000.0)
            self._final = AsrFinal(
                text=join_words(self._agree.committed),
                words=list(self._agree.committed),
                audio_ms=self.audio_ms,
                finalize_ms=finalize_ms,
            )
            self._finish()
            return self._final

    async def aclose(self) -> None:
        if self._closed:
            return
        await self._stop_loop()
        self._finish()

    # ----------------------------------------------------------------- internals
    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        ASR_ACTIVE_STREAMS.dec()
        self._emit(None)
        if self._on_close is not None:
            self._on_close(self)

    async def _stop_loop(self) -> None:
        self._closing = True
        self._stop_event.set()
        self._audio_event.set()
        self._space_event.set()
        # A decode already running in a thread cannot be interrupted: let it finish, its
        # hypothesis is the freshest one available (and often all finalize needs).
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._loop_task)

    def _tail_is_quiet(self) -> bool:
        """True if a decode has finished and only silence was pushed after its window."""
        if self._decoded_upto <= self._window_start:
            return False
        tail = self._buf[self._decoded_upto - self._window_start : self._len]
        return _rms(tail) < self._quiet_threshold()

    def _quiet_threshold(self) -> float:
        """Absolute floor, or 10 % of the loud (90th percentile) 20 ms frames of the window."""
        nf = self._len // _FRAME
        if nf == 0:
            return self._cfg.silence_rms
        frames = self._buf[: nf * _FRAME].reshape(nf, _FRAME)
        loud = float(np.percentile(np.sqrt(np.mean(np.square(frames), axis=1)), 90))
        return max(self._cfg.silence_rms, 0.1 * loud)

    def _needs_final_decode(self) -> bool:
        if self._len == 0 or self._window_start + self._len <= self._decoded_upto:
            return False  # nothing new since the last decode
        if self._tail_is_quiet():
            return False  # only silence since the last decode: reuse its hypothesis
        # Nothing decoded yet and the whole window is silence: nothing to transcribe.
        return not (self._decoded_upto <= self._window_start
                    and _rms(self._buf[: self._len]) < self._cfg.silence_rms)

    def _interval(self) -> float:
        return max(self._cfg.decode_interval_s, self._cfg.decode_cost_factor * self._cost_ema)

    async def _decode_loop(self) -> None:
        min_samples = int(self._cfg.min_decode_audio_s * ASR_RATE)
        while not self._closing:
            await self._audio_event.wait()
            self._audio_event.clear()
            if self._closing:
                break
            if self._len < min_samples or self._window_start + self._len <= self._decoded_upto:
                continue
            if not self._urgent and self._tail_is_quiet():
                # Only silence since the last decode: it would hear nothing new (finalize
                # reuses that decode too). Skipping it leaves the CPU to the reply that
                # starts in this pause.
                continue
            wait = self._last_decode_start + self._interval() - time.monotonic()
            if self._urgent:
                self._urgent = False
                wait = 0.0
            if wait > 0:
                # _stop_event cuts the wait short: closing, or end_of_speech() (decode now).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_event.wait(), timeout=wait)
                if self._closing:
                    break
                self._stop_event.clear()
                self._urgent = False
            try:
                hyp = await self._decode_window("partial")
            except Exception:
                # A failed partial decode must not kill the stream: finalize() retries.
                log.exception("partial decode failed")
                continue
            if self._abandon:
                break
            self._agree.update(hyp)
            self._trim()
            self._revision += 1
            self._emit(
                AsrPartial(
                    stable=self._agree.stable_text,
                    unstable=self._agree.unstable_text,
                    audio_ms=self._decoded_upto * 1000 // ASR_RATE,
                    revision=self._revision,
                )
            )
            if self._window_start + self._len > self._decoded_upto:
                self._audio_event.set()  # audio arrived meanwhile: schedule the next decode

    async def _decode_window(self, kind: str) -> list[AsrWord]:
        n = self._len
        start = self._window_start
        offset = start / ASR_RATE
        self._last_decode_start = time.monotonic()
        self._decodes += 1
        t0 = time.perf_counter()
        prompt = self._prompt()
        self._decoding = True
        self._decode_started_at = start + n
        try:
            rel = await self._decoder(self._buf[:n], prompt, self._language, kind)
        finally:
            self._decoding = False
        cost = time.perf_counter() - t0
        self._cost_ema = cost if self._cost_ema == 0.0 else 0.7 * self._cost_ema + 0.3 * cost
        self._decoded_upto = start + n
        if log.isEnabledFor(logging.DEBUG):
            log.debug("decode %s window=%.2f-%.2fs cost=%.3fs prompt=%r -> %s", kind, offset,
                      (start + n) / ASR_RATE, cost, prompt,
                      " ".join(f"{w.word.strip()}@{w.start:.2f}" for w in rel))
        words = []
        for w in rel:
            # A "word" over digital silence is a Whisper hallucination ("Thank you.").
            # Word times are only roughly right: judge the word's span widened by 0.1 s.
            a = max(0, int((w.start - 0.1) * ASR_RATE))
            b = min(n, max(a + 1, int((w.end + 0.1) * ASR_RATE)))
            if _rms(self._buf[a:b]) < self._cfg.silence_rms:
                continue
            words.append(AsrWord(word=w.word, start=round(w.start + offset, 3),
                                 end=round(w.end + offset, 3), probability=w.probability))
        return words

    def _prompt(self) -> str | None:
        committed = self._agree.prompt_text()
        parts = [p for p in (self._user_prompt, committed) if p]
        if not parts:
            return None
        return " ".join(parts)[-_PROMPT_CHARS:]

    def _trim(self) -> None:
        """Cut the window after committed words (see the module docstring for the policy)."""
        ag = self._agree
        window_end = (self._window_start + self._len) / ASR_RATE
        forced = self._len > self._cfg.max_window_s * ASR_RATE
        if forced:
            # Agreement stalled (noise, mumbling): commit tentative words older than 5 s.
            ag.commit_until(window_end - 5.0)
        # A cut before the first uncommitted word can never lose uncommitted speech.
        limit_s = ag.tentative[0].start if ag.tentative else self._decoded_upto / ASR_RATE
        cut_s = self._pause_cut(min(limit_s, window_end))
        first, last = ag.window_from, len(ag.committed) - 1
        if cut_s is None and last >= first and (
            forced or self._len > self._cfg.trim_window_s * ASR_RATE
        ):
            # Continuous speech: cut between committed words at the widest timestamp gap.
            i = max(range(first, last + 1),
                    key=lambda i: (round(self._next_start(i) - ag.committed[i].end, 2), i))
            end = ag.committed[i].end
            cut_s = (end + max(end, self._next_start(i))) / 2.0
        if cut_s is None and forced:
            cut_s = window_end - 5.0
        if cut_s is None:
            return
        n = ag.window_from
        while n < len(ag.committed) and (ag.committed[n].start + ag.committed[n].end) / 2 < cut_s:
            n += 1
        ag.window_from = n
        log.debug("cut window at %.2fs (%d committed words before it)", cut_s, n)
        cut = min(int(cut_s * ASR_RATE), self._window_start + self._len)
        drop = cut - self._window_start
        if drop <= 0:
            return
        keep = self._len - drop
        self._buf[:keep] = self._buf[drop : self._len]
        self._len = keep
        self._window_start = cut
        self._space_event.set()

    def _pause_cut(self, limit_s: float) -> float | None:
        """Middle of the latest pause (>= 150 ms of quiet 20 ms frames) before ``limit_s``.

        Cutting inside a real pause is robust: Whisper's word timestamps are often 0.1-0.3 s
        off, and a window that starts mid-word makes it mishear or drop words.
        """
        end = min(self._len, int(limit_s * ASR_RATE) - self._window_start)
        nf = max(0, end) // _FRAME
        if nf < _MIN_PAUSE_FRAMES:
            return None
        frames = self._buf[: nf * _FRAME].reshape(nf, _FRAME)
        rms = np.sqrt(np.mean(np.square(frames), axis=1))
        threshold = max(self._cfg.silence_rms, 0.1 * float(np.percentile(rms, 90)))
        quiet = rms < threshold
        run_end = None
        i = nf - 1
        while i >= 0:
            if quiet[i]:
                j = i
                while j >= 0 and quiet[j]:
                    j -= 1
                if i - j >= _MIN_PAUSE_FRAMES:
                    run_end = i + 1
                    run_start = j + 1
                    break
                i = j
            else:
                i -= 1
        if run_end is None:
            return None
        mid = (run_start + run_end) * _FRAME // 2
        return (self._window_start + mid) / ASR_RATE

    def _next_start(self, i: int) -> float:
        ag = self._agree
        if i + 1 < len(ag.committed):
            return ag.committed[i + 1].start
        return ag.tentative[0].start if ag.tentative else ag.committed[i].end

    def _emit(self, item: AsrPartial | None) -> None:
        # Partials supersede each other: if the consumer lags, drop the oldest one.
        while True:
            try:
                self._partials.put_nowait(item)
                return
            except asyncio.QueueFull:
                self._partials.get_nowait()


def _rms(x: Float32Array) -> float:
    if x.size == 0:
        return 0.0
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float32))))
