"""RealtimeSession with deterministic fake stages: the event flow of a turn, manual
turns, conversation items, barge-in truncation and the bad-input table."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from orchestrator.backends import Backends
from orchestrator.realtime import RealtimeSession
from orchestrator.settings import ServeSettings
from orchestrator.store import MemoryStore
from tests.orchestrator.fakes import FakeAsr, FakeLlm, FakeTts, FakeVad, silence, tone

REPLY = ["Sure", ",", " the", " lights", " are", " on", " now", "."]


class Client:
    def __init__(self, session_kwargs: dict[str, Any] | None = None,
                 settings: ServeSettings | None = None, tts_ms_per_char: float = 5.0,
                 llm_interval_s: float = 0.001, store: MemoryStore | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.llm = FakeLlm(REPLY, interval_s=llm_interval_s)
        backends = Backends(asr=FakeAsr(["turn", "on", "the", "lights"]), llm=self.llm,
                            tts=FakeTts(ms_per_char=tts_ms_per_char))
        self.session = RealtimeSession(
            backends=backends, vad=None, store=store or MemoryStore(),
            settings=settings or ServeSettings(max_audio_rate=1000.0), send=self._recv,
            make_vad=FakeVad, **(session_kwargs or {}))

    async def _recv(self, text: str) -> None:
        self.events.append(json.loads(text))

    async def send(self, event: dict[str, Any]) -> None:
        await self.session.handle(json.dumps(event))

    async def audio(self, pcm16: bytes, frame_bytes: int = 960) -> None:
        for i in range(0, len(pcm16), frame_bytes):
            await self.send({"type": "input_audio_buffer.append",
                             "audio": base64.b64encode(pcm16[i:i + frame_bytes]).decode()})
            await asyncio.sleep(0)

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    async def wait_for(self, kind: str, count: int = 1, limit_s: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + limit_s
        while len(self.of(kind)) < count:
            assert asyncio.get_running_loop().time() < deadline, (kind, self.types())
            await asyncio.sleep(0.005)


def speech_24k() -> bytes:
    """Four 'words' (tone bursts) at 24 kHz, then 800 ms of silence."""
    words = b"".join(tone(240, 24000) + silence(100, 24000) for _ in range(4))
    return silence(300, 24000) + words + silence(800, 24000)


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    c = Client()
    await c.session.start()
    yield c
    await c.session.aclose()


async def test_session_created_carries_id_and_resume_token(client: Client) -> None:
    created = client.of("session.created")[0]["session"]
    assert created["id"] == client.session.session_id
    assert created["cascade"]["resume_token"]
    assert created["audio"]["input"]["turn_detection"]["type"] == "server_vad"


async def test_a_spoken_turn_produces_the_openai_event_sequence(client: Client) -> None:
    await client.audio(speech_24k())
    await client.wait_for("response.done")
    t = client.types()
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed",
             "conversation.item.input_audio_transcription.completed", "response.created",
             "response.output_item.added", "response.content_part.added",
             "response.output_audio.delta", "response.output_audio.done",
             "response.output_audio_transcript.done", "response.content_part.done",
             "response.output_item.done", "response.done"]
    positions = [t.index(kind) for kind in order]
    assert positions == sorted(positions), t
    assert client.of("conversation.item.input_audio_transcription.completed")[0][
        "transcript"] == "turn on the lights"
    deltas = client.of("conversation.item.input_audio_transcription.delta")
    assert deltas and t.index(deltas[0]["type"]) < t.index("input_audio_buffer.speech_stopped")
    done = client.of("response.done")[0]["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["content"][0]["transcript"] == "".join(REPLY)
    assert done["usage"]["output_tokens"] == len(REPLY)
    spoken = "".join(e["delta"] for e in client.of("response.output_audio_transcript.delta"))
    assert spoken == "".join(REPLY)
    audio = b"".join(base64.b64decode(e["delta"])
                     for e in client.of("response.output_audio.delta"))
    assert len(audio) == 2 * int(len("".join(REPLY)) * 5 * 24)  # FakeTts: 5 ms per char
    # user item then assistant item, in the conversation and in the store
    items = client.session.items
    assert [i.role for i in items] == ["user", "assistant"]  # type: ignore[union-attr]


class SlowStore(MemoryStore):
    """A store whose item writes hang until ``opened`` (a Redis having a slow moment)."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = asyncio.Event()

    async def append_item(self, *args: Any, **kwargs: Any) -> int:
        await self.opened.wait()
        return await super().append_item(*args, **kwargs)

    async def update_item(self, *args: Any, **kwargs: Any) -> None:
        await self.opened.wait()
        await super().update_item(*args, **kwargs)


