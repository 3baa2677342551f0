"""What ``cascade bench`` records and reports: one pydantic model per level of the report.

Every latency is in milliseconds from the ground-truth end of speech (EoS): the moment the
client sent the 20 ms frame that holds the clip's last voiced sample (over WebRTC: handed
it to the audio track's encoder). ``None`` means the event never arrived during the turn.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, computed_field

from benchmarks.v2v.modes import ModeSpec

# The per-turn latencies, in waterfall order. v2v is ``first_audio_ms``.
LATENCY_METRICS: tuple[str, ...] = (
    "speech_stopped_ms",    # input_audio_buffer.speech_stopped (the server's endpoint)
    "final_transcript_ms",  # conversation.item.input_audio_transcription.completed
    "first_text_ms",        # first response.output_audio_transcript.delta / output_text.delta
    "first_audio_ms",       # first reply audio (WebSocket: first response.output_audio.delta;
                            # WebRTC: first audible frame on the received track): v2v
    "done_ms",              # response.done
)
# Reply-quality metrics (not latencies from EoS).
REPLY_METRICS: tuple[str, ...] = ("reply_audio_ms", "gap_total_ms", "gap_max_ms", "gap_count")
# Barge-in turns, ms from the first voiced frame of the interrupting speech.
BARGE_IN_METRICS: tuple[str, ...] = (
    "barge_in_ms",              # input_audio_buffer.speech_started: the client stops playing
    "barge_in_cancel_ms",       # response.done (cancelled) of the interrupted reply, if any
    "barge_in_audio_after_ms",  # reply audio still received after speech_started
)
# Derived per turn: voice-to-voice minus the client-seen speech_stopped, i.e. the work the
# server does after it decided the user had finished (transcript, LLM, first phrase); and
# first audio minus first reply text, the audio path's own delay (a server sends the first
# phrase's text and audio together: ~0 over the WebSocket; over WebRTC the track's pacing,
# Opus and the receiver's jitter buffer). Both are differences within one turn, so they
# hold on a busy machine where the LLM's time swings.
DERIVED_METRICS: tuple[str, ...] = ("after_endpoint_ms", "audio_after_text_ms")
SUMMARY_METRICS: tuple[str, ...] = (LATENCY_METRICS + DERIVED_METRICS + REPLY_METRICS
                                    + BARGE_IN_METRICS)

Phase = Literal["compare", "sweep", "barge_in", "conversation"]
# How the turn's audio and events travelled: the Realtime WebSocket (audio in JSON events)
# or WebRTC (POST /v1/realtime/calls; Opus on RTP, events on the "oai-events" channel).
Transport = Literal["ws", "webrtc"]
TRANSPORTS: tuple[Transport, ...] = ("ws", "webrtc")


class ClipInfo(BaseModel):
    """One spoken user turn of the corpus (audio is 24 kHz mono pcm16)."""

    name: str
    text: str | None = None  # what is said, when known (built-in corpus)
    source: str  # "builtin" or the WAV path
    duration_ms: float  # whole clip, including leading/trailing silence in the file
    speech_end_ms: float  # ground truth: last voiced sample, from the clip start
    # Start of each planted mid-turn pause, ms from the clip start (built-in corpus).
    pauses_ms: list[float] = Field(default_factory=list)


class TurnRecord(BaseModel):
    """One user turn and the server's reply, as seen by the client."""

    phase: Phase
    mode: str  # a mode name (modes.py): "streaming", "serial", "semantic", "default", ...
    transport: Transport = "ws"
    concurrency: int  # simultaneous sessions at the time (1 in the compare phase)
    session_index: int  # which of those sessions
    round: int
    clip: str
    started_s: float  # turn start (connection open), seconds from the run start
    eos_s: float  # ground-truth end of speech, seconds from the run start
    speech_stopped_ms: float | None = None
    final_transcript_ms: float | None = None
    first_text_ms: float | None = None
    first_audio_ms: float | None = None
    done_ms: float | None = None
    reply_audio_ms: float = 0.0  # duration of the reply audio received
    audio_chunks: int = 0  # WebSocket: audio deltas; WebRTC: non-silent 20 ms frames
    # WebSocket: playback simulation; the client starts playing the first chunk on arrival
    # and plays in real time; a gap is a moment the player runs dry before the reply is
    # complete. WebRTC: silence the server's track sent (or frames missing) inside the
    # reply, between its first audible and its last non-silent frame (received.py).
    gap_count: int = 0
    gap_total_ms: float = 0.0
    gap_max_ms: float = 0.0
    gaps: list[tuple[float, float]] = Field(default_factory=list)  # (start from EoS, length)
    early_endpoint: bool = False  # speech_stopped arrived before the ground-truth EoS
    responses: int = 0  # responses started during the turn (> 1: the turn was split)
    transcript: str | None = None  # the server's final transcript of the user
    reply_text: str = ""  # the reply's transcript
    wer: float | None = None  # word error rate of ``transcript`` vs the clip's text
    server: dict[str, float | None] | None = None  # optional cascade.turn.timings extras
    # Barge-in turns only (phase "barge_in"): the user talks over the playing reply.
    barge_in_ms: float | None = None
    barge_in_cancel_ms: float | None = None
    barge_in_audio_after_ms: float | None = None
    truncated: bool | None = None  # conversation.item.truncated arrived
    # The reply had been sent completely, so the client asked for the truncation
    # (conversation.item.truncate), as a Realtime WebSocket client should.
    client_truncate: bool | None = None
    # The server's cascade.turn.timings said whether the speculative LLM start was used
    # for this reply (None: not reported, e.g. not cascade or no timings asked for).
    speculative_hit: bool | None = None
    # Also from cascade.turn.timings (newer servers; None: not reported), summed over the
    # turn's replies: speculative replies started during the user turn (cancelled ones
    # included), and the LLM tokens and TTS audio they produced that were thrown away.
    speculations: int | None = None
    wasted_llm_tokens: int | None = None
    wasted_tts_ms: float | None = None
    # Conversation turns only (phase "conversation"): many turns on one connection.
    connection_id: str | None = None  # the bench's name for the connection
    session_id: str | None = None  # the server's session id (session.created), if sent
    turn_index: int | None = None  # 1 for the connection's first turn
    # Silence streamed in real time between the previous turn's end (its response.done,
    # or its failure) and this turn's leading silence; None for a connection's first turn.
    gap_before_s: float | None = None
    gap_errors: int = 0  # error events the server sent during that silence
    gap_error: str | None = None  # the first of them
    error: str | None = None

    @property
    def replied(self) -> bool:
        return self.error is None and self.first_audio_ms is not None and self.audio_chunks > 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def after_endpoint_ms(self) -> float | None:
        """Voice-to-voice minus the client-seen ``speech_stopped``: what the server spends
        after its endpoint decision (None unless both arrived)."""
        if self.first_audio_ms is None or self.speech_stopped_ms is None:
            return None
        return round(self.first_audio_ms - self.speech_stopped_ms, 1)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def audio_after_text_ms(self) -> float | None:
        """First reply audio minus first reply text: the audio path's own delay (None
        unless both arrived)."""
        if self.first_audio_ms is None or self.first_text_ms is None:
            return None
        return round(self.first_audio_ms - self.first_text_ms, 1)


