"""Wire messages and the interface of the ASR stage.

The same ``AsrBackend`` / ``AsrStream`` protocols are implemented by the in-process engine
(``engine.WhisperAsr``) and by the network client (``client.AsrClient``), so a caller cannot
tell them apart. Events are small pydantic models tagged by ``type``; audio travels as raw
pcm16 bytes, never inside JSON.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field


class AsrWord(BaseModel):
    """One recognized word; times are seconds from the start of the stream (or file)."""

    word: str
    start: float
    end: float
    probability: float


class AsrPartial(BaseModel):
    """Interim result. ``stable`` never changes or retracts: every later partial's (and the
    final's) text starts with it. ``unstable`` is the current guess for the rest."""

    type: Literal["partial"] = "partial"
    stable: str
    unstable: str
    audio_ms: int
    revision: int


class AsrFinal(BaseModel):
    """The transcript of a whole stream (or file) once the caller asked to finalize."""

    type: Literal["final"] = "final"
    text: str
    words: list[AsrWord]
    audio_ms: int
    finalize_ms: float


class AsrError(BaseModel):
    """Sent on the WebSocket when a message is refused; ``code`` is machine readable."""

    type: Literal["error"] = "error"
    code: str
    message: str


AsrEvent = Annotated[AsrPartial | AsrFinal | AsrError, Field(discriminator="type")]


# Client -> server control messages on the WebSocket (text frames).
class FinalizeMessage(BaseModel):
    type: Literal["finalize"]


class CloseMessage(BaseModel):
    type: Literal["close"]


class EndOfSpeechMessage(BaseModel):
    """The caller's VAD heard the speech end at ``audio_ms`` (ms since the stream start)."""

    type: Literal["end_of_speech"]
    audio_ms: int = Field(ge=0)


ControlMessage = Annotated[FinalizeMessage | CloseMessage | EndOfSpeechMessage,
                           Field(discriminator="type")]


@runtime_checkable
class AsrStream(Protocol):
    """One utterance/turn of streaming recognition."""

    async def push(self, pcm16: bytes) -> None:
        """Append 16 kHz mono pcm16 audio; awaits while the stream's bounded buffer is full."""
        ...

    def partials(self) -> AsyncIterator[AsrPartial]:
        """Interim results as they are produced; ends after finalize() or aclose()."""
        ...

    async def end_of_speech(self, audio_ms: int) -> None:
        """Hint from the caller's VAD: the speech paused at ``audio_ms`` (ms since the
        stream start). Decode up to there now, without waiting for the next scheduled
        decode; if finalize() follows with no speech in between, that decode is the final
        one (the trailing silence is never decoded again). Later speech voids the hint."""
        ...

    async def finalize(self) -> AsrFinal:
        """No more audio: return the transcript of everything pushed."""
        ...

    async def aclose(self) -> None:
        """Abandon the stream (idempotent)."""
        ...


@runtime_checkable
class AsrBackend(Protocol):
    async def open_stream(
        self, *, language: str | None = None, prompt: str | None = None
    ) -> AsrStream: ...

    async def transcribe(self, pcm16: bytes, sample_rate: int = 16000) -> AsrFinal: ...

    async def aclose(self) -> None: ...
