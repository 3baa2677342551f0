"""ReplyRun: gating before the end of turn, cancellation, backpressure, ordering."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

import pytest

from orchestrator.policy import StageDeadlines
from orchestrator.reply import ReplyAudio, ReplyDone, ReplyRun, ReplyText
from stages.llm.types import ChatMessage, LlmRequest
from tests.orchestrator.fakes import FakeLlm, FakeTts, SilentTts, StallingLlm

TOKENS = ["Hello", " there", ".", " The", " weather", " is", " fine", " today", "."]
REQUEST = LlmRequest(messages=[ChatMessage(role="user", content="hi")])


async def _until(predicate: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.002)


async def _drain(run: ReplyRun) -> list[object]:
    return [event async for event in run.events()]


async def test_nothing_flows_before_release_then_everything_in_order() -> None:
    llm, tts = FakeLlm(TOKENS), FakeTts()
    run = ReplyRun(llm, tts, REQUEST)
    run.start()
    consumer = asyncio.create_task(_drain(run))
    await _until(lambda: run.timings.first_audio is not None)  # the run is producing
    await asyncio.sleep(0.05)
    assert not consumer.done()  # ...but nothing was handed out
    run.release()
    events = await asyncio.wait_for(consumer, 5)

    text = "".join(e.text for e in events if isinstance(e, ReplyText))
    assert text == "".join(TOKENS)
    audio = [e.chunk for e in events if isinstance(e, ReplyAudio)]
    assert "".join(c.text for c in audio) == text  # every word is spoken, once
    assert [c.index for c in audio] == list(range(len(audio)))
    assert len(audio) == 2  # phrase by phrase, not one blob
    assert isinstance(events[-1], ReplyDone) and events[-1].finish_reason == "stop"
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == len(TOKENS)


async def test_cancel_stops_llm_and_tts_promptly() -> None:
    llm = FakeLlm([f" w{i}" for i in range(1000)], interval_s=0.002)
    tts = FakeTts()
    run = ReplyRun(llm, tts, REQUEST)
    run.start()
    await _until(lambda: llm.emitted >= 10)
    await run.cancel()
    emitted = llm.emitted
    await asyncio.sleep(0.05)
    assert llm.emitted == emitted  # no token after the cancel returned
    assert llm.closed_early == 1
    assert tts.streams[0].closed
    events = await asyncio.wait_for(_drain(run), 1)
    assert events == [ReplyDone(finish_reason="cancelled")]


async def test_unreleased_run_is_bounded_by_backpressure() -> None:
    llm = FakeLlm([f" w{i}" for i in range(500)], interval_s=0.0)
    run = ReplyRun(llm, None, REQUEST, max_buffered=8)
    run.start()
    await asyncio.sleep(0.1)
    assert llm.emitted <= 10  # held at the gate, not generating the whole reply
    run.release()
    events = await asyncio.wait_for(_drain(run), 5)
    assert sum(isinstance(e, ReplyText) for e in events) == 500


async def test_a_run_cancelled_while_it_handles_a_delta_closes_the_llm_stream_at_once(
) -> None:
    """Cancelled in its loop body (held at the gate: a barge-in before release), the run
    closes the LLM stream at once, not when the collector finds it: a real stream holds
    an HTTP connection out of the client's pool until then (the soak filled the pool)."""
    llm = FakeLlm([f" w{i}" for i in range(500)], interval_s=0.0)
    run = ReplyRun(llm, None, REQUEST, max_buffered=8)
    run.start()
    await _until(lambda: llm.emitted >= 8)
    await asyncio.sleep(0.02)  # parked on the full queue, the LLM stream at a yield
    gc.disable()
    try:
        await run.cancel()
        await asyncio.sleep(0)
        assert llm.closed_early == 1
    finally:
        gc.enable()


async def test_stage_failure_ends_the_reply_with_an_error() -> None:
    class BrokenTts(FakeTts):
        async def open_stream(self, *, voice: str | None = None,
                              sample_rate: int = 24000) -> object:  # type: ignore[override]
            raise ConnectionError("tts service is gone")

    run = ReplyRun(FakeLlm(TOKENS), BrokenTts(), REQUEST)
    run.start()
    run.release()
    events = await asyncio.wait_for(_drain(run), 5)
    assert isinstance(events[-1], ReplyDone)
    assert events[-1].error is not None and "tts service is gone" in events[-1].error


