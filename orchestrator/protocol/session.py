"""Session configuration: the ``session`` of ``session.update`` and the effective session
returned in ``session.created`` / ``session.updated``.

Design:

* One set of models serves both directions. An update is partial: pydantic's
  ``model_fields_set`` tells "absent" (keep the current value) from an explicit ``null``
  (``turn_detection: null`` switches to manual turns). ``apply_update`` merges an update
  into the effective ``Session`` field by field, recursing into nested objects, so
  ``{"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 0.7}}}}``
  changes only the threshold. A ``null`` for a field the effective session cannot be
  without (``audio``, ``instructions``, ``tools``...) counts as absent.
* Beta clients send a flat session (``modalities``, ``input_audio_format: "pcm16"``,
  ``turn_detection`` at the top level, ...). A ``before`` validator rewrites it into the
  GA shape, so the rest of cascade sees GA only. A GA field wins over its beta twin.
* ``truncation`` (``"auto"``, ``"disabled"``, ``retention_ratio``) decides how a long
  conversation is trimmed to the LLM's context window (``orchestrator/context.py``); an
  update replaces it whole.
* Fields that OpenAI defines but cascade does not act on (``tracing``, ``prompt``,
  ``include``, ...) are accepted and ignored, so stock clients work; truly
  unknown fields are rejected.
* ``cascade`` is our extension (``{"pipeline": "streaming" | "serial"}``). Standard clients
  never send it, and the SDK's models tolerate it as an extra field in ``session.updated``.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    Field,
    JsonValue,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
    model_validator,
)

from orchestrator.protocol.base import (
    CompactModel,
    WireModel,
    nested_object,
    new_session_id,
    wire_dialect,
)
from orchestrator.protocol.formats import AudioFormat, AudioPCM, format_from_beta

Modality = Literal["text", "audio"]
MaxTokens = Annotated[int, Field(ge=1, le=4096)] | Literal["inf"]
ToolChoiceMode = Literal["auto", "none", "required"]

DEFAULT_VOICE = "alloy"


def audio_only() -> list[Modality]:
    """The default output modalities: audio (with its transcript)."""
    return ["audio"]


DEFAULT_VAD_THRESHOLD = 0.5
DEFAULT_PREFIX_PADDING_MS = 300
DEFAULT_SILENCE_DURATION_MS = 500


class ServerVad(WireModel):
    type: Literal["server_vad"] = "server_vad"
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(default=None, ge=0)
    silence_duration_ms: int | None = Field(default=None, ge=0)
    create_response: bool | None = None
    interrupt_response: bool | None = None
    idle_timeout_ms: int | None = Field(default=None, ge=0)

    def with_defaults(self) -> ServerVad:
        return self.model_copy(
            update={
                "threshold": _or(self.threshold, DEFAULT_VAD_THRESHOLD),
                "prefix_padding_ms": _or(self.prefix_padding_ms, DEFAULT_PREFIX_PADDING_MS),
                "silence_duration_ms": _or(self.silence_duration_ms, DEFAULT_SILENCE_DURATION_MS),
                "create_response": _or(self.create_response, True),
                "interrupt_response": _or(self.interrupt_response, True),
            }
        )


class SemanticVad(WireModel):
    type: Literal["semantic_vad"] = "semantic_vad"
    eagerness: Literal["low", "medium", "high", "auto"] | None = None
    create_response: bool | None = None
    interrupt_response: bool | None = None

    def with_defaults(self) -> SemanticVad:
        return self.model_copy(
            update={
                "eagerness": _or(self.eagerness, "auto"),
                "create_response": _or(self.create_response, True),
                "interrupt_response": _or(self.interrupt_response, True),
            }
        )


TurnDetection = Annotated[ServerVad | SemanticVad, Field(discriminator="type")]


class Transcription(CompactModel):
    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    languages: list[str] | None = None
    keywords: list[str] | None = None
    delay: Literal["minimal", "low", "medium", "high", "xhigh"] | None = None


class NoiseReduction(CompactModel):
    type: Literal["near_field", "far_field"] | None = None
    strength: float | None = None


class AudioInput(WireModel):
    format: AudioFormat | None = None
    transcription: Transcription | None = None
    noise_reduction: NoiseReduction | None = None
    turn_detection: TurnDetection | None = None


class AudioOutput(WireModel):
    format: AudioFormat | None = None
    voice: str | None = None
    speed: float | None = Field(default=None, ge=0.25, le=1.5)


class AudioConfig(WireModel):
    input: AudioInput | None = None
    output: AudioOutput | None = None


class FunctionTool(CompactModel):
    type: Literal["function"] = "function"
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, JsonValue] | None = None


class ToolChoiceFunction(WireModel):
    type: Literal["function"] = "function"
    name: str


ToolChoice = ToolChoiceMode | ToolChoiceFunction


class TruncationTokenLimits(CompactModel):
    post_instructions: int | None = Field(default=None, ge=1)


class RetentionRatioTruncation(CompactModel):
    """OpenAI's ``truncation: {"type": "retention_ratio", ...}``: when the conversation no
    longer fits, keep only ``retention_ratio`` of the post-instruction token budget
    (``token_limits.post_instructions`` lowers that budget), so later turns do not trim
    again at once."""

    type: Literal["retention_ratio"]
    retention_ratio: float = Field(ge=0.0, le=1.0)
    token_limits: TruncationTokenLimits | None = None


# "auto": drop the oldest messages that do not fit; "disabled": fail instead.
Truncation = Literal["auto", "disabled"] | RetentionRatioTruncation


class CascadeOptions(CompactModel):
    """cascade's extension: ``streaming`` overlaps ASR, LLM and TTS; ``serial`` is the
    baseline (full transcript, then full reply, then full synthesis)."""

    pipeline: Literal["streaming", "serial"] = "streaming"
    # Send a cascade.turn.timings event (server-side stage timings) after each voice turn.
    timings: bool = False
    # Server -> client only: present with session_id to reconnect to this conversation
    # (query parameters of /v1/realtime). Ignored when a client sends it.
    resume_token: str | None = None


def _beta_session_to_ga(data: Any) -> Any:
    """Rewrite a beta (flat) session object into the GA nested shape."""
    if not isinstance(data, dict):
        return data
    beta_keys = (
        "modalities",
        "input_audio_format",
        "output_audio_format",
        "input_audio_transcription",
        "input_audio_noise_reduction",
        "turn_detection",
        "voice",
        "speed",
        "max_response_output_tokens",
        "client_secret",
    )
    if not any(k in data for k in beta_keys):
        return data
    out = {k: v for k, v in data.items() if k not in beta_keys}
    audio = nested_object(out, "audio", "audio")
    inp = nested_object(audio, "input", "audio.input")
    outp = nested_object(audio, "output", "audio.output")
    if "input_audio_format" in data:
        inp.setdefault("format", format_from_beta(data["input_audio_format"], "input_audio_format"))
    if "output_audio_format" in data:
        outp.setdefault(
            "format", format_from_beta(data["output_audio_format"], "output_audio_format")
        )
    if "input_audio_transcription" in data:
        inp.setdefault("transcription", data["input_audio_transcription"])
    if "input_audio_noise_reduction" in data:
        inp.setdefault("noise_reduction", data["input_audio_noise_reduction"])
    if "turn_detection" in data:
        td = data["turn_detection"]
        if isinstance(td, dict) and "type" not in td:
            td = {**td, "type": "server_vad"}
        inp.setdefault("turn_detection", td)
    if "voice" in data:
        outp.setdefault("voice", data["voice"])
    if "speed" in data:
        outp.setdefault("speed", data["speed"])
    if "modalities" in data:
        out.setdefault("output_modalities", data["modalities"])
    if "max_response_output_tokens" in data:
        out.setdefault("max_output_tokens", data["max_response_output_tokens"])
    if inp:
        audio["input"] = inp
    if outp:
        audio["output"] = outp
    if audio:
        out["audio"] = audio
    return out


def single_modality(value: list[Modality] | None) -> list[Modality] | None:
    """GA allows one output modality; ``audio`` always carries a transcript, so the beta
    ``["text", "audio"]`` means ``["audio"]``."""
    if value is None or len(value) <= 1:
        return value
    return ["audio"] if "audio" in value else ["text"]


class SessionConfig(WireModel):
    """The ``session`` object of ``session.update`` (every field optional)."""

    type: Literal["realtime"] | None = None
    model: str | None = None
    instructions: str | None = None
    output_modalities: list[Modality] | None = None
    audio: AudioConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoice | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_output_tokens: MaxTokens | None = None
    cascade: CascadeOptions | None = None
    # How history is trimmed to the LLM's context window (orchestrator/context.py);
    # None = "auto".
    truncation: Truncation | None = None
    # Accepted for compatibility, not acted on:
    include: list[str] | None = None
    tracing: JsonValue = None
    prompt: JsonValue = None
    parallel_tool_calls: bool | None = None
    reasoning: JsonValue = None

    @model_validator(mode="before")
    @classmethod
    def _accept_beta(cls, data: Any) -> Any:
        return _beta_session_to_ga(data)

    @model_validator(mode="after")
    def _normalize_modalities(self) -> SessionConfig:
        if self.output_modalities is not None:
            self.output_modalities = single_modality(self.output_modalities)
        return self


def _default_audio() -> AudioConfig:
    return AudioConfig(
        input=AudioInput(
            format=AudioPCM(),
            transcription=None,
            noise_reduction=None,
            turn_detection=ServerVad().with_defaults(),
        ),
        output=AudioOutput(format=AudioPCM(), voice=DEFAULT_VOICE, speed=1.0),
    )


NOT_IN_GA_SESSION = ("temperature", "parallel_tool_calls")


class Session(SessionConfig):
    """The effective session, as sent in ``session.created`` / ``session.updated``."""

    type: Literal["realtime"] = "realtime"
    object: Literal["realtime.session"] = "realtime.session"
    id: str = Field(default_factory=new_session_id)
    model: str = "cascade"
    instructions: str = ""
    output_modalities: list[Modality] = Field(default_factory=audio_only)
    audio: AudioConfig = Field(default_factory=_default_audio)
    tools: list[FunctionTool] = Field(default_factory=list)
    tool_choice: ToolChoice = "auto"
    temperature: float = 0.8
    max_output_tokens: MaxTokens = "inf"
    truncation: Truncation = "auto"
    cascade: CascadeOptions = Field(default_factory=CascadeOptions)

    @model_serializer(mode="wrap")
    def _wire_shape(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        """For a GA client, only what OpenAI's GA session object has: ``temperature`` and
        ``parallel_tool_calls`` are kept (they steer the LLM and are stored with the
        session) but not sent. The beta encoder reshapes the full dump itself."""
        data = handler(self)
        if wire_dialect(info) == "ga" and isinstance(data, dict):
            for key in NOT_IN_GA_SESSION:
                data.pop(key, None)
        return data

    # Convenience accessors with the defaults applied.
    @property
    def input_format(self) -> AudioFormat:
        inp = self.audio.input
        return inp.format if inp is not None and inp.format is not None else AudioPCM()

    @property
    def output_format(self) -> AudioFormat:
        out = self.audio.output
        return out.format if out is not None and out.format is not None else AudioPCM()

    @property
    def turn_detection(self) -> ServerVad | SemanticVad | None:
        inp = self.audio.input
        return inp.turn_detection if inp is not None else None

    @property
    def voice(self) -> str:
        out = self.audio.output
        return out.voice if out is not None and out.voice is not None else DEFAULT_VOICE


_M = TypeVar("_M", bound=WireModel)


_REPLACED_WHOLE = frozenset({"truncation"})  # a policy, not a bag of settings


@functools.cache
def _nullable(model: type[WireModel], name: str) -> bool:
    """Whether ``model.name`` may be null (``turn_detection: null`` means manual turns);
    an explicit null elsewhere (``"audio": null``, ``"instructions": null``) would leave
    the effective session without a value it needs."""
    annotation = model.model_fields[name].annotation
    try:
        TypeAdapter(Any if annotation is None else annotation).validate_python(None)
    except ValidationError:
        return False
    return True


def _merge(base: _M, update: WireModel) -> _M:
    changes: dict[str, Any] = {}
    for name in update.model_fields_set:
        if name == "type" and isinstance(update, SessionConfig):
            continue
        if name not in type(base).model_fields:
            continue
        new = getattr(update, name)
        old = getattr(base, name)
        if new is None and not _nullable(type(base), name):
            continue  # null where the session must hold a value: as if absent
        if (isinstance(new, WireModel) and isinstance(old, WireModel) and type(old) is type(new)
                and name not in _REPLACED_WHOLE):
            new = _merge(old, new)
        changes[name] = new
    return base.model_copy(update=changes)


def apply_update(session: Session, update: SessionConfig) -> Session:
    """The session after ``update``: only fields present in the update change; a new
    turn-detection mode gets its documented defaults."""
    merged = _merge(session, update)
    inp = merged.audio.input
    if inp is not None and inp.turn_detection is not None:
        td = inp.turn_detection.with_defaults()
        merged = merged.model_copy(
            update={
                "audio": merged.audio.model_copy(
                    update={"input": inp.model_copy(update={"turn_detection": td})}
                )
            }
        )
    return merged


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value
