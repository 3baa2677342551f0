"""The three stage backends the orchestrator talks to, in either shape.

Embedded: the in-process engines (the CPU default of one machine). Remote: the network
clients of stage services (the distributed shape). Both satisfy the same protocols, so
nothing downstream can tell them apart; the shapes also mix (embedded ASR and TTS with a
remote OpenAI-compatible LLM such as vLLM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import cast

from orchestrator.turn import EndOfTurnModel
from stages.asr.types import AsrBackend
from stages.common.access import StageAccess
from stages.common.cpu import CpuBudget
from stages.common.replicas import ReplicaSet
from stages.llm.types import LlmBackend
from stages.tts.types import TtsBackend

log = logging.getLogger(__name__)


@dataclass
class Backends:
    asr: AsrBackend
    llm: LlmBackend
    tts: TtsBackend
    # semantic_vad's end-of-turn model, run in this process (None: not installed; then
    # semantic_vad ends turns on silence like server_vad).
    turn: EndOfTurnModel | None = None

    async def start(self) -> None:
        """Resolve and probe the remote stages' replicas (``ReplicaSet.start``), so the
        first streams are routed by load and /readyz shows every replica."""
        for backend in (self.asr, self.llm, self.tts):
            replicas = getattr(backend, "replicas", None)
            if isinstance(replicas, ReplicaSet):
                await replicas.start()

    def replicas(self) -> dict[str, list[dict[str, object]]]:
        """The replicas of each remote stage, their health and load (embedded: none)."""
        out: dict[str, list[dict[str, object]]] = {}
        for name, backend in (("asr", self.asr), ("llm", self.llm), ("tts", self.tts)):
            replicas = getattr(backend, "replicas", None)
            if isinstance(replicas, ReplicaSet):
                out[name] = replicas.snapshot()
        return out

    async def aclose(self) -> None:
        for backend in (self.asr, self.llm, self.tts):
            with contextlib.suppress(Exception):
                await backend.aclose()
        close = getattr(self.turn, "close", None)
        if close is not None:
            close()


async def embedded_backends(budget: CpuBudget | None = None, *, llm: LlmBackend | None = None,
                            llm_parallel: int = 0) -> Backends:
    """Load the bundled CPU models (in worker threads, concurrently) with the threads of
    ``budget``, and warm each one up so the first turn pays no one-time costs. ``llm``:
    use this (remote) LLM instead of the embedded one."""
    from stages.asr.engine import WhisperAsr
    from stages.asr.settings import AsrSettings
    from stages.llm.engine import LlamaCppLlm
    from stages.llm.settings import LlmSettings
    from stages.tts.engine import PiperTts
    from stages.tts.settings import TtsSettings

    b = (budget or CpuBudget()).resolved()

    def load_asr() -> WhisperAsr:
        engine = WhisperAsr(AsrSettings(cpu_threads=b.asr))
        engine.warmup()
        return engine

    def load_llm() -> LlamaCppLlm:
        settings = LlmSettings(cpu_threads=b.llm)
        if llm_parallel:
            settings = settings.model_copy(update={"parallel": llm_parallel})
        engine = LlamaCppLlm.from_settings(settings)
        engine.warmup()
        return engine

    def load_tts() -> PiperTts:
        engine = PiperTts(TtsSettings(cpu_threads=b.tts))
        engine.warmup()
        return engine

    jobs: list[asyncio.Future[object]] = [asyncio.ensure_future(asyncio.to_thread(load_asr)),
                                          asyncio.ensure_future(asyncio.to_thread(load_tts))]
    if llm is None:
        jobs.append(asyncio.ensure_future(asyncio.to_thread(load_llm)))
    results = await asyncio.gather(*jobs, return_exceptions=True)
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        for r in results:
            close = getattr(r, "aclose", None)
            if close is not None and not isinstance(r, BaseException):
                with contextlib.suppress(Exception):
                    await close()
        raise failure
    asr, tts = results[0], results[1]
    engine_llm = llm if llm is not None else cast(LlmBackend, results[2])
    assert isinstance(asr, WhisperAsr) and isinstance(tts, PiperTts)
    return Backends(asr=asr, llm=engine_llm, tts=tts)


def load_turn_model(threads: int = 1) -> EndOfTurnModel | None:
    """Smart Turn v3.2 (fetched by deploy/install.sh), warmed up; None when not installed."""
    from stages.vad.smart_turn import SmartTurn, smart_turn_model_path

    try:
        path = smart_turn_model_path()
    except FileNotFoundError as exc:
        log.warning("semantic_vad will end turns on silence only: %s", exc)
        return None
    model = SmartTurn(path, threads=threads)
    model.warmup()
    return model


def remote_llm(llm_url: str, *, llm_model: str | None = None,
               llm_api_key: str | None = None, access: StageAccess | None = None
               ) -> LlmBackend:
    """A client of an OpenAI-compatible chat completions server (vLLM, llama.cpp, ...).
    ``access``: the stage key (sent when ``llm_api_key`` is empty) and TLS trust."""
    from stages.llm.client import OpenAICompatLlm

    if llm_model:
        return OpenAICompatLlm(llm_url, api_key=llm_api_key, model=llm_model, access=access)
    return OpenAICompatLlm(llm_url, api_key=llm_api_key, access=access)


def remote_backends(asr_url: str, llm_url: str, tts_url: str, *,
                    llm_model: str | None = None, llm_api_key: str | None = None,
                    access: StageAccess | None = None) -> Backends:
    """Clients of running stage services (``cascade stage ...`` or vLLM for the LLM);
    ``access``: the stage key and TLS trust (default: from the environment)."""
    from stages.asr.client import AsrClient
    from stages.tts.client import TtsClient

    access = access if access is not None else StageAccess.from_env()
    return Backends(asr=AsrClient(asr_url, access=access),
                    llm=remote_llm(llm_url, llm_model=llm_model, llm_api_key=llm_api_key,
                                   access=access),
                    tts=TtsClient(tts_url, access=access))
