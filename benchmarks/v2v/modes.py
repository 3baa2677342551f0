"""What a bench mode name asks the server for: cascade's pipeline and the turn detection.

A mode is one column of the report, so everything that distinguishes two columns must be
in its name. The grammar is ``BASE[+DETECTOR[:PARAM]]``:

- ``streaming`` / ``serial``: cascade's pipeline (``session.cascade.pipeline``) with
  ``server_vad`` and 500 ms of silence, the endpoint rule both pipelines share.
- ``semantic`` (or ``semantic:EAGERNESS``): the streaming pipeline with OpenAI's
  ``semantic_vad`` at ``--eagerness`` (default ``auto``): a short pause plus a confident
  "complete" from an end-of-turn model ends the turn early.
- any other base (e.g. ``default``): standard events only, so any Realtime server can be
  measured with the same yardstick.
- ``+server_vad[:SILENCE_MS]`` or ``+semantic_vad[:EAGERNESS]`` picks the turn detection
  for any base, e.g. ``serial+semantic_vad:high`` or ``default+server_vad:300``.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict

Pipeline = Literal["streaming", "serial"]
Eagerness = Literal["low", "medium", "high", "auto"]
Detector = Literal["server_vad", "semantic_vad"]
PIPELINES: tuple[Pipeline, ...] = get_args(Pipeline)
EAGERNESS: tuple[Eagerness, ...] = get_args(Eagerness)
DETECTORS: tuple[Detector, ...] = get_args(Detector)
# server_vad's silence before the endpoint: OpenAI's and cascade's default, sent
# explicitly so every server is measured with the same endpoint rule.
DEFAULT_SILENCE_MS = 500
SEMANTIC = "semantic"  # the shorthand for streaming + semantic_vad


class ModeSpec(BaseModel):
    """One mode, resolved: what its session.update sends."""

    model_config = ConfigDict(frozen=True)

    name: str  # as given on the command line: the report's column name
    pipeline: Pipeline | None = None  # None: no cascade extension (standard events only)
    turn_detection: Detector = "server_vad"
    silence_duration_ms: int | None = None  # server_vad only
    eagerness: Eagerness | None = None  # semantic_vad only

    @property
    def cascade(self) -> bool:
        """True when the mode selects cascade's pipeline (and asks for its timings)."""
        return self.pipeline is not None

    def turn_detection_config(self) -> dict[str, Any]:
        """The session's ``turn_detection`` object (same keys in both dialects)."""
        if self.turn_detection == "semantic_vad":
            return {"type": "semantic_vad", "eagerness": self.eagerness or "auto"}
        silence = self.silence_duration_ms
        return {"type": "server_vad",
                "silence_duration_ms": DEFAULT_SILENCE_MS if silence is None else silence}


def _eagerness(text: str, mode: str) -> Eagerness:
    for e in EAGERNESS:
        if text == e:
            return e
    raise ValueError(f"mode {mode!r}: eagerness must be one of {', '.join(EAGERNESS)} "
                     f"(got {text!r})")


def _pipeline(base: str) -> Pipeline | None:
    return next((p for p in PIPELINES if p == base), None)


def parse_mode(name: str, eagerness: Eagerness = "auto") -> ModeSpec:
    """Resolve a mode name (see the module docstring); ``eagerness`` is the default for
    ``semantic`` and ``+semantic_vad``. Raises ValueError for a malformed name."""
    base, plus, detector = name.partition("+")
    if not base or (plus and not detector) or "+" in detector:
        raise ValueError(f"mode {name!r}: expected BASE[+DETECTOR[:PARAM]]")
    base_name, colon, base_param = base.partition(":")
    if base_name == SEMANTIC:
        if plus:
            raise ValueError(f"mode {name!r}: {SEMANTIC} already selects semantic_vad")
        return ModeSpec(name=name, pipeline="streaming", turn_detection="semantic_vad",
                        eagerness=_eagerness(base_param, name) if colon else eagerness)
    if colon:
        raise ValueError(f"mode {name!r}: only {SEMANTIC} takes a parameter without '+'")
    pipeline = _pipeline(base_name)
    if not plus:
        return ModeSpec(name=name, pipeline=pipeline, silence_duration_ms=DEFAULT_SILENCE_MS)
    kind, colon, param = detector.partition(":")
    if kind == "semantic_vad":
        return ModeSpec(name=name, pipeline=pipeline, turn_detection="semantic_vad",
                        eagerness=_eagerness(param, name) if colon else eagerness)
    if kind == "server_vad":
        silence = DEFAULT_SILENCE_MS
        if colon:
            if not param.isdigit():
                raise ValueError(f"mode {name!r}: server_vad takes the silence in whole ms "
                                 f"(got {param!r})")
            silence = int(param)
        return ModeSpec(name=name, pipeline=pipeline, silence_duration_ms=silence)
    raise ValueError(f"mode {name!r}: turn detection must be one of {', '.join(DETECTORS)} "
                     f"(got {kind!r})")
