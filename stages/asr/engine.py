"""In-process Whisper ASR (faster-whisper / CTranslate2): ``WhisperAsr`` implements AsrBackend.

One ``WhisperModel`` per process, shared by every stream. Inference never runs on the
event loop: decodes go to a small thread pool (``decode_workers`` threads; CTranslate2's
``num_workers`` lets that many run at once on one model). On a 2-core CPU one worker is
right — two concurrent decodes just split the same cores.

Cross-stream batching (GPU)
---------------------------
On a GPU a single decode of tiny/base leaves the device mostly idle, and every stream's
window is padded to the same 30 s mel shape, so windows of *different* streams batch
perfectly: ``batch_decodes=true`` routes decode requests through ``batching.DecodeBatcher``,
which gathers the windows that are pending at the same moment (up to ``max_batch``),
computes their log-mel features, runs ONE ``model.model.encode`` over the stacked
[B, 80, 3000] features and ONE ``model.model.generate`` with a per-stream prompt list
(each stream's committed text as previous-text context), then word timestamps from one
batched ``model.model.align``. A stream still has at most one pending decode, so a batch
holds at most one window per stream. faster-whisper's ``BatchedInferencePipeline`` does
the same for the VAD chunks of *one* file; here the batch spans streams. See
``batching.py`` for the measured CPU numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.transcribe import Segment

from stages.asr.batching import DecodeBatcher
from stages.asr.decode import FULL_CONTEXT_S, decode_windows
from stages.asr.session import StreamConfig, WhisperStream
from stages.asr.settings import AsrSettings
from stages.asr.types import AsrFinal, AsrWord
from stages.common.audio import (
    ASR_RATE,
    AudioFormatError,
    Float32Array,
    pcm16_from_bytes,
    pcm16_to_float,
    resample,
)
from stages.common.load import WorkMeter
from stages.common.metrics import ASR_AUDIO_SECONDS, ASR_DECODE_SECONDS

log = logging.getLogger(__name__)
# faster-whisper logs every decode at INFO ("Processing audio with duration ..."): at a few
# decodes per second per stream that drowns the service log.
logging.getLogger("faster_whisper").setLevel(logging.WARNING)

SUPPORTED_RATES = (8000, 16000, 24000, 48000)


def load_model(settings: AsrSettings) -> WhisperModel:
    device = settings.resolved_device()
    kwargs: dict[str, Any] = {
        "device": device,
        "compute_type": settings.resolved_compute_type(),
        "num_workers": max(1, settings.decode_workers),
    }
    if device == "cuda":
        kwargs["device_index"] = settings.device_index
    else:
        kwargs["cpu_threads"] = settings.cpu_threads
    return WhisperModel(settings.model_path(), **kwargs)


class WhisperAsr:
    """AsrBackend backed by one shared faster-whisper model."""

    def __init__(self, settings: AsrSettings | None = None,
                 model: WhisperModel | None = None) -> None:
        self.settings = settings or AsrSettings()
        self.model = model or load_model(self.settings)
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.settings.decode_workers),
                                        thread_name_prefix="asr-decode")
        # Decodes waiting for / running on the pool: the replica's load (stages/common/load.py).
        self.meter = WorkMeter(max(1, self.settings.decode_workers))
        self._batcher: DecodeBatcher | None = (
            DecodeBatcher(self.model, self._pool, self.settings, self.meter)
            if self.settings.batch_decodes else None
        )
        self._streams: set[WhisperStream] = set()
        self._stream_config = StreamConfig(
            decode_interval_s=self.settings.decode_interval_s,
            decode_cost_factor=self.settings.decode_cost_factor,
            min_decode_audio_s=self.settings.min_decode_audio_s,
            max_window_s=self.settings.max_window_s,
            trim_window_s=self.settings.trim_window_s,
            silence_rms=self.settings.silence_rms,
            queue_size=self.settings.queue_size,
        )

    def warmup(self) -> None:
        """One decode of a second of noise (blocking): CTranslate2 allocates its buffers
        for the context bucket on first use."""
        noise = np.random.default_rng(0).normal(0.0, 0.05, ASR_RATE).astype(np.float32)
        self.decode_sync(noise, None, self.settings.language, "warmup")

    @classmethod
    async def load(cls, settings: AsrSettings | None = None) -> WhisperAsr:
        """Load the model in a thread (keeps the event loop responsive)."""
        return await asyncio.to_thread(cls, settings)

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def queued(self) -> int:
        """Decodes waiting for a pool thread (batched ones included)."""
        waiting = self._batcher.pending if self._batcher is not None else 0
        return self.meter.queued + waiting

    # ----------------------------------------------------------------- AsrBackend
    async def open_stream(self, *, language: str | None = None,
                          prompt: str | None = None) -> WhisperStream:
        stream = WhisperStream(self._decode, self._stream_config,
                               language=language or self.settings.language, prompt=prompt,
                               on_close=self._streams.discard)
        self._streams.add(stream)
        return stream

    async def transcribe(self, pcm16: bytes, sample_rate: int = ASR_RATE,
                         *, language: str | None = None,
                         prompt: str | None = None) -> AsrFinal:
        if sample_rate not in SUPPORTED_RATES:
            raise AudioFormatError(
                f"unsupported sample rate {sample_rate}; use one of {list(SUPPORTED_RATES)}")
        samples = pcm16_from_bytes(pcm16)
        audio = (pcm16_to_float(samples) if sample_rate == ASR_RATE
                 else resample(samples, sample_rate, ASR_RATE))
        ASR_AUDIO_SECONDS.inc(audio.size / ASR_RATE)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        words = await self._decode(audio, prompt, language or self.settings.language, "file")
        ms = (loop.time() - t0) * 1000.0
        return AsrFinal(text="".join(w.word for w in words).strip(), words=words,
                        audio_ms=audio.size * 1000 // ASR_RATE, finalize_ms=ms)

    async def aclose(self) -> None:
        for stream in list(self._streams):
            with contextlib.suppress(Exception):
                await stream.aclose()
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ----------------------------------------------------------------- decoding
    async def _decode(self, audio: Float32Array, prompt: str | None, language: str | None,
                      kind: str) -> list[AsrWord]:
        if self._batcher is not None and kind != "file":
            return await self._batcher.decode(audio, prompt, language, kind)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.meter.wrap(self.decode_sync), audio,
                                          prompt, language, kind)

    def decode_sync(self, audio: Float32Array, prompt: str | None, language: str | None,
                    kind: str) -> list[AsrWord]:
        """One blocking Whisper decode with word timestamps (runs on a pool thread).

        Streaming windows are decoded with a context sized to the window (``decode.py``);
        whole files go through faster-whisper's ``transcribe`` (30 s chunks, temperature
        fallback)."""
        with ASR_DECODE_SECONDS.labels(kind).time():
            if audio.size == 0:
                return []
            streaming = kind != "file"
            if streaming and audio.size <= FULL_CONTEXT_S * ASR_RATE:
                return self._decode_window(audio, prompt, language)
            segments = self._transcribe(audio, prompt, language, streaming)
            if prompt and _suspicious(segments, audio):
                # Tiny models sometimes answer a prompt with nothing or a loop ("The The
                # The ..."): decode once more without it.
                segments = self._transcribe(audio, None, language, streaming)
            words: list[AsrWord] = []
            for seg in segments:
                for w in seg.words or []:
                    words.append(AsrWord(word=w.word, start=float(w.start), end=float(w.end),
                                         probability=float(w.probability)))
            return words

    def _decode_window(self, audio: Float32Array, prompt: str | None,
                       language: str | None) -> list[AsrWord]:
        s = self.settings
        words = decode_windows(self.model, [(audio, prompt)], language, s.beam_size,
                               s.min_context_s)[0]
        if prompt and not words and _audible(audio):
            # Tiny models sometimes answer a prompt with nothing: decode without it.
            words = decode_windows(self.model, [(audio, None)], language, s.beam_size,
                                   s.min_context_s)[0]
        return words

    def _transcribe(self, audio: Float32Array, prompt: str | None, language: str | None,
                    streaming: bool) -> list[Segment]:
        segments, _ = self.model.transcribe(
            np.ascontiguousarray(audio, dtype=np.float32),
            language=language,
            beam_size=self.settings.beam_size,
            word_timestamps=True,
            initial_prompt=prompt or None,
            condition_on_previous_text=not streaming,
            # Streaming re-decodes soon anyway: no temperature fallback (extra decodes).
            temperature=0.0 if streaming else [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
            vad_filter=False,
        )
        return list(segments)


def _suspicious(segments: list[Segment], audio: Float32Array) -> bool:
    if any(seg.compression_ratio > 2.4 for seg in segments):
        return True
    if any(seg.words for seg in segments):
        return False
    return _audible(audio)  # audible, yet no words


def _audible(audio: Float32Array) -> bool:
    return float(np.sqrt(np.mean(np.square(audio)))) > 0.01
