"""Turn-taking with deterministic fake VAD/ASR/LLM/TTS and simulated user speech.

Audio is pushed in 20 ms frames as fast as the loop allows; the controller runs on the
audio clock, so speech_started/stopped positions and speculation decisions are exact.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from orchestrator.policy import OverlapPolicy
from orchestrator.reply import ReplyRun
from orchestrator.turn import (
    BargeIn,
    ReplyCancelled,
    ReplyReleased,
    SpeechStarted,
    SpeechStopped,
    TranscriptDelta,
    TranscriptDone,
    TurnController,
    TurnEvent,
)
from stages.llm.types import ChatMessage, LlmRequest
from tests.orchestrator.fakes import FakeAsr, FakeLlm, FakeTts, FakeVad, silence, tone

WORDS = ["turn", "on", "the", "lights"]


class Harness:
    def __init__(self, policy: OverlapPolicy | None = None, final_suffix: str = "",
                 auto_turns: bool = True) -> None:
        self.events: list[TurnEvent] = []
        self.prompts: list[str] = []
        self.llm = FakeLlm(["Sure", ",", " turning", " them", " on", "."], interval_s=0.001)
        self.asr = FakeAsr(WORDS, final_suffix=final_suffix)
        self.controller = TurnController(vad=FakeVad(), asr=self.asr, make_reply=self.reply,
                                         emit=self.emit, policy=policy or OverlapPolicy(),
                                         auto_turns=auto_turns)

    def reply(self, turn: int, transcript: str) -> ReplyRun:
        self.prompts.append(transcript)
        request = LlmRequest(messages=[ChatMessage(role="user", content=transcript)])
        return ReplyRun(self.llm, FakeTts(), request)

    async def emit(self, event: TurnEvent) -> None:
        self.events.append(event)

    async def say(self, *parts: bytes) -> None:
        audio = b"".join(parts)
        for i in range(0, len(audio), 640):  # 20 ms frames
            await self.controller.push_audio(audio[i:i + 640])
            await asyncio.sleep(0)  # let partial watchers and reply runs progress
        await self.settle()

    async def settle(self) -> None:
        """Let the background work (ASR feed, turn ends) catch up with the audio."""
        for _ in range(5):
            await asyncio.sleep(0)
        await self.controller.wait_idle()

    def of(self, kind: type) -> list:  # type: ignore[type-arg]
        return [e for e in self.events if isinstance(e, kind)]


def words(n: int, gap_ms: int = 100) -> bytes:
    """n spoken 'words' (240 ms tone bursts) with short gaps between them."""
    return b"".join(tone(240) + (silence(gap_ms) if i < n - 1 else b"") for i in range(n))


async def test_speculative_reply_is_released_at_the_endpoint() -> None:
    h = Harness()
    await h.say(silence(400), words(4), silence(800))
    started, stopped = h.of(SpeechStarted), h.of(SpeechStopped)
    assert len(started) == 1 and len(stopped) == 1
    assert started[0].audio_start_ms == 384  # first voiced 512-sample frame at 400 ms
    voiced_end_ms = 400 + 4 * 240 + 3 * 100
    assert abs(stopped[0].audio_end_ms - voiced_end_ms) <= 32  # one VAD frame
    assert h.of(TranscriptDone) == [TranscriptDone(1, "turn on the lights")]
    released = h.of(ReplyReleased)
    assert len(released) == 1 and released[0].speculative_hit and released[0].revision == 1
    assert h.prompts == ["turn on the lights"]  # the LLM ran once, started in the pause
    assert h.of(ReplyCancelled) == []
    # Transcription deltas stream while the user speaks and add up to the transcript.
    deltas = "".join(e.text for e in h.of(TranscriptDelta))
    assert deltas == "turn on the lights"
    assert h.events.index(h.of(TranscriptDelta)[0]) < h.events.index(stopped[0])


async def test_user_resuming_after_a_pause_cancels_the_speculation() -> None:
    h = Harness()
    await h.say(silence(200), words(2), silence(300), words(2), silence(800))
    assert h.of(ReplyCancelled) == [ReplyCancelled(1, 1, "user_resumed")]
    assert h.prompts == ["turn on", "turn on the lights"]
    released = h.of(ReplyReleased)
    assert len(released) == 1 and released[0].revision == 2
    assert len(h.of(SpeechStopped)) == 1  # one turn, not two
    assert h.llm.closed_early == 1  # revision 1's generation was stopped


async def test_final_transcript_that_differs_restarts_the_reply() -> None:
    h = Harness(final_suffix=" please")
    await h.say(words(4), silence(800))
    assert h.of(ReplyCancelled) == [ReplyCancelled(1, 1, "transcript_changed")]
    assert h.prompts == ["turn on the lights", "turn on the lights please"]
    released = h.of(ReplyReleased)
    assert [r.revision for r in released] == [2] and not released[0].speculative_hit


async def test_serial_mode_starts_the_llm_only_after_the_endpoint() -> None:
    h = Harness(policy=OverlapPolicy(serial=True))
    await h.say(words(4), silence(450))
    assert h.prompts == []  # past the speculative pause, before the endpoint
    await h.say(silence(300))
    assert h.prompts == ["turn on the lights"]
    assert not h.of(ReplyReleased)[0].speculative_hit


async def test_barge_in_cancels_the_playing_reply() -> None:
    h = Harness()
    await h.say(words(4), silence(800))
    run = h.of(ReplyReleased)[0].run
    h.controller.set_reply_playing(run)
    await h.say(tone(100))
    assert h.of(BargeIn) == []  # shorter than barge_in_min_ms: a cough, not a turn
    await h.say(silence(300), tone(300))
    assert len(h.of(BargeIn)) == 1
    events = [e async for e in run.events()]
    assert events[-1].finish_reason == "cancelled"  # type: ignore[union-attr]


async def test_interrupt_response_false_keeps_the_reply() -> None:
    h = Harness(policy=replace(OverlapPolicy(), interrupt_response=False))
    await h.say(words(4), silence(800))
    run = h.of(ReplyReleased)[0].run
    h.controller.set_reply_playing(run)
    await h.say(tone(400))
    assert h.of(BargeIn) == []


async def test_manual_turns_wait_for_commit() -> None:
    h = Harness(auto_turns=False)
    await h.say(words(4), silence(1500))
    assert h.of(SpeechStopped) == [] and h.of(TranscriptDone) == []
    assert await h.controller.commit() == 1
    await h.settle()
    assert h.of(TranscriptDone) == [TranscriptDone(1, "turn on the lights")]
    assert h.prompts == []  # manual turns: the client sends response.create
    await h.controller.aclose()


async def test_empty_turn_gets_no_reply() -> None:
    h = Harness()
    h.asr.words = []  # ASR heard nothing intelligible
    await h.say(tone(300), silence(800))
    assert h.of(TranscriptDone) == [TranscriptDone(1, "")]
    assert h.of(ReplyReleased) == []


# ---------------------------------------------------------------- many turns, one clock


async def test_speculation_fires_on_turn_30_exactly_as_on_turn_1() -> None:
    """Turn positions are on one clock: the hypothesis of turn n covers its speech, so
    every turn's reply starts in the pause and is released at the endpoint."""
    h = Harness()
    for _ in range(30):
        await h.say(silence(700), words(4), silence(800))
    released = h.of(ReplyReleased)
    assert [r.turn for r in released] == list(range(1, 31))
    assert all(r.speculative_hit for r in released), [r.speculative_hit for r in released]
    assert h.controller.speculative_hits == 30 and h.controller.speculative_misses == 0
    assert h.prompts == ["turn on the lights"] * 30  # one LLM run per turn, none wasted
    assert [e.turn for e in h.of(TranscriptDone)] == list(range(1, 31))