class MetricStats(BaseModel):
    n: int
    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float


class SpeculationSummary(BaseModel):
    """What the server's speculative replies did for one group of turns, from its
    ``cascade.turn.timings`` (a miss is a reply that was not the speculative one, whether
    a speculation was started and discarded or none was started: see ``speculations``)."""

    reported: int  # turns whose speculative_hit was reported (true or false)
    hits: int  # of those, replies that were the speculative one
    # Turns that reported the newer totals, and their means per turn (None: none did).
    totals_reported: int = 0
    speculations_per_turn: float | None = None
    wasted_llm_tokens_per_turn: float | None = None
    wasted_tts_ms_per_turn: float | None = None
    v2v_hit: MetricStats | None = None  # voice-to-voice of the replied hits
    v2v_miss: MetricStats | None = None  # ... and of the replied misses

    @computed_field  # type: ignore[prop-decorator]
    @property
    def hit_rate(self) -> float | None:
        """Share of the reported turns whose reply was the speculative one."""
        return round(self.hits / self.reported, 3) if self.reported else None


class GroupSummary(BaseModel):
    """The turns of one mode and transport (compare phase) or one mode at one concurrency
    (sweep)."""

    mode: str
    transport: Transport = "ws"
    concurrency: int
    turns: int
    replied: int  # turns that got reply audio
    errors: int
    gap_turns: int  # turns whose reply audio had at least one gap
    realtime: bool  # every turn replied and at most 10 % of turns had a gap
    early_endpoints: int = 0  # turns the server ended before the user did (e.g. in a pause)
    wer_mean: float | None = None  # mean word error rate of the server's transcripts
    metrics: dict[str, MetricStats]  # keyed by SUMMARY_METRICS names present
    speculation: SpeculationSummary | None = None  # None: the server reported nothing


