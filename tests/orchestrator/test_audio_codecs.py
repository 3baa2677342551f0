import base64
import warnings

import numpy as np
import pytest

from orchestrator import audio_codecs as ac
from stages.common.audio import AudioFormatError

ALL_INT16 = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
ALL_CODES = np.arange(256, dtype=np.uint8)


def test_sample_rates_and_aliases() -> None:
    assert ac.sample_rate("audio/pcm") == 24_000
    assert ac.sample_rate("audio/pcmu") == 8_000
    assert ac.sample_rate("audio/pcma") == 8_000
    assert ac.codec("pcm16") == "audio/pcm"
    assert ac.codec("g711_ulaw") == "audio/pcmu"
    assert ac.codec("g711_alaw") == "audio/pcma"
    with pytest.raises(AudioFormatError, match="unknown audio format"):
        ac.codec("audio/opus")


def test_ulaw_known_code_points() -> None:
    # ITU-T G.711 mu-law: 0xFF / 0x7F are +0 / -0, 0x80 / 0x00 the extremes (+-8031 in
    # 14-bit units, 32124 in 16-bit).
    assert ac.ULAW_DECODE[0xFF] == 0
    assert ac.ULAW_DECODE[0x7F] == 0
    assert ac.ULAW_DECODE[0x80] == 32124
    assert ac.ULAW_DECODE[0x00] == -32124
    assert ac.ULAW_DECODE[0xFE] == 8  # first step above zero
    enc = ac.ulaw_encode(np.array([0, -1, 32767, -32768, 8, -9], dtype=np.int16))
    assert enc.tolist() == [0xFF, 0x7F, 0x80, 0x00, 0xFE, 0x7E]


def test_alaw_known_code_points() -> None:
    # ITU-T G.711 A-law: even bits inverted, 0xD5 / 0x55 the smallest +/- values.
    assert ac.ALAW_DECODE[0xD5] == 8
    assert ac.ALAW_DECODE[0x55] == -8
    assert ac.ALAW_DECODE[0xAA] == 32256
    assert ac.ALAW_DECODE[0x2A] == -32256
    enc = ac.alaw_encode(np.array([0, -1, 32767, -32768], dtype=np.int16))
    assert enc.tolist() == [0xD5, 0x55, 0xAA, 0x2A]


def test_code_round_trip() -> None:
    a = ac.alaw_encode(ac.alaw_decode(ALL_CODES))
    assert np.array_equal(a, ALL_CODES)
    u = ac.ulaw_encode(ac.ulaw_decode(ALL_CODES))
    expected = ALL_CODES.copy()
    expected[0x7F] = 0xFF  # negative zero decodes to 0, which encodes as positive zero
    assert np.array_equal(u, expected)


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_linear_round_trip_is_monotonic_and_close(law: str) -> None:
    enc = ac.ulaw_encode if law == "ulaw" else ac.alaw_encode
    dec = ac.ulaw_decode if law == "ulaw" else ac.alaw_decode
    out = dec(enc(ALL_INT16)).astype(np.int32)
    assert np.all(np.diff(out) >= 0)  # quantizer is monotonic
    x = ALL_INT16.astype(np.int32)
    inside = np.abs(x) <= 32000  # beyond that G.711 clips at its largest level
    err = np.abs(out - x)[inside]
    # G.711 keeps ~ 5-6 bits of relative precision: error within half a segment step.
    assert np.all(err <= np.abs(x[inside]) / 16 + 16)
    assert len(set(out.tolist())) == (255 if law == "ulaw" else 256)


def test_ulaw_negative_side_follows_g191_ones_complement() -> None:
    neg = ALL_INT16[ALL_INT16 < 0]
    mirror = (-neg.astype(np.int32) - 1).astype(np.int16)
    assert np.array_equal(ac.ulaw_encode(neg), ac.ulaw_encode(mirror) & 0x7F)


def test_positive_side_matches_audioop_when_available() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")
    pos = ALL_INT16[ALL_INT16 >= 0]
    ref_u = np.frombuffer(audioop.lin2ulaw(pos.tobytes(), 2), dtype=np.uint8)
    assert np.array_equal(ac.ulaw_encode(pos), ref_u)
    ref_a = np.frombuffer(audioop.lin2alaw(ALL_INT16.tobytes(), 2), dtype=np.uint8)
    assert np.array_equal(ac.alaw_encode(ALL_INT16), ref_a)
    ref_dec = np.frombuffer(audioop.ulaw2lin(ALL_CODES.tobytes(), 2), dtype="<i2")
    assert np.array_equal(ac.ulaw_decode(ALL_CODES), ref_dec)


@pytest.mark.parametrize("fmt", ["audio/pcm", "audio/pcmu", "audio/pcma", "g711_ulaw"])
def test_base64_round_trip(fmt: str) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(480) * 3000).astype(np.int16)
    b64 = ac.encode_base64(x, fmt)
    n_bytes = len(base64.b64decode(b64))
    assert n_bytes == len(x) * ac.BYTES_PER_SAMPLE[ac.codec(fmt)]
    y = ac.decode_base64(b64, fmt)
    assert y.dtype == np.int16
    if ac.codec(fmt) == "audio/pcm":
        assert np.array_equal(x, y)
    else:
        assert np.array_equal(ac.encode(y, fmt), ac.encode(x, fmt))
        assert np.max(np.abs(y.astype(np.int32) - x)) <= 3000 // 8


def test_pcm_decode_is_a_view_not_a_copy() -> None:
    raw = np.array([1, -2, 300], dtype="<i2").tobytes()
    samples = ac.decode(raw, "audio/pcm")
    assert samples.tolist() == [1, -2, 300]
    assert not samples.flags.owndata
    assert samples.base is not None


def test_bad_payloads_raise_audio_format_error() -> None:
    with pytest.raises(AudioFormatError, match="base64"):
        ac.decode_base64("not base64!!", "audio/pcm")
    with pytest.raises(AudioFormatError, match="odd number"):
        ac.decode(b"\x00\x01\x02", "audio/pcm")
    with pytest.raises(AudioFormatError, match="int16"):
        ac.encode(np.zeros(4, dtype=np.float32), "audio/pcmu")
    with pytest.raises(AudioFormatError, match="mono"):
        ac.encode(np.zeros((2, 2), dtype=np.int16), "audio/pcm")


def test_duration() -> None:
    assert ac.duration_ms(48_000, "audio/pcm") == 1000.0
    assert ac.duration_ms(160, "audio/pcmu") == 20.0