async def test_manual_turns_transcribe_only_their_own_audio() -> None:
    h = Harness(auto_turns=False)
    h.asr.words = ["one", "two", "three", "four", "five", "six"]
    await h.say(words(2), silence(300))
    assert await h.controller.commit() == 1
    await h.say(silence(200), words(3), silence(300))
    assert await h.controller.commit() == 2
    await h.settle()
    # Each turn's ASR stream heard only that turn's audio (2 and 3 bursts).
    assert h.of(TranscriptDone) == [TranscriptDone(1, "one two"),
                                    TranscriptDone(2, "one two three")]
    await h.controller.aclose()


async def test_padding_never_reaches_into_the_previous_turn() -> None:
    h = Harness(policy=replace(OverlapPolicy(), prefix_padding_ms=2000))
    await h.say(words(4), silence(600))  # endpoint after 500 ms of silence
    await h.say(words(2), silence(800))  # starts right after: padding would reach back
    done = h.of(TranscriptDone)
    assert done == [TranscriptDone(1, "turn on the lights"), TranscriptDone(2, "turn on")]


async def test_a_turn_that_never_pauses_is_ended_at_max_turn_ms() -> None:
    h = Harness(policy=replace(OverlapPolicy(), max_turn_ms=2000))
    await h.say(tone(5000))
    stopped = h.of(SpeechStopped)
    assert len(stopped) >= 2  # ended at 2 s, the next turn started, ended again at 4 s
    assert h.controller.turn_audio_ms <= 2000 + 40
    assert [e.turn for e in h.of(TranscriptDone)][:2] == [1, 2]


async def test_silence_between_turns_is_not_buffered() -> None:
    h = Harness()
    await h.say(words(2), silence(800))
    assert h.controller.turn_audio_ms == 0
    await h.say(silence(10_000))
    assert h.controller.turn_audio_ms == 0  # no open turn: silence is scored and dropped
    await h.say(words(4), silence(800))
    assert [e.text for e in h.of(TranscriptDone)] == ["turn on", "turn on the lights"]


async def test_barge_in_is_counted_only_while_a_reply_plays() -> None:
    h = Harness()
    await h.say(words(4), silence(800))
    run = h.of(ReplyReleased)[0].run
    h.controller.set_reply_playing(run)
    h.controller.set_reply_playing(None)  # the reply finished playing
    await h.say(words(4), silence(800))
    assert h.of(BargeIn) == []