@pytest.mark.parametrize("tokens", [["Just", " one", " phrase"], ["Two", ".", " Phrases", "!"]])
async def test_flush_speaks_the_tail_without_a_sentence_end(tokens: list[str]) -> None:
    run = ReplyRun(FakeLlm(tokens), FakeTts(), REQUEST)
    run.start()
    run.release()
    events = await asyncio.wait_for(_drain(run), 5)
    spoken = "".join(e.chunk.text for e in events if isinstance(e, ReplyAudio))
    assert spoken == "".join(tokens)


async def test_serial_run_emits_nothing_until_the_whole_reply_is_synthesized() -> None:
    llm, tts = FakeLlm(TOKENS), FakeTts()
    run = ReplyRun(llm, tts, REQUEST, serial=True)
    run.start()
    run.release()
    events = []
    state_at_first_event: tuple[int, bool] | None = None
    async for event in run.events():
        if state_at_first_event is None:
            state_at_first_event = (llm.emitted, run.timings.first_audio is not None)
        events.append(event)
    # When the first event came out, the LLM had finished and the audio existed: no overlap.
    assert state_at_first_event == (len(TOKENS), True)
    spoken = "".join(e.chunk.text for e in events if isinstance(e, ReplyAudio))
    assert spoken == "".join(TOKENS)
    assert isinstance(events[-1], ReplyDone) and events[-1].finish_reason == "stop"


# ---------------------------------------------------------------- deadlines

SHORT = StageDeadlines(llm_first_token_s=0.1, llm_stall_s=0.1, tts_s=0.1)


async def _finish(run: ReplyRun, limit_s: float = 5.0) -> ReplyDone:
    run.start()
    run.release()
    events = await asyncio.wait_for(_drain(run), limit_s)
    assert isinstance(events[-1], ReplyDone)
    return events[-1]


@pytest.mark.parametrize("serial", [False, True])
async def test_an_llm_with_no_first_token_fails_the_reply(serial: bool) -> None:
    done = await _finish(ReplyRun(StallingLlm(TOKENS), FakeTts(), REQUEST, serial=serial,
                                  deadlines=SHORT))
    assert done.code == "llm_timeout" and done.error is not None
    assert "first token" in done.error


async def test_an_llm_that_stalls_mid_reply_fails_the_reply() -> None:
    run = ReplyRun(StallingLlm(TOKENS, before_stall=3), FakeTts(), REQUEST, deadlines=SHORT)
    done = await _finish(run)
    assert done.code == "llm_timeout" and done.error is not None and "stalled" in done.error
    assert run.text == "".join(TOKENS[:3])


@pytest.mark.parametrize("serial", [False, True])
async def test_a_tts_that_owes_audio_fails_the_reply(serial: bool) -> None:
    done = await _finish(ReplyRun(FakeLlm(TOKENS), SilentTts(), REQUEST, serial=serial,
                                  deadlines=SHORT))
    assert done.code == "tts_timeout" and done.error is not None


async def test_waiting_on_our_own_consumer_never_counts_against_a_stage() -> None:
    """A speculative run held at the gate (queue full) for longer than every deadline is
    not a stage failure: it completes normally once released."""
    patient = StageDeadlines(llm_first_token_s=0.5, llm_stall_s=0.5, tts_s=0.5)
    run = ReplyRun(FakeLlm(TOKENS, interval_s=0.0), FakeTts(), REQUEST, max_buffered=2,
                   deadlines=patient)
    run.start()
    await asyncio.sleep(2.0)  # 4x every deadline, blocked on our queue
    run.release()
    events = await asyncio.wait_for(_drain(run), 5)
    done = events[-1]
    assert isinstance(done, ReplyDone) and done.error is None and done.finish_reason == "stop"
    assert "".join(e.chunk.text for e in events if isinstance(e, ReplyAudio)) == "".join(TOKENS)


async def test_a_slow_but_steady_llm_is_not_a_stall() -> None:
    llm = FakeLlm(TOKENS, first_token_s=0.1, interval_s=0.1)  # 0.9 s in all, 0.1 s a wait
    patient = StageDeadlines(llm_first_token_s=0.5, llm_stall_s=0.5, tts_s=0.5)
    done = await _finish(ReplyRun(llm, FakeTts(), REQUEST, deadlines=patient))
    assert done.error is None and done.finish_reason == "stop"
