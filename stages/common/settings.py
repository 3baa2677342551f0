"""Settings shared by every stage service; each stage extends ``StageSettings``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Device = Literal["cpu", "cuda", "auto"]


class StageSettings(BaseSettings):
    """Network, limits and device for one stage. Env prefix is set per stage."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = 8000
    device: Device = "cpu"
    # Inference threads per model on CPU (the embedded default runs on 2 cores).
    cpu_threads: int = 2
    max_streams: int = 64
    # Largest single request body / WebSocket message accepted, in bytes.
    max_message_bytes: int = 4 * 1024 * 1024
    # Bound for each per-stream queue (audio chunks, events, text pieces).
    queue_size: int = 256
    # SIGTERM: refuse new streams and let those in progress finish for up to this long
    # (0: stop at once). Kubernetes' terminationGracePeriodSeconds must be longer.
    drain_timeout_s: float = 20.0
    # Every request but /healthz, /readyz and /metrics must carry "Authorization: Bearer
    # <key>" (stages/common/access.py). One variable for the three stages and the
    # orchestrator's clients: CASCADE_STAGE_API_KEY. Empty: open (then keep the service
    # on loopback, the default host, or a private network: docs/security.md).
    stage_api_key: str = Field(default="", validation_alias="CASCADE_STAGE_API_KEY")
    # TLS served directly (PEM files: certificate chain, private key); both or neither.
    ssl_certfile: str = ""
    ssl_keyfile: str = ""

    @model_validator(mode="after")
    def _tls_pair(self) -> StageSettings:
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("ssl_certfile and ssl_keyfile must be set together")
        return self
