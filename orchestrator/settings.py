"""Settings of the Realtime server process (``cascade serve``), env prefix ``CASCADE_``.

Every knob of the server is declared and documented here, once; the session, the
transport and the store read them from this object. ``CASCADE_LLM_API_KEY`` is shared on
purpose with the LLM stage's settings: both name the key of the upstream LLM server.

Stage placement follows the three URLs: none set runs the bundled engines in-process (the
one-machine CPU default), all three set talks to stage services (the distributed shape),
and ``llm_url`` alone runs ASR and TTS in-process with a remote OpenAI-compatible LLM
(vLLM on a GPU box). Only ASR without TTS (or the reverse) is refused when the settings
are built, before anything is loaded: it is almost always a typo in one variable.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.limits import DEFAULT_TENANT, ApiKeyConfig, KeyRing, TenantLimits
from orchestrator.policy import StageDeadlines
from orchestrator.store.settings import StoreSettings
from stages.common.access import StageAccess
from stages.common.cpu import CpuBudget
from stages.common.replicas import split_urls

Pipeline = Literal["streaming", "serial"]

MIB = 1024 * 1024


class ServeSettings(BaseSettings):
    # hide_input_in_errors: a validation error must not echo the keys it was given
    model_config = SettingsConfigDict(env_prefix="CASCADE_", extra="ignore",
                                      hide_input_in_errors=True)

    # --- network and auth --------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # When set, clients must present it: "Authorization: Bearer <key>" or the browser
    # subprotocol "openai-insecure-api-key.<key>". Empty: no authentication.
    api_key: str = ""
    # More keys, one per client ("tenant"), each with its own limits (orchestrator/limits.py):
    # JSON, e.g. [{"name": "acme", "key": "sk-...", "max_sessions": 8}]. With any key set,
    # every endpoint that costs compute or reveals data needs one. Tenant of api_key: "default".
    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    # Per-key limits for keys that do not set their own (and for api_key): concurrent
    # sessions (0: only max_sessions) and new connections per window (0: unlimited).
    key_max_sessions: int = Field(default=0, ge=0)
    key_connection_rate: int = Field(default=300, ge=0)
    key_connection_window_s: float = Field(default=60.0, gt=0)

    # TLS served directly (PEM files: certificate chain, private key; both or neither):
    # https:// and wss:// only. Or terminate TLS at an ingress (docs/security.md).
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    # Stage services: the key they require (CASCADE_STAGE_API_KEY, the same variable the
    # stages read; sent as a Bearer token, to the LLM only when llm_api_key is empty) and
    # a PEM bundle trusted for https:// stage URLs ("" = the system's trust store).
    stage_api_key: str = ""
    stage_ca_file: str = ""

    # Browser origins allowed to call the API cross-origin (CORS), e.g.
    # ["https://app.example.com"]; empty: no CORS headers (same-origin pages only).
    cors_origins: list[str] = Field(default_factory=list)

    # --- browser demo page (served at /) ----------------------------------------------------
    # The page at / and its token endpoint POST /demo/token, which mints short-lived ek_
    # keys with the server's own key. The token endpoint answers loopback clients only
    # unless demo_public is set: anyone who can reach it can talk to the agent.
    demo: bool = True
    demo_public: bool = False

    # --- WebRTC (POST /v1/realtime/calls) ----------------------------------------------------
    # ICE servers as RTCIceServer dicts: [{"urls": "stun:stun.example.org:3478"},
    # {"urls": "turn:turn.example.org:3478", "username": "u", "credential": "p"}].
    # Empty (default): host candidates only (no third-party STUN is contacted).
    ice_servers: list[dict[str, str | list[str]]] = Field(default_factory=list)
    # Host addresses offered as ICE candidates; empty: every non-loopback interface address.
    # Set it to the address clients can reach (e.g. a node's IP); "127.0.0.1" serves
    # clients on this machine only (tests, a loopback-only network namespace).
    ice_host_addresses: list[str] = Field(default_factory=list)
    # A call that has not connected after this many seconds is closed and cleaned up.
    webrtc_connect_timeout_s: float = Field(default=20.0, gt=0)
    # Concurrent WebRTC calls count against max_sessions like WebSocket sessions.

    # --- session store -------------------------------------------------------------------
    # redis://host:port/db; empty: the in-process memory store (no resume across processes).
    redis_url: str = ""

    # --- pipeline ------------------------------------------------------------------------
    # Server default; a session may pick the other one in its config.
    pipeline: Pipeline = "streaming"
    # Stage services; all empty = embedded engines, all set = distributed, only llm_url =
    # embedded ASR and TTS with a remote LLM. Each may list replicas ("http://a:8001,
    # http://b:8001") or name a DNS name with many addresses (a headless Service): streams
    # go to the least-loaded healthy replica (stages/common/replicas.py).
    asr_url: str = ""
    llm_url: str = ""
    tts_url: str = ""
    # Model name sent to a remote OpenAI-compatible LLM ("" = the client's default).
    llm_model: str = ""
    llm_api_key: str = ""
    # The LLM's context window in tokens; 0: ask the stage (the embedded engine's n_ctx, or
    # `max_model_len` from a server's /v1/models, as vLLM reports it). The prompt keeps the
    # instructions and the newest turns that fit (orchestrator/context.py).
    llm_context_window: int = Field(default=0, ge=0)
    # Send each session's instructions to the LLM once when they are set (a 1-token
    # request), so its prompt cache holds them before the first reply. Off for a paid API
    # that bills every request.
    llm_prime_instructions: bool = True
    # While the user speaks, let the LLM read each turn's prompt up to the words recognized
    # so far (prefill-only requests, policy.py step 1), so the reply prefills only the last
    # words. A few extra requests per turn: off for a paid API that bills every request.
    llm_prime_turns: bool = True

    # --- CPU budget of the embedded engines (stages/common/cpu.py) --------------------------
    # Threads in all (0: the cores this process may use); per stage (0: the whole budget,
    # since a turn's stages mostly take turns; idle threads sleep instead of spinning).
    cpu_threads: int = Field(default=0, ge=0)
    asr_threads: int = Field(default=0, ge=0)
    llm_threads: int = Field(default=0, ge=0)
    tts_threads: int = Field(default=0, ge=0)
    # Generations the embedded LLM runs at once (llama.cpp contexts; 0: the LLM stage's
    # default, CASCADE_LLM_PARALLEL).
    llm_parallel: int = Field(default=0, ge=0)

    # --- limits (each bounds what one client can make the server hold or do) --------------
    # Concurrent Realtime connections of this process; more are refused with close 1013.
    max_sessions: int = Field(default=64, ge=1)
    # Wall-clock life of one connection; then an error event and close.
    max_session_s: float = Field(default=3600.0, gt=0)
    # A WebSocket session with no client frame for this long, while nothing is being said
    # or played, gets an error event session_idle_timeout and a clean close (0: never).
    max_idle_s: float = Field(default=600.0, ge=0)
    # Largest client frame (OpenAI's limit); a bigger one is answered with an error event.
    max_event_bytes: int = Field(default=15 * MIB, ge=1024)
    # Audio carried by one input_audio_buffer.append (or one binary frame).
    max_append_ms: int = Field(default=10_000, ge=20)
    # Uncommitted input audio held for one session.
    max_buffer_ms: int = Field(default=60_000, ge=20)
    # Input audio may arrive at most this many times faster than real time, averaged
    # over a few seconds (a client replaying a file must pace it).
    max_audio_rate: float = Field(default=4.0, gt=0)
    # Conversation items of one session (mapped into the store's bound).
    max_items: int = Field(default=1000, ge=1)
    # Server events queued for one client; a client that reads slower than the session
    # produces fills it and is disconnected (close 1008) rather than buffered without bound.
    send_queue_events: int = Field(default=512, ge=1)
    # How long a closing handshake (or the final flush before it) may wait on the client.
    close_timeout_s: float = Field(default=5.0, gt=0)
    # SIGTERM (a rolling update, a scale-down): /readyz turns 503 and new sessions are
    # refused at once; each live session is closed at its next idle moment (no reply being
    # generated or played, the user not speaking) with an error event ``server_draining``
    # and close 1012, so its client resumes it elsewhere with session_id + resume_token;
    # after this many seconds the rest are closed the same way (0: close all at once).
    # Kubernetes' terminationGracePeriodSeconds must be longer.
    drain_timeout_s: float = Field(default=20.0, ge=0)

    # --- stage deadlines (seconds; see orchestrator/policy.py, step 7) --------------------
    # Sized for the CPU default with a few concurrent sessions; a GPU deployment can cut them.
    # A stage past its deadline fails only what waited on it (the turn's transcript falls
    # back to the newest hypothesis; a reply ends "failed" with an error event).
    asr_open_timeout_s: float = Field(default=5.0, gt=0)
    asr_finalize_timeout_s: float = Field(default=5.0, gt=0)
    llm_first_token_timeout_s: float = Field(default=15.0, gt=0)
    llm_stall_timeout_s: float = Field(default=10.0, gt=0)
    tts_timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("ice_host_addresses")
    @classmethod
    def _ip_addresses(cls, addresses: list[str]) -> list[str]:
        for address in addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"ICE host address {address!r} is not an IP address") from None
        return addresses

    @model_validator(mode="after")
    def _stage_urls_consistent(self) -> ServeSettings:
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("ssl_certfile and ssl_keyfile must be set together")
        if bool(self.asr_url) != bool(self.tts_url):
            missing = "tts_url" if self.asr_url else "asr_url"
            raise ValueError(
                "asr_url and tts_url must be both set (remote stages) or both empty "
                f"(embedded engines; llm_url may still be remote); missing: {missing}")
        if self.asr_url and not self.llm_url:
            raise ValueError("with remote ASR and TTS the LLM must be remote too; "
                             "missing: llm_url")
        for name in ("asr_url", "llm_url", "tts_url"):
            value = getattr(self, name)
            if value:
                try:
                    split_urls(value)
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        return self

    @model_validator(mode="after")
    def _keys_distinct(self) -> ServeSettings:
        if self.api_key and any(k.name == DEFAULT_TENANT for k in self.api_keys):
            raise ValueError(f"api_keys: the name {DEFAULT_TENANT!r} is api_key's")
        self.key_ring()  # duplicate names or values are refused at startup
        return self

    @property
    def auth_required(self) -> bool:
        """True when clients must present a key (api_key or any of api_keys)."""
        return bool(self.api_key or self.api_keys)

    def key_ring(self) -> KeyRing:
        """Every configured key by tenant name, with its limits."""
        default = TenantLimits(self.key_max_sessions, self.key_connection_rate,
                               self.key_connection_window_s)
        keys = [(DEFAULT_TENANT, self.api_key)] if self.api_key else []
        limits = {}
        for entry in self.api_keys:
            keys.append((entry.name, entry.key))
            limits[entry.name] = TenantLimits(
                default.max_sessions if entry.max_sessions is None else entry.max_sessions,
                default.connection_rate if entry.connection_rate is None
                else entry.connection_rate,
                entry.connection_window_s or default.connection_window_s)
        return KeyRing(keys, limits, default)

    @property
    def distributed(self) -> bool:
        """True when the stages are remote services."""
        return bool(self.asr_url)

    def stage_access(self) -> StageAccess:
        """The key and TLS trust of the stage clients."""
        return StageAccess(self.stage_api_key, self.stage_ca_file)

    def cpu_budget(self) -> CpuBudget:
        return CpuBudget(total=self.cpu_threads, asr=self.asr_threads, llm=self.llm_threads,
                         tts=self.tts_threads)

    def store_settings(self) -> StoreSettings:
        """The store's settings: its own ``CASCADE_STORE_*`` env plus the fields set here."""
        return StoreSettings(redis_url=self.redis_url or None, max_items=self.max_items)

    def deadlines(self) -> StageDeadlines:
        return StageDeadlines(
            asr_open_s=self.asr_open_timeout_s, asr_finalize_s=self.asr_finalize_timeout_s,
            llm_first_token_s=self.llm_first_token_timeout_s,
            llm_stall_s=self.llm_stall_timeout_s, tts_s=self.tts_timeout_s)