async def test_the_reply_does_not_wait_for_the_store_and_close_saves_every_item() -> None:
    store = SlowStore()
    client = Client(store=store)
    await client.session.start()
    # The user's item (at speech_stopped) and the assistant's (as the reply opens) are
    # queued, not awaited: the whole reply plays while the store holds nothing yet.
    async with asyncio.timeout(20):  # awaited writes would hang the turn here
        await client.audio(speech_24k())
        await client.wait_for("response.done")
    assert client.of("response.output_audio.delta")
    sid = client.session.session_id
    assert await MemoryStore.list_items(store, sid) == []
    store.opened.set()
    await client.session.aclose()  # drains the queue before releasing the lease
    stored = await store.list_items(sid)
    assert [(i["role"], i["content"][0]["transcript"]) for i in stored] == [
        ("user", "turn on the lights"), ("assistant", "".join(REPLY))]
    # A new connection resumes with everything there.
    again = Client(store=store)
    await again.session.start(resume_id=sid, resume_token=client.of("session.created")[0][
        "session"]["cascade"]["resume_token"])
    assert [i.id for i in again.session.items] == [i["id"] for i in stored]
    await again.session.aclose()


async def test_manual_turns_commit_then_response_create() -> None:
    c = Client()
    await c.session.start()
    await c.send({"type": "session.update",
                  "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}}})
    assert c.of("session.updated")[0]["session"]["audio"]["input"]["turn_detection"] is None
    await c.audio(speech_24k())
    assert "input_audio_buffer.speech_started" not in c.types()
    await c.send({"type": "input_audio_buffer.commit", "event_id": "c1"})
    assert c.of("input_audio_buffer.committed")  # at once; the transcript follows
    await c.wait_for("conversation.item.input_audio_transcription.completed")
    assert c.of("conversation.item.input_audio_transcription.completed")[0][
        "transcript"] == "turn on the lights"
    assert "response.created" not in c.types()
    await c.send({"type": "response.create"})
    await c.wait_for("response.done")
    assert c.of("response.done")[0]["response"]["status"] == "completed"
    await c.session.aclose()


async def test_g711_in_and_out() -> None:
    from orchestrator import audio_codecs

    c = Client()
    await c.session.start()
    await c.send({"type": "session.update", "session": {"type": "realtime", "audio": {
        "input": {"format": {"type": "audio/pcmu"}},
        "output": {"format": {"type": "audio/pcmu"}}}}})
    import numpy as np

    pcm = np.frombuffer(speech_24k(), dtype="<i2")[::3].copy()  # 8 kHz
    ulaw = audio_codecs.encode(pcm, "audio/pcmu").tobytes()
    await c.audio(ulaw, frame_bytes=160)
    await c.wait_for("response.done")
    assert c.of("conversation.item.input_audio_transcription.completed")[0][
        "transcript"] == "turn on the lights"
    audio = b"".join(base64.b64decode(e["delta"]) for e in c.of("response.output_audio.delta"))
    assert len(audio) == int(len("".join(REPLY)) * 5 * 8)  # one byte per 8 kHz sample
    await c.session.aclose()


async def test_barge_in_truncates_the_reply_to_the_words_heard() -> None:
    c = Client(tts_ms_per_char=60.0,  # 2 s of reply audio, paced in real time
               settings=ServeSettings(max_audio_rate=1000.0, llm_prime_instructions=False))
    await c.session.start()
    await c.audio(speech_24k())
    await c.wait_for("response.output_audio.delta", count=5)
    await c.audio(tone(400, 24000))  # the user talks over the reply
    await c.wait_for("response.done")
    done = c.of("response.done")[0]["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"]["reason"] == "turn_detected"
    truncated = c.of("conversation.item.truncated")
    assert len(truncated) == 1
    heard = done["output"][0]["content"][0]["transcript"]
    assert heard != "".join(REPLY) and "".join(REPLY).startswith(heard)
    sent_ms = sum(len(base64.b64decode(e["delta"])) for e in c.of(
        "response.output_audio.delta")) / 2 / 24
    assert truncated[0]["audio_end_ms"] <= sent_ms + 1
    assert c.llm.closed_early == 1 or c.llm.emitted == len(REPLY)
    await c.session.aclose()


async def test_conversation_items_create_retrieve_delete(client: Client) -> None:
    await client.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "hello"}]}})
    item = client.of("conversation.item.added")[0]["item"]
    assert item["id"] and client.of("conversation.item.done")
    await client.send({"type": "conversation.item.retrieve", "item_id": item["id"]})
    assert client.of("conversation.item.retrieved")[0]["item"]["content"][0]["text"] == "hello"
    await client.send({"type": "conversation.item.delete", "item_id": item["id"]})
    assert client.of("conversation.item.deleted")[0]["item_id"] == item["id"]
    assert client.session.items == []


