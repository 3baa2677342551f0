"""Every event a real session sends has exactly the shape of OpenAI's published schema.

A ``RealtimeSession`` on the deterministic fake stages is driven through a conversation
that touches every kind of server event cascade produces (session updates, text and audio
responses, a server-VAD voice turn, a manual turn, a function call and its output, item
retrieve / truncate / delete, a cancelled and a failed response, bad input), once per
dialect, and every frame it sends is checked in strict mode (``tests.support.openai_schema``:
every field present, nullable ones as ``null``, no unknown keys).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from orchestrator.backends import Backends
from orchestrator.protocol import beta_event_type
from orchestrator.realtime import RealtimeSession
from orchestrator.settings import ServeSettings
from orchestrator.store import MemoryStore
from stages.llm.types import (
    FunctionCallDelta,
    LlmDelta,
    LlmError,
    LlmRequest,
    LlmUsage,
    ToolCallDelta,
)
from tests.orchestrator.fakes import FakeAsr, FakeLlm, FakeTts, FakeVad, silence, tone
from tests.support.openai_schema import Dialect, violations

REPLY = ["Sure", ",", " the", " lights", " are", " on", " now", "."]
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}

# What the conversation below must make the server send (GA names).
EXPECTED_GA_TYPES = frozenset(
    {
        "session.created",
        "session.updated",
        "conversation.item.added",
        "conversation.item.done",
        "conversation.item.retrieved",
        "conversation.item.truncated",
        "conversation.item.deleted",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.completed",
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "input_audio_buffer.cleared",
        "response.created",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.output_audio_transcript.delta",
        "response.output_audio_transcript.done",
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.done",
        "cascade.turn.timings",
        "error",
    }
)


class ScriptedLlm(FakeLlm):
    """REPLY, unless the last message asks for the weather (a get_weather call, when the
    tool is offered and has not answered yet), says "fail" (the stage fails) or "slowly"
    (no token before the response is cancelled)."""

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmDelta]:
        last = request.messages[-1]
        text = (last.content or "").lower() if last.role == "user" else ""
        if "fail" in text:
            raise LlmError("the model is unavailable", code="llm_unavailable")
        if "slowly" in text:
            await asyncio.sleep(60)  # cancelled long before
        if "weather" in text and request.tools:
            yield LlmDelta(tool_calls=[ToolCallDelta(
                index=0, id="call_1", type="function",
                function=FunctionCallDelta(name="get_weather", arguments=""))])
            for piece in ('{"city":', ' "Paris"}'):
                yield LlmDelta(tool_calls=[ToolCallDelta(
                    index=0, function=FunctionCallDelta(arguments=piece))])
            yield LlmDelta(finish_reason="tool_calls",
                           usage=LlmUsage(prompt_tokens=9, completion_tokens=4))
            return
        async for delta in super().stream(request):  # records the request
            yield delta


class WireClient:
    """One connection, recording the raw text frames the server sends."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.frames: list[str] = []
        backends = Backends(asr=FakeAsr(["what", "time", "is", "it"]),
                            llm=ScriptedLlm(REPLY, interval_s=0.001),
                            tts=FakeTts(ms_per_char=10.0))
        self.session = RealtimeSession(
            backends=backends, vad=None, store=MemoryStore(),
            settings=ServeSettings(max_audio_rate=1000.0), send=self._recv,
            beta=dialect == "beta", make_vad=FakeVad)

    async def _recv(self, text: str) -> None:
        self.frames.append(text)

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(f) for f in self.frames]

    def of(self, ga_type: str) -> list[dict[str, Any]]:
        name = ga_type if self.dialect == "ga" else beta_event_type(ga_type)
        return [e for e in self.events if e["type"] == name]

    async def send(self, event: dict[str, Any] | str) -> None:
        await self.session.handle(event if isinstance(event, str) else json.dumps(event))

    async def audio(self, pcm16: bytes, frame_bytes: int = 960) -> None:
        for i in range(0, len(pcm16), frame_bytes):
            await self.send({"type": "input_audio_buffer.append",
                             "audio": base64.b64encode(pcm16[i:i + frame_bytes]).decode()})
            await asyncio.sleep(0)

    async def wait_for(self, ga_type: str, count: int = 1, limit_s: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + limit_s
        while len(self.of(ga_type)) < count:
            types = [e["type"] for e in self.events]
            assert asyncio.get_running_loop().time() < deadline, (ga_type, count, types)
            await asyncio.sleep(0.005)

    async def respond(self, response: dict[str, Any] | None = None) -> dict[str, Any]:
        """response.create, then the response.done it ends with."""
        before = len(self.of("response.done"))
        event: dict[str, Any] = {"type": "response.create"}
        if response is not None:
            event["response"] = response
        await self.send(event)
        await self.wait_for("response.done", before + 1)
        done: dict[str, Any] = self.of("response.done")[before]["response"]
        return done

    async def user_text(self, text: str) -> str:
        before = len(self.of("conversation.item.added"))
        await self.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
        added = self.of("conversation.item.added")
        assert len(added) == before + 1, self.of("error")
        return str(added[-1]["item"]["id"])


def speech_24k() -> bytes:
    """Four 'words' (tone bursts) at 24 kHz between silences."""
    words = b"".join(tone(240, 24000) + silence(100, 24000) for _ in range(4))
    return silence(300, 24000) + words + silence(800, 24000)


def session_update(dialect: Dialect, **ga: Any) -> dict[str, Any]:
    """A session.update as a client of ``dialect`` writes it."""
    if dialect == "ga":
        return {"type": "session.update", "session": {"type": "realtime", **ga}}
    flat: dict[str, Any] = {k: v for k, v in ga.items() if k != "audio"}
    inp = ga.get("audio", {}).get("input", {})
    if "transcription" in inp:
        flat["input_audio_transcription"] = inp["transcription"]
    if "noise_reduction" in inp:
        flat["input_audio_noise_reduction"] = inp["noise_reduction"]
    if "turn_detection" in inp:
        flat["turn_detection"] = inp["turn_detection"]
    return {"type": "session.update", "session": flat}


def modalities(dialect: Dialect, mods: list[str]) -> dict[str, Any]:
    return {"output_modalities": mods} if dialect == "ga" else {"modalities": mods}


async def converse(c: WireClient) -> None:
    d = c.dialect
    await c.session.start()
    await c.send(session_update(
        d, instructions="Be brief.", tools=[WEATHER_TOOL], tool_choice="auto",
        audio={"input": {"transcription": {"model": "whisper-1", "language": "en"},
                         "noise_reduction": {"type": "near_field"}}},
        cascade={"timings": True}))

    # A typed question, answered in text, then in audio; the audio reply is truncated.
    first_user = await c.user_text("Hello there")
    text_reply = await c.respond(modalities(d, ["text"]))
    assert text_reply["status"] == "completed"
    audio_reply = await c.respond()
    assert audio_reply["status"] == "completed", audio_reply
    assistant = audio_reply["output"][0]["id"]
    await c.send({"type": "conversation.item.truncate", "item_id": assistant,
                  "content_index": 0, "audio_end_ms": 50})
    assert c.of("conversation.item.truncated")

    # A spoken turn: server VAD ends it, the reply follows, then the turn's timings.
    done_before = len(c.of("response.done"))
    await c.audio(speech_24k())
    await c.wait_for("response.done", done_before + 1)
    await c.wait_for("cascade.turn.timings")
    assert c.of("conversation.item.input_audio_transcription.completed")[0][
        "transcript"] == "what time is it"

    # A function call, its output, and the answer that uses it.
    await c.user_text("What is the weather in Paris?")
    call = await c.respond()
    assert [o["type"] for o in call["output"]] == ["function_call"], call
    await c.send({"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": "call_1", "output": '{"sky": "sunny"}'}})
    assert (await c.respond())["status"] == "completed"

    # Items: retrieve each kind, then delete one.
    for item_id in (first_user, assistant, call["output"][0]["id"]):
        await c.send({"type": "conversation.item.retrieve", "item_id": item_id})
    assert len(c.of("conversation.item.retrieved")) == 3
    await c.send({"type": "conversation.item.delete", "item_id": first_user})
    assert c.of("conversation.item.deleted")

    # A response cancelled by the client, and one whose LLM fails.
    await c.user_text("Think it over slowly")
    before = len(c.of("response.done"))
    await c.send({"type": "response.create"})
    await c.send({"type": "response.cancel"})
    await c.wait_for("response.done", before + 1)
    assert c.of("response.done")[before]["response"]["status"] == "cancelled"
    await c.user_text("Now fail, please")
    failed = await c.respond()
    assert failed["status"] == "failed", failed

    # Manual turns: clear, then speak, commit and ask for the response.
    await c.send(session_update(d, audio={"input": {"turn_detection": None}}))
    await c.send({"type": "input_audio_buffer.clear"})
    assert c.of("input_audio_buffer.cleared")
    await c.audio(speech_24k())
    await c.send({"type": "input_audio_buffer.commit"})
    await c.wait_for("conversation.item.input_audio_transcription.completed", 2)
    assert (await c.respond(modalities(d, ["text"])))["status"] == "completed"
    await c.send({"type": "output_audio_buffer.clear"})

    # Bad input: each answered with an error event.
    errors_before = len(c.of("error"))
    bad: list[dict[str, Any] | str] = [
        "{not json",
        {"type": "nope.never", "event_id": "e1"},
        {"type": "session.update", "session": {"not_a_field": 1}},
        {"type": "conversation.item.retrieve", "item_id": "item_nope"},
        {"type": "conversation.item.truncate", "item_id": "item_nope", "content_index": 0,
         "audio_end_ms": 10},
        {"type": "response.cancel"},
        {"type": "input_audio_buffer.commit"},
    ]
    for event in bad:
        await c.send(event)
    assert len(c.of("error")) >= errors_before + len(bad), c.of("error")


