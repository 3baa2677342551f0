"""Smart Turn v3.2: a semantic end-of-turn model, run with onnxruntime alone.

What it is: Pipecat's open (BSD-2-Clause) turn detector, a Whisper-tiny encoder with a
small classification head, ~8M parameters, int8-quantized for CPU (8.7 MB ONNX file). It
listens to the end of the user's turn and returns the probability that the speaker has
finished: trained on intonation, pace and grammar, so "What is the weather like in
Paris today?" scores ~0.98 and "What is the weather like in" ~0.01.

Why: plain VAD ends a turn after a fixed silence, so it either cuts people off when they
pause mid-sentence or makes every reply wait for the long silence. OpenAI's
``semantic_vad`` turn detection instead ends the turn after a short pause when the user
sounds done, and waits longer (up to the eagerness bound) when they sound unfinished.
This model supplies that judgement; the turn-taking logic decides what to do with it.

Input (as Pipecat feeds it, checked against its reference feature code: features within
2e-6, identical probabilities):

- 16 kHz mono float audio of the turn, up to now (speech plus the silence so far). Only
  the last 8 s count; shorter audio is zero-padded at the *start* to exactly 128 000
  samples, so the end of speech always sits at the same place in the window.
- The padded window is normalized to zero mean and unit variance (Whisper's
  ``do_normalize``), then turned into Whisper log-mel features: 80 mel bins, 25 ms
  (400-sample) Hann windows every 10 ms, log10, clamped to 8 below the maximum, scaled
  by (x + 4) / 4; the last STFT frame is dropped, giving 800 frames. ``stages/vad/mel.py``
  computes the filterbank and STFT in numpy exactly as faster-whisper's
  ``FeatureExtractor`` does (tested), so the orchestrator needs no ASR package.
- ONNX input ``input_features``: float32 [batch, 80, 800]. Output (named ``logits`` but
  already passed through a sigmoid): float32 [batch, 1], P(turn complete).

Cost: one decision runs the encoder over the full 8 s window whatever the audio length,
so it is a fixed cost per call (see ``benchmarks/stages/turn.py``). It is meant to run
once per pause, not per frame. The session never spins idle threads: on a 2-core box
every spinning core is stolen from the ASR, LLM and TTS models.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from stages.vad.mel import mel_filters, stft

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
WINDOW_SECONDS = 8
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE  # 128 000
N_MELS = 80
N_FFT = 400  # 25 ms analysis window
HOP = 160  # 10 ms hop
N_FRAMES = WINDOW_SAMPLES // HOP  # 800
MODEL_FILE = "smart-turn-v3.2-cpu.onnx"
MODEL_ENV = "CASCADE_SMART_TURN_MODEL"
_INPUT = "input_features"
_NORM_EPS = 1e-7  # Whisper's do_normalize variance floor
_CUDA = "CUDAExecutionProvider"

FloatArray = npt.NDArray[np.float32]


def smart_turn_model_path() -> str:
    """Where the ONNX file is: ``$CASCADE_SMART_TURN_MODEL`` if set, else the copy that
    ``deploy/install.sh`` extracts from the pipecat-ai wheel into the environment."""
    override = os.environ.get(MODEL_ENV)
    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"Smart Turn model not found: {override} (from ${MODEL_ENV})")
        return override
    path = os.path.join(sys.prefix, "share", "cascade", "models", MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Smart Turn model not found: {path}. Run deploy/install.sh (it extracts "
            f"{MODEL_FILE} from the pipecat-ai wheel), or set ${MODEL_ENV} to the file."
        )
    return path


def _providers(device: str) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
    if _CUDA in ort.get_available_providers():
        return [_CUDA, "CPUExecutionProvider"]
    log.warning("device=cuda but onnxruntime has no CUDA provider: Smart Turn runs on CPU")
    return ["CPUExecutionProvider"]


class SmartTurn:
    """One ONNX session plus a one-thread executor for ``predict``.

    ``probability`` blocks (call it from a worker thread or a benchmark);
    ``predict`` is the event-loop form. One instance can serve many sessions: decisions
    are queued on its single worker, which keeps the CPU it takes to ``threads`` cores.
    """

    def __init__(self, path: str | None = None, *, threads: int = 1, device: str = "cpu") -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, not {threads}")
        self.path = path or smart_turn_model_path()
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"Smart Turn model not found: {self.path}")
        self.threads = threads
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle pool threads would otherwise busy-wait after every call, taking a core
        # from the ASR/LLM/TTS models that share this machine.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(
            self.path, sess_options=opts, providers=_providers(device)
        )
        self.providers: list[str] = self._session.get_providers()
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if (len(inputs) != 1 or inputs[0].name != _INPUT
                or list(inputs[0].shape)[1:] != [N_MELS, N_FRAMES] or len(outputs) != 1):
            raise RuntimeError(
                "unexpected Smart Turn signature: inputs "
                f"{[(i.name, i.shape) for i in inputs]}, outputs {[o.name for o in outputs]}"
            )
        self._output = outputs[0].name
        self._mel_filters = mel_filters(SAMPLE_RATE, N_FFT, N_MELS)
        self._window = np.hanning(N_FFT + 1)[:-1].astype(np.float32)  # periodic Hann
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smart-turn")
        self._closed = False

    @staticmethod
    def window(audio: npt.ArrayLike) -> FloatArray:
        """The model's view of ``audio``: its last 8 s, zero-padded at the start to exactly
        128 000 float32 samples. int16 input is scaled to [-1, 1]. Empty or non-mono audio
        is a caller error (``ValueError``): there is no turn to judge."""
        samples = np.asarray(audio)
        if samples.ndim != 1:
            raise ValueError(f"Smart Turn needs mono 1-D audio, got shape {samples.shape}")
        if samples.size == 0:
            raise ValueError("Smart Turn needs at least one sample of audio")
        if samples.dtype == np.int16:
            tail = samples[-WINDOW_SAMPLES:].astype(np.float32) / np.float32(32768.0)
        elif np.issubdtype(samples.dtype, np.floating):
            tail = samples[-WINDOW_SAMPLES:].astype(np.float32)
        else:
            raise ValueError(f"Smart Turn needs float or int16 audio, got {samples.dtype}")
        out = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
        out[WINDOW_SAMPLES - tail.size:] = tail
        return out

    def features(self, audio: npt.ArrayLike) -> FloatArray:
        """Whisper log-mel features of ``window(audio)``: float32 [80, 800]."""
        x = self.window(audio)
        x = (x - x.mean()) / np.sqrt(x.var() + np.float32(_NORM_EPS))
        # Whisper's feature extraction (stages/vad/mel.py), except for the mel projection:
        # ``filters @ power`` goes to OpenBLAS, whose worker threads then spin after the
        # call and doubled the CPU cost of a decision (115 vs 60 ms on 2 cores). ``einsum``
        # without ``optimize`` runs numpy's own single-threaded loop.
        spec = stft(x, N_FFT, HOP, self._window)
        power = np.abs(spec[:, :-1]) ** 2  # 800 frames: drop the last
        mel = np.einsum("mf,ft->mt", self._mel_filters, power, optimize=False)
        log_spec = np.log10(np.maximum(mel, np.float32(1e-10)))
        log_spec = np.maximum(log_spec, log_spec.max() - np.float32(8.0))
        out: FloatArray = ((log_spec + np.float32(4.0)) / np.float32(4.0)).astype(np.float32)
        return out

    def probability(self, audio: npt.ArrayLike) -> float:
        """P(the speaker has finished their turn) for 16 kHz mono ``audio`` (blocking)."""
        if self._closed:
            raise RuntimeError("SmartTurn is closed")
        feats = self.features(audio)[np.newaxis]
        (out,) = self._session.run([self._output], {_INPUT: feats})
        return float(np.asarray(out).reshape(-1)[0])

    async def predict(self, audio: npt.ArrayLike) -> float:
        """``probability`` on the model's own thread; the event loop stays free. The audio
        is snapshotted (its last 8 s copied) before this returns control, so the caller may
        keep appending to its buffer."""
        if self._closed:
            raise RuntimeError("SmartTurn is closed")
        snapshot = self.window(audio)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.probability, snapshot)

    def warmup(self) -> None:
        """One decision on silence, so the first real one does not pay for allocation and
        kernel selection."""
        self.probability(np.zeros(SAMPLE_RATE, dtype=np.float32))

    def close(self) -> None:
        """Stop the worker thread (a decision in flight finishes first). Idempotent."""
        self._closed = True
        self._executor.shutdown(wait=True)