BAD: list[tuple[str, Callable[[], Any], str]] = [
    ("malformed", lambda: "{not json", "invalid_json"),
    ("unknown", lambda: {"type": "nope.never", "event_id": "e1"}, "invalid_value"),
    ("bad_base64", lambda: {"type": "input_audio_buffer.append", "audio": "@@@",
                            "event_id": "e1"}, "invalid_audio"),
    ("odd_bytes", lambda: {"type": "input_audio_buffer.append",
                           "audio": base64.b64encode(b"abc").decode(), "event_id": "e1"},
     "invalid_audio"),
    ("oversized_append", lambda: {"type": "input_audio_buffer.append", "event_id": "e1",
                                  "audio": base64.b64encode(bytes(48000 * 11)).decode()},
     "audio_too_large"),
    ("commit_empty", lambda: {"type": "input_audio_buffer.commit", "event_id": "e1"},
     "input_audio_buffer_commit_empty"),
    ("truncate_unknown", lambda: {"type": "conversation.item.truncate", "event_id": "e1",
                                  "item_id": "item_nope", "content_index": 0,
                                  "audio_end_ms": 10}, "item_not_found"),
    ("delete_unknown", lambda: {"type": "conversation.item.delete", "event_id": "e1",
                                "item_id": "item_nope"}, "item_not_found"),
    ("cancel_nothing", lambda: {"type": "response.cancel", "event_id": "e1"},
     "response_cancel_not_active"),
]


@pytest.mark.parametrize(("name", "make", "code"), BAD, ids=[b[0] for b in BAD])
async def test_bad_input_gets_an_error_event_and_the_session_goes_on(
        client: Client, name: str, make: Callable[[], Any], code: str) -> None:
    payload = make()
    await client.session.handle(payload if isinstance(payload, str) else json.dumps(payload))
    await client.wait_for("error")
    error = client.of("error")[0]["error"]
    assert error["code"] == code, error
    if name != "malformed":
        assert error["event_id"] == "e1"
    # The session still works: a normal turn afterwards gets its reply.
    await client.audio(speech_24k())
    await client.wait_for("response.done")


async def test_audio_faster_than_real_time_is_refused() -> None:
    c = Client(settings=ServeSettings(max_audio_rate=2.0))
    await c.session.start()
    await c.audio(silence(20_000, 24000), frame_bytes=48_000 * 2)  # 20 s pushed at once
    assert any(e["error"]["code"] == "audio_rate_exceeded" for e in c.of("error"))
    await c.session.aclose()


