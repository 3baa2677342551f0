"""Whisper's log-mel front end pieces, in numpy alone: the Slaney mel filterbank and a
centred STFT. Smart Turn (``smart_turn.py``) needs exactly Whisper's features; taking them
from faster-whisper would pull ctranslate2 into every orchestrator install and image.
``tests/stages/vad/test_smart_turn.py`` checks both against faster-whisper's own."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

# Slaney's mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above it.
_LINEAR_HZ_PER_MEL = 200.0 / 3.0
_LOG_START_HZ = 1000.0
_LOG_STEP = np.log(6.4) / 27.0
_MAX_MEL = 45.245640471924965  # 8 kHz, the top of Whisper's 16 kHz filterbank


def _mel_to_hz(mels: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    hz = _LINEAR_HZ_PER_MEL * mels
    start_mel = _LOG_START_HZ / _LINEAR_HZ_PER_MEL
    log = mels >= start_mel
    hz[log] = _LOG_START_HZ * np.exp(_LOG_STEP * (mels[log] - start_mel))
    return hz


def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> npt.NDArray[np.float32]:
    """[n_mels, n_fft // 2 + 1] triangular filters, area-normalized (Slaney)."""
    bins = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    edges = _mel_to_hz(np.linspace(0.0, _MAX_MEL, n_mels + 2))
    widths = np.diff(edges)
    distance = edges[:, None] - bins[None, :]
    rising = -distance[:-2] / widths[:-1, None]
    falling = distance[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:n_mels + 2] - edges[:n_mels]))[:, None]
    return weights.astype(np.float32)


def stft(x: npt.NDArray[np.float32], n_fft: int, hop: int,
         window: npt.NDArray[np.float32]) -> npt.NDArray[np.complex64]:
    """Centred (reflect-padded) one-sided STFT: [n_fft // 2 + 1, frames]."""
    padded = np.pad(x, n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    return np.fft.rfft(frames * window, axis=-1).T.astype(np.complex64)
