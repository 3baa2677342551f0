from __future__ import annotations

from stages.llm.types import ChatMessage, FunctionSpec, LlmRequest, ToolSpec

LONG_PROMPT = "Write a very long and detailed essay about the history of the ocean and ships."

WEATHER_TOOL = ToolSpec(function=FunctionSpec(
    name="get_weather",
    description="Current weather for a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"]},
))


def user(text: str, **kwargs: object) -> LlmRequest:
    return LlmRequest(messages=[ChatMessage(role="user", content=text)], **kwargs)  # type: ignore[arg-type]