class TurnIndexSummary(BaseModel):
    """The turns at one position of the conversations of one mode."""

    turn_index: int  # 1: the connection's first turn
    gap_before_s: float | None  # the longest silence before this turn (None for turn 1)
    turns: int
    replied: int
    v2v_p50: float | None = None  # voice-to-voice of the replied turns
    errors: list[str] = Field(default_factory=list)  # distinct reasons of the failed turns


class ConversationSummary(BaseModel):
    """One mode's conversations: many turns on one connection, with gaps of silence."""

    mode: str
    connections: int
    turns: int
    replied: int
    failed: int  # turns that got no spoken reply (an error, a deaf or dead server)
    first_turn: MetricStats | None = None  # v2v of each connection's turn 1
    later_turns: MetricStats | None = None  # v2v of turns 2..N
    # Turns right after a silence of at least LONG_GAP_S (the server's old input limit).
    long_gap_turns: int = 0
    long_gap_replied: int = 0
    after_long_gap: MetricStats | None = None  # v2v of those that replied
    # The server's speculative_hit over the turns it reported it for (true or false).
    speculative_hits: int = 0
    speculative_reported: int = 0
    after_endpoint: MetricStats | None = None  # v2v - speech_stopped, replied turns
    by_turn: list[TurnIndexSummary] = Field(default_factory=list)
    speculation: SpeculationSummary | None = None  # None: the server reported nothing

    @computed_field  # type: ignore[prop-decorator]
    @property
    def speculative_hit_rate(self) -> float | None:
        """Share of the reported turns whose reply was the speculative one (None: the
        server reported none)."""
        if not self.speculative_reported:
            return None
        return round(self.speculative_hits / self.speculative_reported, 3)


class MachineInfo(BaseModel):
    date: str  # ISO 8601, UTC
    cpu: str
    cores: int
    memory_gib: float
    platform: str
    python: str
    commit: str | None = None  # git commit of the benchmark's checkout, when known


class BenchConfig(BaseModel):
    target: str  # the Realtime URL measured
    embedded: bool  # True: the bench started `cascade serve` itself
    modes: list[str]
    # What each mode sent: cascade pipeline (None: standard events only) and turn detection.
    mode_specs: list[ModeSpec] = Field(default_factory=list)
    # Compare-phase transports (the other phases use the WebSocket), and the WebRTC calls
    # endpoint when WebRTC is measured.
    transports: list[Transport] = Field(default_factory=lambda: list(TRANSPORTS[:1]))
    calls_url: str | None = None
    rounds: int
    clips: list[ClipInfo]
    concurrency: list[int]  # sweep levels (empty: no sweep)
    sweep_rounds: int
    barge_in_rounds: int = 0  # barge-in turns per mode
    warmup: int = 0  # untimed turns before the compare phase
    max_output_tokens: int | None = None  # reply cap sent in session.update
    instructions: str = ""
    dialect: str = "ga"
    # Conversation phase: connections per mode, turns per connection, and the silences
    # between turns (seconds before turn 2, 3, ...; cycled when shorter).
    conversation_rounds: int = 0
    conversation_turns: int = 0
    conversation_gaps_s: list[float] = Field(default_factory=list)
    gap_threshold_ms: float  # underruns shorter than this are not counted as gaps
    # Real-time silence streamed before each clip; silence then follows the clip until the
    # reply is done, like an open microphone.
    lead_ms: float


class Report(BaseModel):
    version: Literal[1] = 1
    machine: MachineInfo
    config: BenchConfig
    records: list[TurnRecord]
    compare: list[GroupSummary]  # one per transport and mode
    # serial / streaming for each latency metric's p50 and p90 (absent without both modes),
    # of the first transport's turns
    ratio: dict[str, dict[str, float]] = Field(default_factory=dict)
    sweep: list[GroupSummary] = Field(default_factory=list)  # one per (mode, concurrency)
    barge_in: list[GroupSummary] = Field(default_factory=list)  # one per mode
    conversation: list[ConversationSummary] = Field(default_factory=list)  # one per mode
    # Per mode: the largest swept concurrency at which replies stayed real-time (None:
    # not even the first level was real-time).
    realtime_limit: dict[str, int | None] = Field(default_factory=dict)
    wall_s: float = 0.0
