"""The shared Silero VAD ONNX model.

One ``onnxruntime.InferenceSession`` per process serves every stream: the model is
stateless apart from the recurrent ``state`` tensor, which each ``VadStream`` owns and
passes in and out. The session runs with one intra-op and one inter-op thread: a 32 ms
frame costs ~0.1 ms, so extra threads only add synchronisation and steal cores from the
ASR/LLM/TTS models. ``InferenceSession.run`` is thread-safe, so streams may live on
different threads.

Input/output names are read from the model at load time (``input``, ``state``, ``sr`` ->
``output``, ``stateN`` for silero-vad 6.x) so a renamed export fails loudly at startup.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from stages.common.cpu import onnx_session_options

SAMPLE_RATE = 16_000
FRAME_SAMPLES = 512  # 32 ms at 16 kHz: the only frame size the 16 kHz model accepts
CONTEXT_SAMPLES = 64  # tail of the previous frame, prepended to each frame
STATE_SHAPE = (2, 1, 128)

FloatArray = npt.NDArray[np.float32]


def default_model_path() -> str:
    """The ONNX file bundled in the silero-vad wheel (its Python code needs torch; not imported)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("silero-vad is not installed (pip install --no-deps silero-vad)")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "data", "silero_vad.onnx")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"silero VAD model missing: {path}")
    return path


class SileroVadModel:
    """One ONNX session; ``infer`` maps (576-sample window, state) -> (probability, state)."""

    def __init__(self, path: str | None = None, providers: list[str] | None = None) -> None:
        opts = onnx_session_options(1)
        self.path = path or default_model_path()
        # CPU by default: a 0.1 ms kernel gains nothing from a GPU round trip.
        self._session = ort.InferenceSession(
            self.path, sess_options=opts, providers=providers or ["CPUExecutionProvider"]
        )
        names = {i.name for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        expected = {"input", "state", "sr"}
        if names != expected or len(outputs) != 2:
            raise RuntimeError(
                f"unexpected silero VAD signature: inputs {sorted(names)}, outputs {outputs}"
            )
        self._outputs = outputs  # [probability, new state]
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    @staticmethod
    def initial_state() -> FloatArray:
        return np.zeros(STATE_SHAPE, dtype=np.float32)

    def infer(self, window: FloatArray, state: FloatArray) -> tuple[float, FloatArray]:
        """``window``: float32 [CONTEXT_SAMPLES + FRAME_SAMPLES]; returns (p(speech), state)."""
        prob, new_state = self._session.run(
            self._outputs, {"input": window.reshape(1, -1), "state": state, "sr": self._sr}
        )
        return float(prob[0, 0]), np.asarray(new_state, dtype=np.float32)

    def infer_batch(self, windows: FloatArray, states: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Many streams' frames in one run: ``windows`` [B, 576], ``states`` [2, B, 128] ->
        (p(speech) [B, 1], next states [2, B, 128]); row i is exactly ``infer`` of row i."""
        probs, new_states = self._session.run(
            self._outputs, {"input": windows, "state": states, "sr": self._sr})
        return np.asarray(probs, dtype=np.float32), np.asarray(new_states, dtype=np.float32)
