"""TTS stage interface: chunk/word models, wire events and the backend Protocol.

The in-process engine (``PiperTts``) and the network client (``TtsClient``) implement the
same ``TtsBackend`` Protocol, so a caller cannot tell them apart.

Wire protocol of ``/v1/stream`` (WebSocket): the client sends JSON text messages
``TextEvent`` / ``FlushEvent`` / ``CancelEvent``; the server answers ``ReadyEvent`` once,
then for each chunk one ``ChunkEvent`` JSON message immediately followed by one binary
message with the chunk's pcm16 audio, ``DoneEvent`` after a flush, ``CancelledEvent``
after a cancel, and ``ErrorEvent`` for bad input.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, Protocol

from pydantic import BaseModel, Field

SUPPORTED_RATES = (8_000, 16_000, 22_050, 24_000, 44_100, 48_000)


class TtsError(ValueError):
    """Bad input to the TTS stage (empty text, bad rate, unknown voice...)."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code


class TtsWord(BaseModel):
    """One word of a chunk; times are offsets within that chunk's audio."""

    text: str
    start_ms: float
    end_ms: float


class TtsChunk(BaseModel):
    """Audio for one phrase. ``text`` is the exact input slice it voices (with the
    whitespace that follows), starting at ``text_offset`` in the stream's input."""

    index: int
    text: str
    text_offset: int
    audio: bytes = Field(repr=False)
    sample_rate: int
    duration_ms: float
    words: list[TtsWord] | None = None


class TtsStream(Protocol):
    async def push_text(self, text: str) -> None: ...

    async def flush(self) -> None: ...

    def chunks(self) -> AsyncIterator[TtsChunk]: ...

    async def aclose(self) -> None: ...


class TtsBackend(Protocol):
    async def open_stream(self, *, voice: str | None = None,
                          sample_rate: int = 24000) -> TtsStream: ...

    async def synthesize(self, text: str, *, voice: str | None = None,
                         sample_rate: int = 24000) -> list[TtsChunk]: ...

    async def aclose(self) -> None: ...


# --- WebSocket events (client -> server) ---

class TextEvent(BaseModel):
    type: Literal["text"]
    text: str


class FlushEvent(BaseModel):
    type: Literal["flush"]


class CancelEvent(BaseModel):
    type: Literal["cancel"]


ClientEvent = TextEvent | FlushEvent | CancelEvent


# --- WebSocket events (server -> client) ---

class ReadyEvent(BaseModel):
    type: Literal["ready"] = "ready"
    sample_rate: int
    voice: str


class ChunkEvent(BaseModel):
    """Header of one chunk; its audio follows as the next (binary) message."""

    type: Literal["chunk"] = "chunk"
    index: int
    text: str
    text_offset: int
    sample_rate: int
    duration_ms: float
    words: list[TtsWord] | None
    audio_bytes: int


class DoneEvent(BaseModel):
    type: Literal["done"] = "done"


class CancelledEvent(BaseModel):
    type: Literal["cancelled"] = "cancelled"


class ErrorEvent(BaseModel):
    type: Literal["error"] = "error"
    code: str
    message: str