async def test_truncate_beyond_the_audio_sent_is_refused() -> None:
    c = Client(tts_ms_per_char=60.0)
    await c.session.start()
    await c.audio(speech_24k())
    await c.wait_for("response.output_audio.delta", count=3)
    item_id = c.of("response.output_item.added")[0]["item"]["id"]
    await c.send({"type": "conversation.item.truncate", "item_id": item_id,
                  "content_index": 0, "audio_end_ms": 60_000, "event_id": "t1"})
    error = c.of("error")[0]["error"]
    assert error["event_id"] == "t1" and error["param"] == "audio_end_ms"
    await c.send({"type": "conversation.item.truncate", "item_id": item_id,
                  "content_index": 0, "audio_end_ms": 100})
    truncated = c.of("conversation.item.truncated")
    assert truncated and truncated[0]["audio_end_ms"] == 100
    await c.wait_for("response.done")
    assert c.of("response.done")[0]["response"]["status"] == "cancelled"
    await c.session.aclose()


class ToolLlm(FakeLlm):
    """Calls get_weather when the conversation has no tool result yet, else answers."""

    async def stream(self, request: Any) -> Any:  # type: ignore[override]
        from stages.llm.types import FunctionCallDelta, LlmDelta, ToolCallDelta

        self.requests.append(request)
        if not any(m.role == "tool" for m in request.messages):
            yield LlmDelta(tool_calls=[ToolCallDelta(index=0, id="call_1", type="function",
                                                     function=FunctionCallDelta(
                                                         name="get_weather", arguments=""))])
            for piece in ('{"city":', ' "Paris"}'):
                yield LlmDelta(tool_calls=[ToolCallDelta(
                    index=0, function=FunctionCallDelta(arguments=piece))])
            yield LlmDelta(finish_reason="tool_calls")
            return
        for token in ["It", " is", " sunny", "."]:
            yield LlmDelta(text=token)
        yield LlmDelta(finish_reason="stop")


async def test_function_calling_round_trip() -> None:
    c = Client()
    c.llm = ToolLlm([])
    c.session._backends.llm = c.llm
    await c.session.start()
    await c.send({"type": "session.update", "session": {"type": "realtime", "tools": [{
        "type": "function", "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": "auto"}})
    await c.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "Weather in Paris?"}]}})
    await c.send({"type": "response.create"})
    await c.wait_for("response.done")
    request = c.llm.replies[0]
    assert request.tools and request.tools[0].function.name == "get_weather"
    args = c.of("response.function_call_arguments.done")[0]
    assert args["name"] == "get_weather" and json.loads(args["arguments"]) == {"city": "Paris"}
    deltas = "".join(e["delta"] for e in c.of("response.function_call_arguments.delta"))
    assert deltas == args["arguments"]
    done = c.of("response.done")[0]["response"]
    assert [o["type"] for o in done["output"]] == ["function_call"]
    assert done["output"][0]["call_id"] == "call_1"
    # The client runs the tool and sends its output; the next response uses it.
    await c.send({"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": "call_1", "output": '{"sky": "sunny"}'}})
    await c.send({"type": "response.create"})
    await c.wait_for("response.done", count=2)
    second = c.llm.replies[1]
    roles = [m.role for m in second.messages]
    assert roles[-2:] == ["assistant", "tool"]
    assert second.messages[-2].tool_calls[0].function.name == "get_weather"  # type: ignore[index]
    final = c.of("response.done")[1]["response"]
    assert final["output"][0]["content"][0]["transcript"] == "It is sunny."
    await c.session.aclose()


async def test_a_resumed_session_takes_over_from_the_old_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_STORE_LEASE_TTL_S", "0.3")  # renewals every 0.1 s
    first = Client()
    await first.session.start()
    created = first.of("session.created")[0]["session"]
    second = Client()
    second.session._store = first.session._store  # one store, two connections
    await second.session.start(resume_id=created["id"],
                               resume_token=created["cascade"]["resume_token"])
    assert second.of("session.created")[0]["session"]["id"] == created["id"]
    await asyncio.sleep(0.5)  # the old connection's next renewal finds the lease taken
    await first.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
    assert first.of("error")[0]["error"]["code"] == "session_taken_over"
    assert first.of("conversation.item.added") == []
    await second.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
    assert second.of("conversation.item.added")
    await first.session.aclose()
    await second.session.aclose()


