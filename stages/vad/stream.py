"""Per-stream VAD state: arbitrary-length audio in, one probability per 512-sample frame out.

A ``VadStream`` keeps (a) the samples that do not yet fill a frame, (b) the last 64
samples of the previous frame (the model's context) and (c) the recurrent state. Results
depend only on the concatenated audio, never on how it was chunked: the same frames are
built and run in the same order whatever the chunk sizes.

Audio must be mono 16 kHz, pcm16 (int16 array or raw little-endian bytes) or float32 in
[-1, 1]. Resampling belongs to the caller (``stages.common.audio.StreamResampler``), so the
sample counts reported here are exact positions in the 16 kHz stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt

from stages.common.audio import AudioFormatError, pcm16_from_bytes, pcm16_to_float
from stages.vad.model import CONTEXT_SAMPLES, FRAME_SAMPLES, SAMPLE_RATE, SileroVadModel


@dataclass(frozen=True, slots=True)
class VadFrame:
    """Speech probability of samples [start_sample, end_sample) of the stream (16 kHz)."""

    start_sample: int
    end_sample: int
    probability: float

    @property
    def end_s(self) -> float:
        return self.end_sample / SAMPLE_RATE

    @property
    def start_s(self) -> float:
        return self.start_sample / SAMPLE_RATE


AudioInput = npt.NDArray[np.int16] | npt.NDArray[np.float32] | bytes | bytearray | memoryview


class VadStream:
    """Streaming speech probabilities for one audio stream, sharing a ``SileroVadModel``."""

    def __init__(self, model: SileroVadModel, sample_rate: int = SAMPLE_RATE) -> None:
        if sample_rate != SAMPLE_RATE:
            raise AudioFormatError(
                f"VAD needs {SAMPLE_RATE} Hz audio, got {sample_rate} Hz (resample first)"
            )
        self._model = model
        # One reusable window: [64 context samples | 512 frame samples]; no per-frame alloc.
        self._window = np.zeros(CONTEXT_SAMPLES + FRAME_SAMPLES, dtype=np.float32)
        self._pending = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        self._n_pending = 0
        self._state = model.initial_state()
        self._samples_done = 0  # samples already covered by emitted frames

    @property
    def samples_received(self) -> int:
        return self._samples_done + self._n_pending

    def reset(self) -> None:
        """Forget all audio and recurrent state (a new utterance on the same stream)."""
        self._window[:] = 0.0
        self._n_pending = 0
        self._state = self._model.initial_state()
        self._samples_done = 0

    def process(self, audio: AudioInput) -> list[VadFrame]:
        """Feed audio of any length; returns the frames it completed, in order."""
        frames: list[VadFrame] = []
        for window in self._windows(audio):
            prob, self._state = self._model.infer(window, self._state)
            frames.append(self._frame_done(prob))
        return frames

    async def process_async(self, audio: AudioInput) -> list[VadFrame]:
        """``process`` for callers that may share the model across streams
        (``BatchedVadStream`` overrides it; here it runs at once)."""
        return self.process(audio)

    def _windows(self, audio: AudioInput) -> Iterator[npt.NDArray[np.float32]]:
        """Cuts ``audio`` into frames: yields the model's window each time one is complete
        (context + frame, a reused buffer); the caller runs the model on it and calls
        ``_frame_done`` before asking for the next one."""
        samples = _as_float(audio)
        pos = 0
        n = samples.shape[0]
        while pos < n:
            take = min(FRAME_SAMPLES - self._n_pending, n - pos)
            self._pending[self._n_pending : self._n_pending + take] = samples[pos : pos + take]
            self._n_pending += take
            pos += take
            if self._n_pending == FRAME_SAMPLES:
                self._window[CONTEXT_SAMPLES:] = self._pending
                yield self._window

    def _frame_done(self, prob: float) -> VadFrame:
        self._window[:CONTEXT_SAMPLES] = self._pending[-CONTEXT_SAMPLES:]
        self._n_pending = 0
        start = self._samples_done
        self._samples_done += FRAME_SAMPLES
        return VadFrame(start, self._samples_done, prob)


def _as_float(audio: AudioInput) -> npt.NDArray[np.float32]:
    if isinstance(audio, bytes | bytearray | memoryview):
        return pcm16_to_float(pcm16_from_bytes(audio))
    if not isinstance(audio, np.ndarray):
        raise AudioFormatError(f"VAD audio must be a numpy array or bytes, got {type(audio)}")
    if audio.ndim != 1:
        raise AudioFormatError(f"VAD audio must be mono (1-D), got shape {audio.shape}")
    if audio.dtype == np.int16:
        return pcm16_to_float(cast(npt.NDArray[np.int16], audio))
    if audio.dtype == np.float32:
        return cast(npt.NDArray[np.float32], audio)
    raise AudioFormatError(f"VAD audio must be int16 or float32, got {audio.dtype}")
