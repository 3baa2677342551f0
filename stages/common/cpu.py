"""The CPU budget of one process: idle threads that sleep, and one thread count per stage.

On a small CPU box the stages of a turn overlap on purpose (ASR decodes the tail while the
LLM starts and TTS voices the first phrase), so every core-second one library burns while
*waiting* is stolen from another that has work. Three runtimes spin by default:

* GNU OpenMP (CTranslate2 and llama.cpp each bundle or link their own ``libgomp``): after
  a parallel region its threads spin before sleeping. ``OMP_WAIT_POLICY=PASSIVE`` makes
  them sleep at once.
* OpenBLAS (numpy's; used by the log-mel front ends of Whisper and Smart Turn): its
  worker threads spin after each call, which doubled the CPU of a Smart Turn decision
  (measured: 115 ms -> 62 ms); ``OPENBLAS_NUM_THREADS=1`` keeps it on the calling thread.
* onnxruntime (piper, Silero, Smart Turn): intra-op threads spin between ops unless
  ``session.intra_op.allow_spinning`` is "0" (:func:`onnx_session_options`).

The environment variables only work before those libraries are loaded, so
:func:`quiet_threads` runs first thing in the ``cascade`` command (and in the test suite);
a variable the user set is left alone.

Thread counts: :class:`CpuBudget` splits one total (``CASCADE_CPU_THREADS``, default: the
cores this process may use) across the stages. The stages of a turn mostly take turns
(ASR while the user speaks, LLM and TTS after), so each may use the whole budget; what
must not happen is a waiting thread holding a core, which the settings above prevent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnxruntime

QUIET_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "KMP_BLOCKTIME": "0",  # Intel OpenMP, where a GPU build brings it
}


def quiet_threads() -> None:
    """Make idle threads sleep (see module docstring). Call before importing numpy,
    ctranslate2, llama_cpp or onnxruntime; variables already set are kept."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class CpuBudget:
    """Threads per stage for the embedded engines (0 in a field: derived from ``total``)."""

    total: int = 0
    asr: int = 0
    llm: int = 0
    tts: int = 0
    turn: int = 1  # the end-of-turn model: ~60 ms a decision on one thread

    def resolved(self) -> CpuBudget:
        total = self.total or available_cores()
        return CpuBudget(total=total, asr=self.asr or total, llm=self.llm or total,
                         tts=self.tts or total, turn=max(1, min(self.turn, total)))


def onnx_session_options(threads: int) -> onnxruntime.SessionOptions:
    """onnxruntime options for a CPU session: ``threads`` intra-op threads that sleep
    instead of spinning between ops, sequential execution."""
    import onnxruntime

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts
