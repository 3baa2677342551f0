"""Chat messages, tool calls and streamed deltas, shaped like OpenAI chat completions.

The same models serve the in-process engine, the network client and the service's request
validation, so the orchestrator can switch between them without translating anything.
``LlmDelta.usage`` is an addition to the brief's fields: it rides on the last delta when the
backend knows token counts (the engine always; the client when the server sends usage).
``LlmRequest.prefill_only`` marks a *primer*: the prompt a reply will use, sent while the user
is still speaking so that the backend reads it into its prompt cache ahead of the real request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant", "tool"]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as produced by the model (may be invalid JSON)


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Role
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionSpec(BaseModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON Schema


class ToolSpec(BaseModel):
    """An OpenAI function tool: {"type": "function", "function": {name, description, ...}}."""

    type: Literal["function"] = "function"
    function: FunctionSpec


ToolChoice = Literal["none", "auto", "required"] | dict[str, Any]


class LlmRequest(BaseModel):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    # Prefill only (a primer): read the prompt into the backend's cache, generate nothing the
    # caller sees. The real request that follows with the same leading messages (the same
    # tools; typically the final user message extends the primer's) then evaluates only what
    # differs. The stream yields no text or tool-call deltas, at most one final delta with
    # ``finish_reason`` and ``usage``; the caller ignores whatever comes back. Backends may
    # skip a primer (the stream then just ends): the embedded engine never queues one behind
    # busy slots or waiting requests. Over HTTP (``OpenAICompatLlm``) it is sent as
    # ``max_tokens=1`` plus the header ``X-Cascade-Prefill-Only: 1``.
    prefill_only: bool = False
    # Routing only, never sent: requests with the same key (a session) go to the same LLM
    # replica while it is healthy and not much busier than the others, so its prefix
    # cache holds the conversation (stages/common/replicas.py).
    affinity: str | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A piece of a streamed tool call; ``id`` and ``function.name`` come in its first piece."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class LlmUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class LlmDelta(BaseModel):
    model_config = ConfigDict(frozen=True)

    text: str = ""
    tool_calls: list[ToolCallDelta] | None = None
    finish_reason: str | None = None
    usage: LlmUsage | None = None


class LlmError(RuntimeError):
    """The backend could not serve a request; ``code`` is machine-readable."""

    def __init__(self, message: str, code: str = "llm_error", status: int = 500) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class LlmBusyError(LlmError):
    """Too many requests are already waiting for the model."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="server_busy", status=429)


class LlmBackend(Protocol):
    """A streaming chat model. Stopping the iteration (``aclose()`` on the generator, or
    cancelling the consuming task) must stop generation promptly."""

    def stream(self, request: LlmRequest) -> AsyncIterator[LlmDelta]: ...

    async def context_window(self) -> int | None:
        """Tokens the model holds (prompt + reply), or None when unknown. The orchestrator
        trims the conversation to fit it (orchestrator/context.py)."""
        ...

    async def aclose(self) -> None: ...
