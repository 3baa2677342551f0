"""Responses: the ``response`` parameter of ``response.create`` and the response object of
``response.created`` / ``response.done``.

``ResponseConfig`` overrides session defaults for one response. Beta clients send
``modalities``, ``max_response_output_tokens``, ``voice`` and ``output_audio_format`` at the
top level; they are rewritten into the GA names. ``conversation: "none"`` makes an
out-of-band response (not added to the default conversation); ``input`` replaces the
conversation as the model's context for that response.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, JsonValue, model_validator

from orchestrator.protocol.base import CompactModel, WireModel, nested_object, new_response_id
from orchestrator.protocol.formats import AudioFormat, format_from_beta
from orchestrator.protocol.items import ConversationItem
from orchestrator.protocol.session import (
    FunctionTool,
    MaxTokens,
    Modality,
    ToolChoice,
    audio_only,
    single_modality,
)

ResponseStatus = Literal["in_progress", "completed", "cancelled", "incomplete", "failed"]
StatusReason = Literal["turn_detected", "client_cancelled", "max_output_tokens", "content_filter"]


class ResponseAudioOutput(CompactModel):
    format: AudioFormat | None = None
    voice: str | None = None


class ResponseAudio(CompactModel):
    output: ResponseAudioOutput | None = None


def _beta_response_to_ga(data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    beta = ("modalities", "max_response_output_tokens", "voice", "output_audio_format")
    if not any(k in data for k in beta):
        return data
    out = {k: v for k, v in data.items() if k not in beta}
    if "modalities" in data:
        out.setdefault("output_modalities", data["modalities"])
    if "max_response_output_tokens" in data:
        out.setdefault("max_output_tokens", data["max_response_output_tokens"])
    audio = nested_object(out, "audio", "audio")
    output = nested_object(audio, "output", "audio.output")
    if "voice" in data:
        output.setdefault("voice", data["voice"])
    if "output_audio_format" in data:
        output.setdefault(
            "format", format_from_beta(data["output_audio_format"], "output_audio_format")
        )
    if output:
        audio["output"] = output
        out["audio"] = audio
    return out


class ResponseConfig(WireModel):
    """The optional ``response`` of ``response.create``."""

    instructions: str | None = None
    output_modalities: list[Modality] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoice | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    conversation: Literal["auto", "none"] | None = None
    input: list[ConversationItem] | None = None
    metadata: dict[str, str] | None = None
    audio: ResponseAudio | None = None
    # Accepted for compatibility, not acted on:
    prompt: JsonValue = None
    reasoning: JsonValue = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _accept_beta(cls, data: Any) -> Any:
        return _beta_response_to_ga(data)

    @model_validator(mode="after")
    def _normalize_modalities(self) -> ResponseConfig:
        if self.output_modalities is not None:
            self.output_modalities = single_modality(self.output_modalities)
        return self


class StatusError(CompactModel):
    type: str | None = None
    code: str | None = None
    message: str | None = None


class StatusDetails(CompactModel):
    type: Literal["completed", "cancelled", "incomplete", "failed"] | None = None
    reason: StatusReason | None = None
    error: StatusError | None = None


class InputTokenDetails(CompactModel):
    text_tokens: int | None = None
    audio_tokens: int | None = None
    cached_tokens: int | None = None


class OutputTokenDetails(CompactModel):
    text_tokens: int | None = None
    audio_tokens: int | None = None


class Usage(CompactModel):
    total_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    input_token_details: InputTokenDetails | None = None
    output_token_details: OutputTokenDetails | None = None


class Response(WireModel):
    """The response object; ``output`` holds the items the response produced."""

    id: str = Field(default_factory=new_response_id)
    object: Literal["realtime.response"] = "realtime.response"
    status: ResponseStatus = "in_progress"
    status_details: StatusDetails | None = None
    output: list[ConversationItem] = Field(default_factory=list)
    conversation_id: str | None = None
    output_modalities: list[Modality] = Field(default_factory=audio_only)
    max_output_tokens: MaxTokens = "inf"
    audio: ResponseAudio | None = None
    usage: Usage | None = None
    metadata: dict[str, str] | None = None
