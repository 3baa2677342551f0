"""PCM16 audio helpers shared by every stage: conversions, soxr resampling, WAV I/O.

Audio on the wire is little-endian signed 16-bit mono ("pcm16"). Inside the engines it is
float32 in [-1, 1]. Conversions avoid copies where numpy allows (``np.frombuffer``).
"""

from __future__ import annotations

import io
import wave
from typing import Any

import numpy as np
import numpy.typing as npt
import soxr

Int16Array = npt.NDArray[np.int16]
Float32Array = npt.NDArray[np.float32]

ASR_RATE = 16_000
REALTIME_RATE = 24_000
TELEPHONY_RATE = 8_000


class AudioFormatError(ValueError):
    """The caller sent audio we cannot interpret (odd byte count, bad rate, bad WAV)."""


def pcm16_from_bytes(data: bytes | bytearray | memoryview) -> Int16Array:
    """View little-endian pcm16 bytes as int16 samples (no copy)."""
    if len(data) % 2:
        raise AudioFormatError(f"pcm16 payload has an odd number of bytes ({len(data)})")
    return np.frombuffer(data, dtype="<i2")


def pcm16_to_float(samples: Int16Array) -> Float32Array:
    return samples.astype(np.float32) * np.float32(1.0 / 32768.0)


def float_to_pcm16(samples: Float32Array) -> Int16Array:
    out = np.clip(samples, -1.0, 1.0) * 32767.0
    return out.astype(np.int16)


def resample(samples: Float32Array | Int16Array, src_rate: int, dst_rate: int) -> Float32Array:
    """One-shot high-quality resampling with soxr; returns float32."""
    if samples.dtype == np.int16:
        samples = pcm16_to_float(samples)  # type: ignore[arg-type]
    if src_rate == dst_rate:
        return samples.astype(np.float32, copy=False)
    out: Float32Array = soxr.resample(samples, src_rate, dst_rate, quality="HQ")
    return out.astype(np.float32, copy=False)


class StreamResampler:
    """Chunk-by-chunk resampler that keeps filter state across calls (soxr.ResampleStream).

    Use one per stream: chunk boundaries produce no clicks, and the total output length
    matches a one-shot resample of the concatenated input.
    """

    dtype = "float32"  # of the samples in and out

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        self.src_rate = src_rate
        self.dst_rate = dst_rate
        self._stream: soxr.ResampleStream | None = (
            None
            if src_rate == dst_rate
            else soxr.ResampleStream(src_rate, dst_rate, 1, dtype=self.dtype, quality="HQ")
        )

    def process(self, samples: Float32Array, last: bool = False) -> Float32Array:
        out: Float32Array = self._resample(samples, last)
        return out

    def _resample(self, samples: Any, last: bool) -> Any:
        return samples if self._stream is None else self._stream.resample_chunk(samples,
                                                                                last=last)

    def flush(self) -> Float32Array:
        return self.process(np.zeros(0, dtype=np.float32), last=True)


class Pcm16StreamResampler(StreamResampler):
    """``StreamResampler`` for int16 in and out: soxr converts inside, so a 20 ms frame
    costs one call instead of three (int16->float, resample, clip and back)."""

    dtype = "int16"

    def process(self, samples: Int16Array, last: bool = False) -> Int16Array:  # type: ignore[override]
        out: Int16Array = self._resample(samples, last)
        return out


def wav_bytes(samples: Int16Array, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(samples.astype("<i2", copy=False).tobytes())
    return buf.getvalue()


def read_wav(data: bytes) -> tuple[Int16Array, int]:
    """Decode a pcm16 WAV (mono, or the first channel of several) into (samples, rate)."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            if w.getsampwidth() != 2:
                raise AudioFormatError(f"WAV must be 16-bit PCM, got {8 * w.getsampwidth()}-bit")
            channels = w.getnchannels()
            rate = w.getframerate()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise AudioFormatError(f"not a readable WAV file: {exc}") from exc
    samples = np.frombuffer(frames, dtype="<i2")
    if channels > 1:
        samples = samples[::channels].copy()
    return samples, rate


def write_wav(path: str, samples: Int16Array, sample_rate: int) -> None:
    with open(path, "wb") as f:
        f.write(wav_bytes(samples, sample_rate))
