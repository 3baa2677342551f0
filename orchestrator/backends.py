"""The three stage backends the orchestrator talks to, in either shape.

Embedded: the in-process engines (the CPU default of one machine). Remote: the network
clients of stage services (the distributed shape). Both satisfy the same protocols, so
nothing downstream can tell them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from stages.asr.types import AsrBackend
from stages.llm.types import LlmBackend
from stages.tts.types import TtsBackend


@dataclass
class Backends:
    asr: AsrBackend
    llm: LlmBackend
    tts: TtsBackend

    async def aclose(self) -> None:
        for backend in (self.asr, self.llm, self.tts):
            with contextlib.suppress(Exception):
                await backend.aclose()


async def embedded_backends() -> Backends:
    """Load the bundled CPU models (in worker threads, concurrently)."""
    from stages.asr.engine import WhisperAsr
    from stages.llm.engine import LlamaCppLlm
    from stages.llm.settings import LlmSettings
    from stages.tts.engine import PiperTts

    asr, llm, tts = await asyncio.gather(
        WhisperAsr.load(),
        asyncio.to_thread(LlamaCppLlm.from_settings, LlmSettings()),
        asyncio.to_thread(PiperTts),
    )
    return Backends(asr=asr, llm=llm, tts=tts)


def remote_backends(asr_url: str, llm_url: str, tts_url: str, *,
                    llm_model: str | None = None, llm_api_key: str | None = None) -> Backends:
    """Clients of running stage services (``cascade stage ...`` or vLLM for the LLM)."""
    from stages.asr.client import AsrClient
    from stages.llm.client import OpenAICompatLlm
    from stages.tts.client import TtsClient

    llm = (OpenAICompatLlm(llm_url, api_key=llm_api_key, model=llm_model) if llm_model
           else OpenAICompatLlm(llm_url, api_key=llm_api_key))
    return Backends(asr=AsrClient(asr_url), llm=llm, tts=TtsClient(tts_url))
