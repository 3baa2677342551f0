"""Serving clients that connected in beta mode (``OpenAI-Beta: realtime=v1``).

Beta and GA share client event names, and beta client payloads are normalized on parse
(see ``session``, ``response``, ``items``). Server events differ: some are renamed
(``response.output_audio.delta`` -> ``response.audio.delta``), ``conversation.item.added``
was ``conversation.item.created``, ``conversation.item.done`` did not exist, and the
session and response objects were flat (``modalities``, ``input_audio_format: "pcm16"``,
``turn_detection`` at the top level). ``EventEncoder`` is chosen once per session: in GA
mode it is a plain ``model_dump_json``; in beta mode it rewrites the dumped dict. Audio
deltas, the bulk of the traffic, are only renamed.

The beta shapes are exactly the beta schema's (``openai.types.beta.realtime``): fields
that only GA has are left out (``object`` of the session, ``idle_timeout_ms`` of turn
detection, ``name`` of ``response.function_call_arguments.done``, ...), and the
session's ``temperature``, which GA does not send, is kept.
"""

from __future__ import annotations

import json
from typing import Any

from orchestrator.protocol.base import wire_context
from orchestrator.protocol.formats import format_to_beta
from orchestrator.protocol.server_events import ServerEventBase

# GA type -> beta type; None: the event has no beta counterpart and is not sent.
_BETA_NAMES: dict[str, str | None] = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "conversation.item.added": "conversation.item.created",
    "conversation.item.done": None,
    "input_audio_buffer.timeout_triggered": None,
}
_BETA_CONTENT = {"output_text": "text", "output_audio": "audio"}
# GA session keys the beta session object does not have (or has under a flat name).
_NOT_IN_BETA_SESSION = frozenset(
    {
        "type",
        "object",
        "audio",
        "output_modalities",
        "max_output_tokens",
        "model",  # a closed enum of OpenAI model names in beta; "cascade" is not one
        "include",
        "truncation",
        "prompt",
        "reasoning",
        "parallel_tool_calls",
    }
)
# Beta sub-objects: the keys each one has.
_BETA_TURN_DETECTION = (
    "type",
    "threshold",
    "prefix_padding_ms",
    "silence_duration_ms",
    "create_response",
    "interrupt_response",
    "eagerness",
)
_BETA_TRANSCRIPTION = ("model", "language", "prompt")
_BETA_NOISE_REDUCTION = ("type",)
# Event fields that only GA has, by (GA) event type.
_NOT_IN_BETA_EVENT: dict[str, tuple[str, ...]] = {
    "response.function_call_arguments.done": ("name",),
}


def beta_event_type(ga_type: str) -> str | None:
    """The beta name of a GA server event type (``None``: not sent to beta clients)."""
    return _BETA_NAMES.get(ga_type, ga_type)


def _beta_item(item: dict[str, Any]) -> dict[str, Any]:
    content = item.get("content")
    if isinstance(content, list):
        item = {
            **item,
            "content": [
                {**p, "type": _BETA_CONTENT.get(p.get("type"), p.get("type"))} for p in content
            ],
        }
    return item


def _format_name(fmt: Any) -> Any:
    return format_to_beta(fmt["type"]) if isinstance(fmt, dict) and "type" in fmt else None


def _beta_modalities(mods: Any) -> Any:
    # Beta "audio" responses always came with their transcript as text.
    return ["text", "audio"] if mods == ["audio"] else mods


def _only(obj: Any, keys: tuple[str, ...]) -> Any:
    """``obj`` (a dict or ``None``) with only ``keys``, those it has."""
    if not isinstance(obj, dict):
        return obj
    return {k: obj[k] for k in keys if k in obj}


def beta_session(session: dict[str, Any]) -> dict[str, Any]:
    """A GA session dict in the beta flat shape."""
    audio = session.get("audio") or {}
    inp = audio.get("input") or {}
    out = audio.get("output") or {}
    flat: dict[str, Any] = {k: v for k, v in session.items() if k not in _NOT_IN_BETA_SESSION}
    flat["modalities"] = _beta_modalities(session.get("output_modalities"))
    flat["max_response_output_tokens"] = session.get("max_output_tokens")
    flat["input_audio_format"] = _format_name(inp.get("format"))
    flat["output_audio_format"] = _format_name(out.get("format"))
    flat["input_audio_transcription"] = _only(inp.get("transcription"), _BETA_TRANSCRIPTION)
    flat["input_audio_noise_reduction"] = _only(
        inp.get("noise_reduction"), _BETA_NOISE_REDUCTION
    )
    flat["turn_detection"] = _only(inp.get("turn_detection"), _BETA_TURN_DETECTION)
    flat["voice"] = out.get("voice")
    flat["speed"] = out.get("speed")
    choice = session.get("tool_choice")
    if isinstance(choice, dict):
        flat["tool_choice"] = choice.get("name")
    return flat


def beta_response(response: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in response.items() if k not in ("output_modalities", "audio")}
    out["modalities"] = _beta_modalities(response.get("output_modalities"))
    audio_out = (response.get("audio") or {}).get("output") or {}
    if "format" in audio_out:
        out["output_audio_format"] = _format_name(audio_out["format"])
    if "voice" in audio_out:
        out["voice"] = audio_out["voice"]
    if isinstance(response.get("output"), list):
        out["output"] = [_beta_item(i) for i in response["output"]]
    return out


def to_beta(event: dict[str, Any]) -> dict[str, Any] | None:
    """A dumped GA event reshaped for a beta client (``None``: do not send)."""
    name = beta_event_type(event["type"])
    if name is None:
        return None
    dropped = _NOT_IN_BETA_EVENT.get(event["type"], ())
    out = {k: v for k, v in event.items() if k not in dropped}
    out["type"] = name
    if isinstance(out.get("session"), dict):
        out["session"] = beta_session(out["session"])
    if isinstance(out.get("response"), dict):
        out["response"] = beta_response(out["response"])
    if isinstance(out.get("item"), dict):
        out["item"] = _beta_item(out["item"])
    return out


class EventEncoder:
    """Serializes server events for one session, in GA or beta dialect."""

    def __init__(self, beta: bool = False) -> None:
        self.beta = beta

    def encode(self, event: ServerEventBase) -> str | None:
        """The JSON text frame for ``event``, or ``None`` when this dialect has no such
        event."""
        if not self.beta:
            return event.model_dump_json(context=wire_context("ga"))
        return self.encode_dict(event.model_dump(mode="json", context=wire_context("beta")))

    def encode_dict(self, event: dict[str, Any]) -> str | None:
        beta = to_beta(event)
        return None if beta is None else json.dumps(beta, separators=(",", ":"))
