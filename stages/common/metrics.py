"""Every Prometheus metric of the stage services, declared in one place.

Names follow ``cascade_<stage>_<what>_<unit>``. Timing words match ARCHITECTURE.md:
TTFT = LLM request sent -> first token; TTFA = TTS text in -> first audio out.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_FAST = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)

# ASR
ASR_DECODE_SECONDS = Histogram(
    "cascade_asr_decode_seconds", "Wall time of one Whisper decode call", ["kind"], buckets=_FAST
)
ASR_FINALIZE_SECONDS = Histogram(
    "cascade_asr_finalize_seconds",
    "Time from finalize() (end of audio) to the final transcript",
    buckets=_FAST,
)
ASR_ACTIVE_STREAMS = Gauge("cascade_asr_active_streams", "Open streaming ASR sessions")
ASR_AUDIO_SECONDS = Counter("cascade_asr_audio_seconds_total", "Audio received, in seconds")

# LLM
LLM_TTFT_SECONDS = Histogram(
    "cascade_llm_ttft_seconds", "Request received -> first token", buckets=_FAST
)
LLM_TOKENS = Counter("cascade_llm_tokens_total", "Generated tokens")
LLM_ACTIVE_REQUESTS = Gauge("cascade_llm_active_requests", "Generations in progress")
LLM_BUSY_SLOTS = Gauge("cascade_llm_busy_slots", "Embedded llama.cpp slots generating now")
LLM_PROMPT_TOKENS = Counter("cascade_llm_prompt_tokens_total",
                            "Prompt tokens of embedded generations")
LLM_CACHED_PROMPT_TOKENS = Counter("cascade_llm_cached_prompt_tokens_total",
                                   "Prompt tokens reused from a slot's KV cache")
LLM_CANCELLED = Counter("cascade_llm_cancelled_total", "Generations stopped before their end")
# Primers (prefill-only requests) by outcome: "run" (given a slot) or "skipped" (ended at once).
LLM_PREFILLS = Counter("cascade_llm_prefills_total",
                       "Prefill-only requests (primers) run on a slot or skipped", ["outcome"])

# TTS
TTS_TTFA_SECONDS = Histogram(
    "cascade_tts_ttfa_seconds", "Text in -> first audio chunk out", buckets=_FAST
)
TTS_SYNTH_SECONDS = Histogram(
    "cascade_tts_synth_seconds", "Wall time to synthesize one phrase", buckets=_FAST
)
TTS_AUDIO_SECONDS = Counter("cascade_tts_audio_seconds_total", "Audio produced, in seconds")
TTS_ACTIVE_STREAMS = Gauge("cascade_tts_active_streams", "Open streaming TTS sessions")

# Every service
REQUESTS_REJECTED = Counter(
    "cascade_stage_rejected_total", "Requests or stream messages refused", ["stage", "reason"]
)

# Load of this replica (stages/common/load.py), refreshed at each scrape: what the
# orchestrator's replica routing reads from /load, for autoscalers.
STAGE_ACTIVE = Gauge("cascade_stage_active_streams", "Streams or requests open now", ["stage"])
STAGE_QUEUED = Gauge("cascade_stage_queued", "Inference work waiting for a worker", ["stage"])
STAGE_CAPACITY = Gauge("cascade_stage_capacity", "Streams accepted before refusing",
                       ["stage"])
STAGE_BUSY = Gauge("cascade_stage_busy_ratio", "Inference workers' busy fraction, last 5 s",
                   ["stage"])
STAGE_LOAD = Gauge("cascade_stage_load",
                   "Routing load figure: (active + queued) / capacity + busy / 2", ["stage"])

# Replica routing, in the orchestrator (stages/common/replicas.py).
REPLICA_UP = Gauge("cascade_replica_up", "1 while a stage replica is routed to",
                   ["stage", "replica"])
REPLICA_STREAMS = Counter("cascade_replica_streams_total",
                          "Streams/requests this process sent to each stage replica",
                          ["stage", "replica"])
REPLICA_FAILOVERS = Counter("cascade_replica_failovers_total",
                            "Streams moved to another replica, by why", ["stage", "reason"])
