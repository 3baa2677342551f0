"""Realtime API audio codecs: pcm16 24 kHz and ITU-T G.711 mu-law / A-law 8 kHz, to and
from int16 numpy arrays, plus base64 helpers for the JSON wire.

Design decisions:

* G.711 is table-driven numpy: a 256-entry decode table (code -> int16) and a 65536-entry
  encode table indexed by the int16 sample's bit pattern (``samples.view(np.uint16)``),
  so a chunk is one fancy-indexing pass with no Python loop. Tables are built once at
  import, by vectorized versions of the segment arithmetic of the ITU-T G.191 reference
  implementation of G.711 (mu-law: 14-bit magnitude, bias 33; A-law: 12-bit magnitude,
  0x55 even-bit inversion; negative inputs by one's complement in both). Python's
  ``audioop`` is not used: it is gone in Python 3.13 (and its mu-law encoder rounds
  negative samples differently from G.191).
* Copies: ``decode_base64`` feeds ``base64.b64decode``'s bytes straight to
  ``np.frombuffer`` (pcm16 is then a read-only view, no copy); ``encode_base64`` hands the
  int16 buffer to ``base64.b64encode`` without an intermediate ``tobytes``.
* Formats are named by the GA type strings (``audio/pcm``, ``audio/pcmu``,
  ``audio/pcma``); the beta names (``pcm16``, ``g711_ulaw``, ``g711_alaw``) are accepted
  as aliases. Bad payloads raise ``AudioFormatError`` (a ``ValueError``).
"""

from __future__ import annotations

import base64
import binascii
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from stages.common.audio import AudioFormatError, Int16Array

Codec = Literal["audio/pcm", "audio/pcmu", "audio/pcma"]
UInt8Array = npt.NDArray[np.uint8]

PCM16_RATE: Final = 24_000
G711_RATE: Final = 8_000

SAMPLE_RATES: Final[dict[str, int]] = {
    "audio/pcm": PCM16_RATE,
    "audio/pcmu": G711_RATE,
    "audio/pcma": G711_RATE,
}
_ALIASES: Final[dict[str, Codec]] = {
    "audio/pcm": "audio/pcm",
    "audio/pcmu": "audio/pcmu",
    "audio/pcma": "audio/pcma",
    "pcm16": "audio/pcm",
    "g711_ulaw": "audio/pcmu",
    "g711_alaw": "audio/pcma",
}
BYTES_PER_SAMPLE: Final[dict[str, int]] = {"audio/pcm": 2, "audio/pcmu": 1, "audio/pcma": 1}


def codec(name: str) -> Codec:
    """The canonical codec name for a GA or beta format name."""
    try:
        return _ALIASES[name]
    except KeyError:
        raise AudioFormatError(
            f"unknown audio format {name!r} (expected one of {', '.join(_ALIASES)})"
        ) from None


def sample_rate(name: str) -> int:
    return SAMPLE_RATES[codec(name)]


# --- G.711 tables --------------------------------------------------------------------------

_ULAW_BIAS: Final = 0x84


def _all_int16() -> npt.NDArray[np.int32]:
    """Every int16 value, ordered by its uint16 bit pattern (index i -> int16 view of i)."""
    return np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32)


def _bit_length(values: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
    """``int.bit_length`` of each value (values < 256)."""
    lut = np.array([i.bit_length() for i in range(256)], dtype=np.int32)
    out: npt.NDArray[np.int32] = lut[values]
    return out


def _build_ulaw_encode() -> UInt8Array:
    x = _all_int16()
    # 14-bit magnitude; negatives by one's complement as in the ITU-T G.191 reference
    # (x and -x-1 share a magnitude, so the quantizer is symmetric about -0.5 LSB).
    mag = np.where(x < 0, (~x) >> 2, x >> 2)
    biased = np.minimum(mag + (_ULAW_BIAS >> 2), 0x1FFF)
    seg = _bit_length(biased >> 6)
    mantissa = (biased >> (seg + 1)) & 0x0F
    mask = np.where(x < 0, 0x7F, 0xFF)
    out: UInt8Array = (((seg << 4) | mantissa) ^ mask).astype(np.uint8)
    return out


def _build_ulaw_decode() -> Int16Array:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    mag = (((mantissa << 3) + _ULAW_BIAS) << exponent) - _ULAW_BIAS
    return np.where(u & 0x80, -mag, mag).astype(np.int16)


def _build_alaw_encode() -> UInt8Array:
    x = _all_int16() >> 3  # 13-bit
    negative = x < 0
    mask = np.where(negative, 0x55, 0xD5)
    mag = np.where(negative, -x - 1, x)  # 0 .. 4095
    seg = _bit_length(mag >> 5)
    quant = np.where(seg < 2, mag >> 1, mag >> np.maximum(seg, 1)) & 0x0F
    return (((seg << 4) | quant) ^ mask).astype(np.uint8)


def _build_alaw_decode() -> Int16Array:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)


