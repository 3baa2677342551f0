"""Every Prometheus metric of the orchestrator, declared in one place (default registry).

Turn timings use the words of ARCHITECTURE.md and are all measured from the end of speech
(EoS, the last voiced sample of the user's turn), so one turn's histograms line up:
endpoint delay <= first transcript delta <= final transcript <= LLM first token <= first
audio (in the streaming pipeline; the serial baseline reorders nothing but waits longer).
Each is labelled by ``pipeline`` (``streaming`` or ``serial``) so both modes can be
compared on one dashboard. Label values come from small fixed vocabularies (pipelines,
protocol error codes, rejection reasons), never from client input, to bound cardinality.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Voice latency lives between ~50 ms and a few seconds.
_TURN_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0,
                 10.0)

ACTIVE_SESSIONS = Gauge("cascade_active_sessions", "Open Realtime connections")

TURN_ENDPOINT_DELAY = Histogram(
    "cascade_turn_endpoint_delay_seconds",
    "End of speech -> endpoint (input_audio_buffer.speech_stopped)",
    ["pipeline"],
    buckets=_TURN_BUCKETS,
)
TURN_FIRST_TRANSCRIPT_DELTA = Histogram(
    "cascade_turn_first_transcript_delta_seconds",
    "End of speech -> first input transcription delta sent",
    ["pipeline"],
    buckets=_TURN_BUCKETS,
)
TURN_FINAL_TRANSCRIPT = Histogram(
    "cascade_turn_final_transcript_seconds",
    "End of speech -> final input transcript",
    ["pipeline"],
    buckets=_TURN_BUCKETS,
)
TURN_LLM_FIRST_TOKEN = Histogram(
    "cascade_turn_llm_first_token_seconds",
    "End of speech -> first LLM token of the reply that was kept",
    ["pipeline"],
    buckets=_TURN_BUCKETS,
)
TURN_FIRST_AUDIO = Histogram(
    "cascade_turn_first_audio_seconds",
    "End of speech -> first reply audio delta sent to the client",
    ["pipeline"],
    buckets=_TURN_BUCKETS,
)

SPECULATIVE_HITS = Counter(
    "cascade_speculative_hits_total",
    "Speculative LLM starts whose reply was kept (the final transcript matched)",
)
SPECULATIVE_MISSES = Counter(
    "cascade_speculative_misses_total",
    "Speculative LLM starts cancelled (the user resumed or the final transcript differed)",
)
BARGE_INS = Counter("cascade_barge_ins_total", "Replies cut short by the user speaking")
ERROR_EVENTS = Counter(
    "cascade_error_events_total", "Realtime error events sent to clients", ["code"]
)
REJECTED_CONNECTIONS = Counter(
    "cascade_rejected_connections_total",
    "Realtime connections refused or cut by the server",
    ["reason"],  # auth, capacity, not_ready, resume, slow_client, expired
)
INBOX_DROPPED = Counter(
    "cascade_inbox_dropped_total",
    "Client input dropped because a session's inbox was full (WebRTC calls)",
    ["kind"],  # event, audio
)
WEBRTC_CALLS = Gauge("cascade_webrtc_calls", "Live WebRTC calls in this process")
WEBRTC_CALLS_ENDED = Counter(
    "cascade_webrtc_calls_ended_total",
    "WebRTC calls ended, by why",
    ["reason"],  # hangup, client_left, connect_timeout, failed, shutdown, taken_over, error
)
