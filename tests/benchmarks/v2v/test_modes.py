"""Mode names: what each asks the server for (pipeline, turn detection), and the names
that are refused before any turn runs."""

from __future__ import annotations

import pytest

from benchmarks.v2v.modes import ModeSpec, parse_mode


@pytest.mark.parametrize("name,pipeline,detection", [
    ("streaming", "streaming", {"type": "server_vad", "silence_duration_ms": 500}),
    ("serial", "serial", {"type": "server_vad", "silence_duration_ms": 500}),
    ("default", None, {"type": "server_vad", "silence_duration_ms": 500}),
    ("semantic", "streaming", {"type": "semantic_vad", "eagerness": "medium"}),
    ("semantic:high", "streaming", {"type": "semantic_vad", "eagerness": "high"}),
    ("streaming+semantic_vad", "streaming", {"type": "semantic_vad", "eagerness": "medium"}),
    ("streaming+semantic_vad:low", "streaming", {"type": "semantic_vad", "eagerness": "low"}),
    ("serial+server_vad:200", "serial", {"type": "server_vad", "silence_duration_ms": 200}),
    ("serial+server_vad:0", "serial", {"type": "server_vad", "silence_duration_ms": 0}),
    ("openai+server_vad", None, {"type": "server_vad", "silence_duration_ms": 500}),
])
def test_mode_names_resolve(name: str, pipeline: str | None,
                            detection: dict[str, object]) -> None:
    spec = parse_mode(name, eagerness="medium")  # the --eagerness default for semantic_vad
    assert spec.name == name and spec.pipeline == pipeline
    assert spec.cascade is (pipeline is not None)
    assert spec.turn_detection_config() == detection


def test_the_default_eagerness_is_auto_and_specs_round_trip() -> None:
    spec = parse_mode("semantic")
    assert spec.turn_detection_config() == {"type": "semantic_vad", "eagerness": "auto"}
    assert ModeSpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize("name", ["semantic+server_vad", "semantic:eager", "streaming:fast",
                                  "streaming+", "+semantic_vad", "serial+server_vad:x",
                                  "serial+server_vad:-5", "streaming+turn_vad",
                                  "streaming+semantic_vad:sometimes", "a+server_vad+x"])
def test_malformed_mode_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="mode "):
        parse_mode(name)
