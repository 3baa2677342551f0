"""Smart Turn v3.2 end-of-turn model: real ONNX file (deploy/install.sh), real piper speech.

Decided behaviour for degenerate input: empty audio (and non-mono or integer-but-not-int16
audio) raises ``ValueError`` - there is no turn to judge, so it is the caller's bug; any
non-empty audio, however short, is zero-padded to the 8 s window and gets a probability.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import threading
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from faster_whisper.feature_extractor import FeatureExtractor

from stages.vad.mel import mel_filters, stft
from stages.vad.smart_turn import (
    MODEL_ENV,
    N_FRAMES,
    N_MELS,
    WINDOW_SAMPLES,
    SmartTurn,
    smart_turn_model_path,
)
from tests.support.speech import SENTENCES, piper_clip

RATE = 16_000
COMPLETE = "What is the weather like in Paris today?"
INCOMPLETE = "What is the weather like in"
PAUSE = np.zeros(RATE // 5, dtype=np.int16)  # 200 ms: what a server has when it asks


def _turn(text: str) -> np.ndarray:
    """``text`` spoken, then the 200 ms pause after which a server asks the model."""
    return np.concatenate([piper_clip(text, RATE), PAUSE])


@pytest.fixture(scope="module")
def model() -> Iterator[SmartTurn]:
    m = SmartTurn()
    m.warmup()
    yield m
    m.close()


def test_complete_sentence_scores_above_the_same_sentence_cut_mid_clause(
        model: SmartTurn) -> None:
    done = model.probability(_turn(COMPLETE))
    cut = model.probability(_turn(INCOMPLETE))
    assert 0.0 <= cut < done <= 1.0
    # Clear synthetic speech: the model is confident both ways (~0.98 vs ~0.01).
    assert done > 0.5 > cut


def test_probabilities_lie_in_unit_interval_for_speech_and_noise(model: SmartTurn) -> None:
    rng = np.random.default_rng(3)
    noise = (rng.standard_normal(3 * RATE) * 0.3).astype(np.float32)
    inputs = [_turn(s) for s in SENTENCES] + [noise, np.zeros(RATE, dtype=np.float32)]
    for audio in inputs:
        p = model.probability(audio)
        assert 0.0 <= p <= 1.0


def test_int16_and_float_audio_give_the_same_probability(model: SmartTurn) -> None:
    pcm = _turn(COMPLETE)
    as_float = pcm.astype(np.float32) / 32768.0
    assert model.probability(pcm) == pytest.approx(model.probability(as_float), abs=1e-6)


def test_features_match_the_models_input(model: SmartTurn) -> None:
    feats = model.features(_turn(COMPLETE))
    assert feats.shape == (N_MELS, N_FRAMES)
    assert feats.dtype == np.float32
    # Whisper scaling: log10 clamped to 8 below the max, then (x + 4) / 4.
    assert float(feats.max() - feats.min()) <= 2.0 + 1e-5
    # Short audio is padded at the start: the speech (and its energy) sits at the end.
    assert float(feats[:, -200:].mean()) > float(feats[:, :200].mean())


def test_features_are_faster_whispers_whisper_front_end_on_the_normalized_window(
        model: SmartTurn) -> None:
    """The model was trained on Whisper features of the zero-mean, unit-variance 8 s
    window; ``features`` must equal faster-whisper's extractor on exactly that."""
    window = model.window(_turn(COMPLETE))
    normalized = (window - window.mean()) / np.sqrt(window.var() + 1e-7)
    reference = FeatureExtractor(feature_size=80, chunk_length=8)(normalized, padding=0)
    np.testing.assert_allclose(model.features(_turn(COMPLETE)), reference, atol=1e-5)


def test_longer_than_8_s_uses_the_last_8_s(model: SmartTurn) -> None:
    head = np.concatenate([piper_clip(s, RATE) for s in SENTENCES])
    long = np.concatenate([head, _turn(COMPLETE)])
    assert len(long) > WINDOW_SAMPLES
    p = model.probability(long)
    assert p == model.probability(long[-WINDOW_SAMPLES:])
    assert p > 0.5  # it still ends on a finished question
    # What came before the last 8 s does not matter at all.
    other = np.concatenate([piper_clip(INCOMPLETE, RATE), long[-WINDOW_SAMPLES:]])
    assert model.probability(other) == p


def test_very_short_audio_gets_a_probability_and_empty_audio_is_an_error(
        model: SmartTurn) -> None:
    for n in (1, 160, 1600):  # one sample, 10 ms, 100 ms
        p = model.probability(np.full(n, 0.1, dtype=np.float32))
        assert 0.0 <= p <= 1.0
    with pytest.raises(ValueError, match="at least one sample"):
        model.probability(np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError, match="mono"):
        model.probability(np.zeros((2, RATE), dtype=np.float32))
    with pytest.raises(ValueError, match="int16"):
        model.probability(np.zeros(RATE, dtype=np.int32))