@pytest_asyncio.fixture(scope="module", params=["ga", "beta"])
async def conversation(request: pytest.FixtureRequest) -> AsyncIterator[WireClient]:
    """One recorded conversation per dialect, shared by the tests below."""
    dialect: Dialect = request.param
    client = WireClient(dialect)
    try:
        await converse(client)
    finally:
        await client.session.aclose()
    yield client


def test_every_event_of_a_conversation_matches_the_schema_strictly(
        conversation: WireClient) -> None:
    problems = {
        f"#{i} {event['type']}": found
        for i, event in enumerate(conversation.events)
        if (found := violations(event, conversation.dialect))
    }
    assert not problems, json.dumps(problems, indent=1)


def test_the_conversation_covers_every_kind_of_event(conversation: WireClient) -> None:
    expected = {
        name for t in EXPECTED_GA_TYPES
        if (name := t if conversation.dialect == "ga" else beta_event_type(t)) is not None
    }
    seen = {e["type"] for e in conversation.events}
    assert expected <= seen, sorted(expected - seen)


def test_the_users_audio_item_says_its_transcript_is_not_known_yet(
        conversation: WireClient) -> None:
    """The issue's example: OpenAI announces a spoken turn's item with
    ``transcript: null``; a strict client rejects it without the key."""
    audio_items = [e["item"] for e in conversation.of("conversation.item.added")
                   if e["item"].get("role") == "user"
                   and e["item"]["content"][0]["type"] == "input_audio"]
    assert len(audio_items) == 2  # the server-VAD turn and the manual turn
    for item in audio_items:
        assert item["content"] == [{"type": "input_audio", "transcript": None}]
