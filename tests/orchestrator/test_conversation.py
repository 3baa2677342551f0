"""Conversations that last, with deterministic fake stages: many turns on one session,
long silences, binary audio, stages that fail or hang, and a session taken over by a
resume. Each test here reproduces a failure that a first-turn-only test could not see."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import REGISTRY

from orchestrator.backends import Backends
from orchestrator.settings import ServeSettings
from tests.orchestrator.fakes import FakeTts, HangingAsr, StallingLlm, silence
from tests.orchestrator.test_realtime import REPLY, Client, speech_24k


def _metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def _errors(c: Client) -> list[dict[str, Any]]:
    return [e["error"] for e in c.of("error")]


async def test_ninety_seconds_of_silence_then_a_turn() -> None:
    """Was: after 60 s of streamed silence every append got input_audio_buffer_full and
    the session could never take another turn."""
    c = Client()
    await c.session.start()
    await c.audio(speech_24k())
    await c.wait_for("response.done")
    await c.audio(silence(90_000, 24000), frame_bytes=48_000)  # 90 s, 1 s per append
    assert _errors(c) == []
    await c.audio(speech_24k())
    await c.wait_for("response.done", count=2)
    assert [d["response"]["status"] for d in c.of("response.done")] == ["completed"] * 2
    await c.session.aclose()


async def test_manual_turns_still_bound_the_buffer_until_commit() -> None:
    c = Client(settings=ServeSettings(max_audio_rate=1000.0, max_buffer_ms=3000))
    await c.session.start()
    await c.send({"type": "session.update",
                  "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}}})
    await c.audio(silence(4000, 24000), frame_bytes=48_000)
    assert [e["code"] for e in _errors(c)] == ["input_audio_buffer_full"]
    await c.send({"type": "input_audio_buffer.clear"})
    await c.audio(speech_24k())  # 2.3 s: fits again after the clear
    await c.send({"type": "input_audio_buffer.commit"})
    await c.wait_for("conversation.item.input_audio_transcription.completed")
    assert len(_errors(c)) == 1
    await c.session.aclose()


async def test_binary_frames_are_input_audio() -> None:
    c = Client()
    await c.session.start()
    pcm = speech_24k()
    for i in range(0, len(pcm), 960):
        await c.session.handle(pcm[i:i + 960])
        await asyncio.sleep(0)
    await c.wait_for("response.done")
    assert c.of("conversation.item.input_audio_transcription.completed")[0][
        "transcript"] == "turn on the lights"
    await c.session.handle(b"\x01\x02\x03")  # an odd byte count is not pcm16
    assert [e["code"] for e in _errors(c)] == ["invalid_audio"]
    await c.session.aclose()


async def test_later_turns_are_not_counted_as_barge_ins() -> None:
    """Was: the 'reply playing' flag was never cleared, so every later turn's speech
    counted as a barge-in."""
    c = Client()
    await c.session.start()
    before = _metric("cascade_barge_ins_total")
    for n in range(1, 4):
        await c.audio(speech_24k())
        await c.wait_for("response.done", count=n)
        await asyncio.sleep(0.3)  # the short reply (0.14 s) has played out at the client
    assert _metric("cascade_barge_ins_total") == before
    assert c.of("conversation.item.truncated") == []
    assert [d["response"]["status"] for d in c.of("response.done")] == ["completed"] * 3
    await c.session.aclose()


async def test_a_failure_while_opening_the_reply_still_ends_the_response() -> None:
    """Was: the item limit hit while announcing the assistant item left the client with
    no response.done and the reply still generating."""
    c = Client(settings=ServeSettings(max_audio_rate=1000.0, max_items=1),
               llm_interval_s=0.005)
    c.llm.tokens = ["Hi.", *(f" w{i}" for i in range(199))]  # a first phrase, then more
    await c.session.start()
    await c.audio(speech_24k())
    await c.wait_for("response.done")
    done = c.of("response.done")[0]["response"]
    assert done["status"] == "failed"
    assert done["status_details"]["error"]["code"] == "conversation_too_long"
    assert "conversation_too_long" in [e["code"] for e in _errors(c)]
    await asyncio.sleep(0.05)
    assert c.llm.emitted < 200  # the reply run was stopped, not left generating
    await c.session.aclose()


async def test_asr_down_fails_the_transcript_then_the_next_turn_works() -> None:
    """Was: an ASR error closed the whole connection (1011)."""
    asr = HangingAsr(["turn", "on", "the", "lights"], refuse=True)
    c = Client(settings=ServeSettings(max_audio_rate=1000.0, asr_open_timeout_s=0.2,
                                      asr_finalize_timeout_s=0.2))
    c.session._backends = Backends(asr=asr, llm=c.llm, tts=FakeTts(ms_per_char=5.0))
    await c.session.start()
    await c.audio(speech_24k())
    await c.wait_for("conversation.item.input_audio_transcription.failed")
    assert "transcription_failed" in [e["code"] for e in _errors(c)]
    assert c.of("response.created") == []
    asr.refuse = False  # the stage is back
    await c.audio(speech_24k())
    await c.wait_for("response.done")
    assert c.of("conversation.item.input_audio_transcription.completed")[-1][
        "transcript"] == "turn on the lights"
    await c.session.aclose()


async def test_a_hung_finalize_answers_on_the_last_hypothesis() -> None:
    asr = HangingAsr(["turn", "on", "the", "lights"], hang_finalize=True)
    c = Client(settings=ServeSettings(max_audio_rate=1000.0, asr_finalize_timeout_s=0.2))
    c.session._backends = Backends(asr=asr, llm=c.llm, tts=FakeTts(ms_per_char=5.0))
    await c.session.start()
    await c.audio(speech_24k())
    await c.wait_for("response.done")
    assert c.of("conversation.item.input_audio_transcription.completed")[0][
        "transcript"] == "turn on the lights"
    await c.session.aclose()


async def test_an_llm_that_hangs_fails_the_response_and_the_next_turn_works() -> None:
    c = Client(settings=ServeSettings(max_audio_rate=1000.0, llm_first_token_timeout_s=0.2))
    working = c.llm
    c.session._backends = Backends(asr=c.session._backends.asr, llm=StallingLlm(REPLY),
                                   tts=c.session._backends.tts)
    await c.session.start()
    await c.audio(speech_24k())
    await c.wait_for("response.done")
    done = c.of("response.done")[0]["response"]
    assert done["status"] == "failed"
    assert done["status_details"]["error"]["code"] == "llm_timeout"
    assert [e["code"] for e in _errors(c)] == ["llm_timeout"]
    c.session._backends.llm = working  # the stage is back
    await c.audio(speech_24k())
    await c.wait_for("response.done", count=2)
    assert c.of("response.done")[1]["response"]["status"] == "completed"
    await c.session.aclose()


async def test_a_taken_over_connection_cannot_write_and_is_closed() -> None:
    """The lease fences every write: the old connection's next write (before its lease
    renewal noticed anything) is refused by the store, and the connection is closed."""
    closed: list[tuple[int, str]] = []
    first = Client(session_kwargs={"close": lambda code, reason: closed.append((code, reason))})
    await first.session.start()
    created = first.of("session.created")[0]["session"]
    second = Client()
    second.session._store = first.session._store  # one store, two connections
    await second.session.start(resume_id=created["id"],
                               resume_token=created["cascade"]["resume_token"])
    await first.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "old"}]}})
    assert "session_taken_over" in [e["code"] for e in _errors(first)]
    assert closed and closed[0][0] == 1008
    items = await first.session._store.list_items(created["id"])
    assert items == []  # nothing of the old connection's reached the conversation
    await first.session.aclose()
    await second.session.aclose()


async def test_thirty_turns_on_one_connection_all_answered() -> None:
    c = Client()
    await c.session.start()
    for n in range(1, 31):
        if n % 3:
            await c.audio(speech_24k())
        else:
            await c.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": f"text turn {n}"}]}})
            await c.send({"type": "response.create"})
        await c.wait_for("response.done", count=n)
    statuses = [d["response"]["status"] for d in c.of("response.done")]
    assert statuses == ["completed"] * 30
    assert _errors(c) == []
    assert len(c.session.items) == 60
    await c.session.aclose()


async def test_a_long_conversation_is_trimmed_to_the_context_window() -> None:
    """Was: the prompt grew every turn until each reply failed with 'exceed context
    window'. The items stay whole for the client; only the LLM's prompt is trimmed."""
    from orchestrator.context import estimate_tokens

    c = Client()
    c.llm.window = 400
    await c.session.start()
    await c.send({"type": "session.update", "session": {
        "type": "realtime", "instructions": "Be brief.", "max_output_tokens": 100}})
    for n in range(1, 31):
        await c.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": f"This is the user's turn number {n}."}]}})
        await c.send({"type": "response.create"})
        await c.wait_for("response.done", count=n)
    assert [d["response"]["status"] for d in c.of("response.done")] == ["completed"] * 30
    assert len(c.session.items) == 60  # the conversation itself is unchanged
    last = c.llm.replies[-1].messages
    assert last[0].content == "Be brief."  # the instructions are always kept
    assert last[-1].content == "This is the user's turn number 30."  # the newest turn too
    assert len(last) < 61  # the oldest turns were left out
    for request in c.llm.replies:
        assert sum(estimate_tokens(m) for m in request.messages) <= 400 - 100
    await c.session.aclose()


async def test_truncation_disabled_fails_the_reply_with_a_clear_error() -> None:
    c = Client()
    c.llm.window = 120
    await c.session.start()
    await c.send({"type": "session.update", "session": {
        "type": "realtime", "truncation": "disabled", "max_output_tokens": 60}})
    long_text = "word " * 200
    await c.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": long_text}]}})
    await c.send({"type": "response.create"})
    await c.wait_for("response.done")
    done = c.of("response.done")[0]["response"]
    assert done["status"] == "failed"
    assert done["status_details"]["error"]["code"] == "context_length_exceeded"
    assert [e["code"] for e in _errors(c)] == ["context_length_exceeded"]
    assert c.llm.replies == []  # nothing was sent to the model
    await c.session.aclose()


async def test_a_listening_connection_is_told_of_the_takeover_without_sending(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_STORE_LEASE_TTL_S", "0.3")  # renewals every 0.1 s
    closed: list[tuple[int, str]] = []
    first = Client(session_kwargs={"close": lambda code, reason: closed.append((code, reason))})
    await first.session.start()
    created = first.of("session.created")[0]["session"]
    second = Client()
    second.session._store = first.session._store
    await second.session.start(resume_id=created["id"],
                               resume_token=created["cascade"]["resume_token"])
    await first.wait_for("error", limit_s=5.0)  # the old connection sent nothing
    assert [e["code"] for e in _errors(first)] == ["session_taken_over"]
    assert closed and closed[0][0] == 1008
    await first.session.aclose()
    await second.session.aclose()