async def test_predict_runs_off_the_event_loop_and_matches_probability(
        model: SmartTurn) -> None:
    audio = _turn(COMPLETE)
    expected = model.probability(audio)
    task = asyncio.ensure_future(model.predict(audio))
    ticks = 0
    while not task.done():  # the loop keeps running while the model works
        ticks += 1
        await asyncio.sleep(0.001)
    assert ticks > 0
    assert task.result() == expected
    both = await asyncio.gather(model.predict(audio), model.predict(_turn(INCOMPLETE)))
    assert both[0] == expected and both[1] < 0.5


async def test_predict_snapshots_the_callers_buffer(model: SmartTurn) -> None:
    audio = _turn(COMPLETE).astype(np.float32) / 32768.0
    expected = model.probability(audio)
    pending = asyncio.ensure_future(model.predict(audio))
    await asyncio.sleep(0)  # predict has taken its copy and handed it to its thread
    audio[:] = 0.0  # the caller reuses its buffer
    assert await pending == expected


async def test_predict_runs_on_the_models_own_thread(model: SmartTurn) -> None:
    seen: list[str] = []
    original = model.probability

    def spy(audio: npt.ArrayLike) -> float:
        seen.append(threading.current_thread().name)
        return original(audio)

    model.probability = spy  # type: ignore[method-assign]
    try:
        await model.predict(_turn(COMPLETE))
    finally:
        del model.probability
    assert len(seen) == 1 and seen[0].startswith("smart-turn")


def test_two_threads_agree_with_one() -> None:
    audio = _turn(COMPLETE)
    one = SmartTurn(threads=1)
    two = SmartTurn(threads=2)
    try:
        assert two.probability(audio) == pytest.approx(one.probability(audio), abs=1e-4)
    finally:
        one.close()
        two.close()


async def test_closed_model_refuses_work() -> None:
    m = SmartTurn()
    m.close()
    m.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        m.probability(_turn(COMPLETE))
    with pytest.raises(RuntimeError, match="closed"):
        await m.predict(_turn(COMPLETE))


def test_default_path_is_inside_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MODEL_ENV, raising=False)
    path = smart_turn_model_path()
    assert path == os.path.join(sys.prefix, "share", "cascade", "models",
                                "smart-turn-v3.2-cpu.onnx")
    assert os.path.getsize(path) > 1_000_000


def test_missing_model_file_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(os.fspath(tmp_path), "nope.onnx")
    monkeypatch.setenv(MODEL_ENV, missing)
    with pytest.raises(FileNotFoundError, match=MODEL_ENV):
        smart_turn_model_path()
    with pytest.raises(FileNotFoundError, match=r"nope\.onnx"):
        SmartTurn()
    # Without the override, a missing install points at deploy/install.sh.
    monkeypatch.delenv(MODEL_ENV)
    monkeypatch.setattr(sys, "prefix", os.fspath(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"deploy/install\.sh"):
        smart_turn_model_path()
    with pytest.raises(FileNotFoundError, match=r"deploy/install\.sh"):
        SmartTurn()


def test_env_override_is_used(monkeypatch: pytest.MonkeyPatch,
                              tmp_path: os.PathLike[str]) -> None:
    copy = os.path.join(os.fspath(tmp_path), "turn.onnx")
    shutil.copyfile(smart_turn_model_path(), copy)
    monkeypatch.setenv(MODEL_ENV, copy)
    assert smart_turn_model_path() == copy
    m = SmartTurn()
    try:
        assert m.path == copy
        assert m.providers == ["CPUExecutionProvider"]
        assert m.probability(_turn(COMPLETE)) > 0.5
    finally:
        m.close()


def test_device_choice(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="device"):
        SmartTurn(device="tpu")
    cuda = SmartTurn(device="cuda")
    try:
        if "CUDAExecutionProvider" in ort.get_available_providers():
            assert cuda.providers[0] == "CUDAExecutionProvider"
        else:  # CPU-only onnxruntime: falls back, and says so
            assert cuda.providers == ["CPUExecutionProvider"]
            assert "no CUDA provider" in caplog.text
        assert cuda.probability(_turn(COMPLETE)) > 0.5
    finally:
        cuda.close()


def test_numpy_front_end_pieces_equal_faster_whispers() -> None:
    """stages/vad/mel.py stands in for faster-whisper's filterbank and STFT (so the
    orchestrator does not need ctranslate2): the same numbers."""
    reference = FeatureExtractor(feature_size=80, chunk_length=8)
    np.testing.assert_allclose(mel_filters(16_000, 400, 80), reference.mel_filters,
                               rtol=1e-6, atol=1e-9)
    x = np.random.default_rng(1).normal(0.0, 0.3, 16_000).astype(np.float32)
    window = np.hanning(401)[:-1].astype(np.float32)
    expected = FeatureExtractor.stft(x, 400, 160, window=window, return_complex=True)
    np.testing.assert_allclose(stft(x, 400, 160, window), expected, rtol=1e-5, atol=1e-4)