async def test_response_create_overrides_and_out_of_band_responses(client: Client) -> None:
    await client.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "in the conversation"}]}})
    await client.send({"type": "response.create", "response": {
        "conversation": "none", "instructions": "Summarize.", "output_modalities": ["text"],
        "metadata": {"purpose": "summary"}, "max_output_tokens": 20,
        "input": [{"type": "message", "role": "user",
                   "content": [{"type": "input_text", "text": "only this"}]}]}})
    await client.wait_for("response.done")
    request = client.llm.replies[-1]
    assert request.messages[0].content == "Summarize."
    assert [m.content for m in request.messages[1:]] == ["only this"]
    assert request.max_tokens == 20
    text = "".join(e["delta"] for e in client.of("response.output_text.delta"))
    assert text == "".join(REPLY)
    assert client.of("response.output_audio.delta") == []
    done = client.of("response.done")[0]["response"]
    assert done["metadata"] == {"purpose": "summary"}
    assert len(client.session.items) == 1  # out of band: the conversation is unchanged


async def test_the_llm_reads_the_instructions_before_the_first_turn(client: Client) -> None:
    # At session.created, once per instructions text: a lone system message, read only.
    await asyncio.sleep(0.05)
    primers = client.llm.primers
    assert len(primers) == 1 and [m.role for m in primers[0].messages] == ["system"]
    assert primers[0].messages[0].content == "You are a helpful voice assistant. Answer briefly."
    await client.send({"type": "session.update", "session": {
        "type": "realtime", "instructions": "Talk like a pirate."}})
    await client.send({"type": "session.update", "session": {"type": "realtime"}})
    await client.wait_for("session.updated", count=2)
    await asyncio.sleep(0.05)
    primers = client.llm.primers
    assert [p.messages[0].content for p in primers] == [
        "You are a helpful voice assistant. Answer briefly.", "Talk like a pirate."]
    assert client.llm.replies == []  # no reply was asked for


async def test_the_llm_reads_each_turn_while_the_user_speaks(client: Client) -> None:
    """Policy step 1: as the stable words grow, the LLM reads the reply's prompt so far
    (the same history and instructions as the reply), so only the tail is left at the
    pause."""
    for turn in (1, 2):
        await client.audio(speech_24k())
        await client.wait_for("response.done", count=turn)
        reply = client.llm.replies[-1]
        primers = [p for p in client.llm.primers if len(p.messages) == len(reply.messages)]
        assert primers, [p.messages for p in client.llm.primers]
        final = reply.messages[-1].content or ""
        assert final == "turn on the lights"
        for primer in primers:
            # The same prompt as the reply up to the user's words so far.
            assert primer.messages[:-1] == reply.messages[:-1]
            assert primer.messages[-1].role == "user"
            assert final.startswith(primer.messages[-1].content or "?")
            assert primer.tools == reply.tools
        assert len(reply.messages) == 2 * turn  # instructions, history, the user's words


async def test_the_serial_baseline_reads_nothing_ahead() -> None:
    c = Client()
    await c.session.start()
    await c.send({"type": "session.update", "session": {
        "type": "realtime", "cascade": {"pipeline": "serial"}}})
    await c.audio(speech_24k())
    await c.wait_for("response.done")
    assert [[m.role for m in p.messages] for p in c.llm.primers] == [["system"]]
    await c.session.aclose()


async def test_an_operator_can_turn_the_turn_primers_off() -> None:
    """CASCADE_LLM_PRIME_TURNS=false: a paid API is not billed for reading ahead."""
    c = Client(settings=ServeSettings(max_audio_rate=1000.0, llm_prime_turns=False))
    await c.session.start()
    await c.audio(speech_24k())
    await c.wait_for("response.done")
    assert c.llm.replies
    assert [[m.role for m in p.messages] for p in c.llm.primers] == [["system"]]
    await c.session.aclose()
