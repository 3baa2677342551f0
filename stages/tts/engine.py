"""In-process piper TTS engine (``PiperTts``) and its streaming sessions.

Design decisions:
- The ONNX session is built here rather than by ``PiperVoice.load`` so the CPU thread
  count is honoured and a missing CUDA provider fails at startup with a clear message.
  Alignments come from patching the model in memory (piper's own helper, needs `onnx`).
- Each stream cuts its text into phrases as tokens arrive (``phrases.PhraseCutter``) and
  a per-stream worker task synthesizes them in order on a shared thread pool: piper never
  runs on the event loop, and phrase N+1 is synthesized while phrase N is being played.
- Each phrase is resampled on its own with soxr (one-shot). Piper pads every sentence
  with silence, so there are no clicks at chunk edges, and each chunk keeps exactly the
  duration of its source audio, which keeps word timings exact at any output rate.
- Queues are bounded (settings.queue_size); ``aclose`` drops pending text and stops
  between sentences of the phrase in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime
from piper import PiperVoice
from piper.config import PiperConfig, SynthesisConfig

from stages.common.audio import Float32Array, Int16Array, float_to_pcm16, resample
from stages.common.cpu import onnx_session_options
from stages.common.load import WorkMeter
from stages.common.metrics import (
    TTS_ACTIVE_STREAMS,
    TTS_AUDIO_SECONDS,
    TTS_SYNTH_SECONDS,
    TTS_TTFA_SECONDS,
)
from stages.tts.alignment import PhonemeSpan, word_timings
from stages.tts.phrases import PhraseBounds, PhraseCutter
from stages.tts.settings import TtsSettings
from stages.tts.types import SUPPORTED_RATES, TtsChunk, TtsError, TtsWord

if TYPE_CHECKING:
    from stages.tts.types import TtsBackend, TtsStream

log = logging.getLogger(__name__)

# OpenAI voice names are accepted as aliases of the default voice (API compatibility).
OPENAI_VOICES = frozenset(
    "alloy ash ballad coral echo fable nova onyx sage shimmer verse marin cedar".split()
)
_CUDA = "CUDAExecutionProvider"


def _providers(device: str) -> list[str | tuple[str, dict[str, Any]]]:
    available = onnxruntime.get_available_providers()
    if device == "cuda" and _CUDA not in available:
        raise RuntimeError(
            "device=cuda but onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu "
            "(pip install 'cascade[gpu]') or run with --device cpu")
    if device == "cuda" or (device == "auto" and _CUDA in available):
        return [(_CUDA, {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC"}),
                "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_voice(settings: TtsSettings) -> PiperVoice:
    """Build the piper voice: ONNX session on the chosen device, alignments patched in."""
    with open(settings.config_path, encoding="utf-8") as f:
        config = PiperConfig.from_dict(json.load(f))
    model: str | bytes = settings.model_path
    if settings.include_alignments:
        try:
            import onnx
            from piper.patch_voice_with_alignment import add_alignment_output

            proto = onnx.load(settings.model_path)
            add_alignment_output(proto)
            model = proto.SerializeToString()
        except ImportError:
            log.warning("onnx is not installed: word timings disabled")
        except ValueError as exc:  # already patched on disk, or no Ceil tensor
            log.info("model used as-is for alignments: %s", exc)
    providers = _providers(settings.device)
    opts = onnx_session_options(settings.cpu_threads)
    session = onnxruntime.InferenceSession(model, sess_options=opts, providers=providers)
    if settings.device == "cuda" and _CUDA not in session.get_providers():
        raise RuntimeError("device=cuda but the CUDA provider failed to initialise "
                           "(check the CUDA/cuDNN libraries); run with --device cpu")
    return PiperVoice(session=session, config=config)


class PiperTts:
    """Piper engine implementing ``TtsBackend``. Construction loads the model (blocking)."""

    def __init__(self, settings: TtsSettings | None = None) -> None:
        self.settings = settings or TtsSettings()
        self.voice = load_voice(self.settings)
        self.source_rate = self.voice.config.sample_rate
        self.bounds = PhraseBounds(self.settings.first_min_words, self.settings.first_max_words,
                                   self.settings.later_min_chars, self.settings.later_max_chars,
                                   self.settings.phrase_ramp)
        self.executor = ThreadPoolExecutor(max(1, self.settings.synth_workers),
                                           thread_name_prefix="piper")
        # Phrases waiting for / running on the executor: the replica's load.
        self.meter = WorkMeter(max(1, self.settings.synth_workers))
        self._streams: set[PiperTtsStream] = set()
        self._phonemize_word = functools.lru_cache(maxsize=8192)(self._phonemize_word_uncached)

    def warmup(self) -> None:
        """One short synthesis (blocking): onnxruntime plans and allocates on first use."""
        self.render("Hello there.", self.source_rate, 1.0, threading.Event())

    # --- validation shared with the service ---

    def resolve_voice(self, voice: str | None) -> str:
        if voice is None or voice == self.settings.voice_name or voice in OPENAI_VOICES:
            return self.settings.voice_name
        raise TtsError(f"unknown voice {voice!r}; available: {self.settings.voice_name} "
                       "(OpenAI voice names are aliases of it)", "unknown_voice")

    @staticmethod
    def check_rate(sample_rate: int) -> None:
        if sample_rate not in SUPPORTED_RATES:
            raise TtsError(f"unsupported sample_rate {sample_rate}; supported: "
                           f"{', '.join(map(str, SUPPORTED_RATES))}", "unsupported_sample_rate")

    def check_text(self, text: str) -> None:
        if not text.strip():
            raise TtsError("input text is empty", "empty_text")
        if len(text) > self.settings.max_text_chars:
            raise TtsError(f"input text too long ({len(text)} chars; max "
                           f"{self.settings.max_text_chars})", "text_too_long")

    # --- TtsBackend ---

    async def open_stream(self, *, voice: str | None = None, sample_rate: int = 24000,
                          speed: float = 1.0) -> PiperTtsStream:
        self.resolve_voice(voice)
        self.check_rate(sample_rate)
        if not 0.25 <= speed <= 4.0:
            raise TtsError(f"speed must be within 0.25..4.0, got {speed}", "invalid_speed")
        base = self.settings.length_scale or self.voice.config.length_scale
        stream = PiperTtsStream(self, sample_rate, base / speed)
        self._streams.add(stream)
        return stream

    async def synthesize(self, text: str, *, voice: str | None = None,
                         sample_rate: int = 24000, speed: float = 1.0) -> list[TtsChunk]:
        self.check_text(text)
        stream = await self.open_stream(voice=voice, sample_rate=sample_rate, speed=speed)
        try:
            await stream.push_text(text)
            await stream.flush()
            return [chunk async for chunk in stream.chunks()]
        finally:
            await stream.aclose()

    async def aclose(self) -> None:
        for stream in list(self._streams):
            await stream.aclose()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # --- blocking work, run on the executor ---

    def _phonemize_word_uncached(self, word: str) -> str:
        return "".join("".join(s) for s in self.voice.phonemize(word))

    def render(self, text: str, sample_rate: int, length_scale: float,
               cancel: threading.Event) -> tuple[Int16Array, list[TtsWord] | None]:
        """Synthesize one phrase: pcm16 at ``sample_rate`` and its word timings."""
        if not any(c.isalnum() for c in text):
            return np.zeros(0, dtype=np.int16), []
        syn = SynthesisConfig(length_scale=length_scale, noise_scale=self.settings.noise_scale,
                              noise_w_scale=self.settings.noise_w_scale)
        parts: list[Float32Array] = []
        spans: list[PhonemeSpan] = []
        aligned = self.settings.include_alignments
        offset = 0
        for chunk in self.voice.synthesize(text, syn, include_alignments=aligned):
            if cancel.is_set():
                break
            audio: Float32Array = chunk.audio_float_array
            parts.append(audio)
            if aligned and chunk.phoneme_alignments is not None:
                pos = offset
                for a in chunk.phoneme_alignments:
                    spans.append(PhonemeSpan(a.phoneme, pos, pos + int(a.num_samples)))
                    pos += int(a.num_samples)
                aligned = pos == offset + len(audio)
            else:
                aligned = False
            offset += len(audio)
        if not parts:
            return np.zeros(0, dtype=np.int16), ([] if not cancel.is_set() else None)
        source = parts[0] if len(parts) == 1 else np.concatenate(parts)
        out = float_to_pcm16(resample(source, self.source_rate, sample_rate))
        words: list[TtsWord] | None = None
        if aligned and not cancel.is_set():
            try:
                words = word_timings(text, spans, self.source_rate, self._phonemize_word)
            except Exception:  # never fail a phrase because of timings
                log.exception("word alignment failed for %r", text)
        if words:
            limit = len(out) * 1000.0 / sample_rate
            for w in words:
                w.start_ms = min(w.start_ms, limit)
                w.end_ms = min(w.end_ms, limit)
        return out, words


class PiperTtsStream:
    """One streaming synthesis: push text, flush, iterate chunks; implements ``TtsStream``."""

    def __init__(self, engine: PiperTts, sample_rate: int, length_scale: float) -> None:
        self._engine = engine
        self.sample_rate = sample_rate
        self._length_scale = length_scale
        size = engine.settings.queue_size
        self._cutter = PhraseCutter(engine.bounds)
        self._hard_max = 4 * engine.bounds.later_max_chars
        self._phrases: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue(size)
        self._out: asyncio.Queue[TtsChunk | BaseException | None] = asyncio.Queue(size)
        self._cancel = threading.Event()
        self._flushed = False
        self._closed = False
        self._ended = False  # the consumer has seen the end of the chunks
        self._t_text: float | None = None
        self._worker = asyncio.create_task(self._run())
        TTS_ACTIVE_STREAMS.inc()

    async def push_text(self, text: str) -> None:
        if self._closed:
            raise TtsError("stream is closed", "stream_closed")
        if self._flushed:
            raise TtsError("stream already flushed; open a new stream", "stream_flushed")
        if not text:
            return
        if self._t_text is None:
            self._t_text = time.perf_counter()
        offset = self._cutter.offset
        phrases = self._cutter.push(text)
        if len(self._cutter.pending) > self._hard_max:  # pathological: no whitespace at all
            phrases.append(self._cutter.take_pending())
        for phrase in phrases:
            await self._phrases.put((offset, phrase))
            offset += len(phrase)

    async def flush(self) -> None:
        if self._closed or self._flushed:
            return
        self._flushed = True
        offset = self._cutter.offset
        for phrase in self._cutter.finish():
            await self._phrases.put((offset, phrase))
            offset += len(phrase)
        await self._phrases.put(None)

    async def chunks(self) -> AsyncIterator[TtsChunk]:
        while not self._ended:
            item = await self._out.get()
            if item is None:
                self._ended = True
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancel.set()
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        for q in (self._phrases, self._out):
            while not q.empty():
                q.get_nowait()
        self._out.put_nowait(None)  # ends a consumer waiting in chunks()
        self._ended = True
        self._engine._streams.discard(self)
        TTS_ACTIVE_STREAMS.dec()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self._engine
        index = 0
        try:
            while (item := await self._phrases.get()) is not None:
                offset, text = item
                t0 = time.perf_counter()
                audio, words = await loop.run_in_executor(
                    engine.executor, engine.meter.wrap(engine.render), text, self.sample_rate,
                    self._length_scale, self._cancel)
                TTS_SYNTH_SECONDS.observe(time.perf_counter() - t0)
                duration_s = len(audio) / self.sample_rate
                TTS_AUDIO_SECONDS.inc(duration_s)
                if index == 0 and self._t_text is not None:
                    TTS_TTFA_SECONDS.observe(time.perf_counter() - self._t_text)
                await self._out.put(TtsChunk(
                    index=index, text=text, text_offset=offset, audio=audio.tobytes(),
                    sample_rate=self.sample_rate, duration_ms=duration_s * 1000.0,
                    words=words))
                index += 1
            await self._out.put(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("TTS synthesis failed")
            await self._out.put(exc)


if TYPE_CHECKING:
    def _implements(engine: PiperTts, stream: PiperTtsStream) -> tuple[TtsBackend, TtsStream]:
        return engine, stream  # mypy checks the engine against the Protocols