ULAW_ENCODE: Final = _build_ulaw_encode()
ULAW_DECODE: Final = _build_ulaw_decode()
ALAW_ENCODE: Final = _build_alaw_encode()
ALAW_DECODE: Final = _build_alaw_decode()
for _table in (ULAW_ENCODE, ULAW_DECODE, ALAW_ENCODE, ALAW_DECODE):
    _table.setflags(write=False)


def _check_int16(samples: npt.NDArray[np.generic]) -> Int16Array:
    if samples.dtype != np.int16:
        raise AudioFormatError(f"expected int16 samples, got {samples.dtype}")
    if samples.ndim != 1:
        raise AudioFormatError(f"expected mono (1-D) samples, got shape {samples.shape}")
    return samples  # type: ignore[return-value]


def ulaw_encode(samples: Int16Array) -> UInt8Array:
    out: UInt8Array = ULAW_ENCODE[_check_int16(samples).view(np.uint16)]
    return out


def ulaw_decode(codes: UInt8Array) -> Int16Array:
    out: Int16Array = ULAW_DECODE[codes]
    return out


def alaw_encode(samples: Int16Array) -> UInt8Array:
    out: UInt8Array = ALAW_ENCODE[_check_int16(samples).view(np.uint16)]
    return out


def alaw_decode(codes: UInt8Array) -> Int16Array:
    out: Int16Array = ALAW_DECODE[codes]
    return out


# --- bytes and base64 ----------------------------------------------------------------------


def decode(data: bytes | bytearray | memoryview, fmt: str) -> Int16Array:
    """Wire bytes in ``fmt`` -> int16 samples at ``sample_rate(fmt)``. pcm16 is a
    zero-copy (read-only) view of ``data``."""
    c = codec(fmt)
    if c == "audio/pcm":
        if len(data) % 2:
            raise AudioFormatError(f"pcm16 payload has an odd number of bytes ({len(data)})")
        return np.frombuffer(data, dtype="<i2")
    codes = np.frombuffer(data, dtype=np.uint8)
    return ulaw_decode(codes) if c == "audio/pcmu" else alaw_decode(codes)


def encode(samples: Int16Array, fmt: str) -> npt.NDArray[np.generic]:
    """int16 samples -> an array whose buffer is the wire bytes in ``fmt`` (pass it to
    ``bytes()``/``base64`` or a socket without another copy)."""
    c = codec(fmt)
    _check_int16(samples)
    if c == "audio/pcm":
        return np.ascontiguousarray(samples, dtype="<i2")
    return ulaw_encode(samples) if c == "audio/pcmu" else alaw_encode(samples)


def decode_base64(b64: str | bytes, fmt: str) -> Int16Array:
    """A base64 payload (``input_audio_buffer.append``'s ``audio``) -> int16 samples."""
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AudioFormatError(f"audio is not valid base64: {exc}") from None
    return decode(raw, fmt)


def encode_base64(samples: Int16Array, fmt: str) -> str:
    """int16 samples -> base64 text in ``fmt`` (``response.output_audio.delta``'s
    ``delta``)."""
    return base64.b64encode(encode(samples, fmt)).decode("ascii")  # type: ignore[arg-type]


def duration_ms(n_bytes: int, fmt: str) -> float:
    """Audio duration of ``n_bytes`` of wire data in ``fmt``."""
    c = codec(fmt)
    return 1000.0 * n_bytes / (BYTES_PER_SAMPLE[c] * SAMPLE_RATES[c])
