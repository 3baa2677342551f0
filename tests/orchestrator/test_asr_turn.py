"""Stage deadlines on the ASR side: a hung, refusing or stalled ASR stage ends its turn on
the newest hypothesis, and VAD/turn-taking never wait on it."""

from __future__ import annotations

import asyncio

from orchestrator.policy import OverlapPolicy, StageDeadlines
from orchestrator.reply import ReplyRun
from orchestrator.turn import (
    ReplyReleased,
    SpeechStarted,
    SpeechStopped,
    TranscriptDone,
    TurnController,
    TurnEvent,
)
from stages.llm.types import ChatMessage, LlmRequest
from tests.orchestrator.fakes import (
    FakeAsr,
    FakeAsrStream,
    FakeLlm,
    FakeTts,
    FakeVad,
    HangingAsr,
    silence,
)
from tests.orchestrator.test_turn import WORDS, words

FAST = StageDeadlines(asr_open_s=0.2, asr_finalize_s=0.2, asr_max_backlog_ms=1000)


class Harness:
    def __init__(self, asr: HangingAsr, policy: OverlapPolicy | None = None) -> None:
        self.asr = asr
        self.events: list[TurnEvent] = []
        self.controller = TurnController(vad=FakeVad(), asr=asr, make_reply=self.reply,
                                         emit=self.emit, policy=policy or OverlapPolicy(),
                                         deadlines=FAST)

    def reply(self, turn: int, transcript: str) -> ReplyRun:
        return ReplyRun(FakeLlm(["Ok", "."]), FakeTts(),
                        LlmRequest(messages=[ChatMessage(role="user", content=transcript)]))

    async def emit(self, event: TurnEvent) -> None:
        self.events.append(event)

    async def say(self, audio: bytes) -> None:
        for i in range(0, len(audio), 640):
            await self.controller.push_audio(audio[i:i + 640])
            await asyncio.sleep(0)

    def of(self, kind: type) -> list:  # type: ignore[type-arg]
        return [e for e in self.events if isinstance(e, kind)]


async def test_hung_finalize_falls_back_to_the_last_hypothesis() -> None:
    h = Harness(HangingAsr(WORDS, hang_finalize=True))
    await h.say(words(4) + silence(800))
    await h.controller.wait_idle()
    done = h.of(TranscriptDone)
    assert len(done) == 1 and done[0].text == "turn on the lights"
    assert done[0].error is not None and "final transcript" in done[0].error
    assert len(h.of(ReplyReleased)) == 1  # the turn is answered anyway
    await h.controller.aclose()


async def test_vad_keeps_running_while_a_turn_finalizes() -> None:
    """The next turn's speech_started is not held up by the previous turn's finalize."""
    h = Harness(HangingAsr(WORDS, hang_finalize=True),
                policy=OverlapPolicy(speculative=False))
    await h.say(words(2) + silence(600) + words(2))
    # The hung finalize of turn 1 has not ended (deadline 0.2 s of wall time) ...
    assert h.of(TranscriptDone) == [] or h.of(TranscriptDone)[0].turn == 1
    # ... yet turn 2 was detected on the audio right after it.
    assert [e.turn for e in h.of(SpeechStarted)] == [1, 2]
    assert [e.turn for e in h.of(SpeechStopped)] == [1]
    await h.controller.aclose()


async def test_a_refusing_stage_fails_the_transcript_then_recovers() -> None:
    asr = HangingAsr(WORDS, refuse=True)
    h = Harness(asr)
    await h.say(words(4) + silence(800))
    await h.controller.wait_idle()
    done = h.of(TranscriptDone)
    assert len(done) == 1 and done[0].text == "" and done[0].error is not None
    assert h.of(ReplyReleased) == []
    asr.refuse = False  # the stage is back: the next turn works
    await h.say(words(4) + silence(800))
    await h.controller.wait_idle()
    assert h.of(TranscriptDone)[-1] == TranscriptDone(2, "turn on the lights")
    assert [r.turn for r in h.of(ReplyReleased)] == [2]


async def test_a_stage_that_stops_reading_is_dropped_not_waited_on() -> None:
    h = Harness(HangingAsr(WORDS, push_limit=3))
    await h.say(words(4) + silence(2000))  # far more than the 1 s backlog allowed
    await h.controller.wait_idle()
    done = h.of(TranscriptDone)
    assert len(done) == 1 and done[0].error is not None
    assert "behind" in done[0].error or "final transcript" in done[0].error


async def test_the_hypothesis_joins_stable_and_unstable_words() -> None:
    from orchestrator.asr_turn import AsrTurn
    from stages.asr.types import AsrPartial
    from tests.orchestrator.fakes import FakeAsr

    async def ignore(turn: AsrTurn, partial: AsrPartial) -> None:
        return None

    turn = AsrTurn(FakeAsr(WORDS), turn=1, origin=0, on_partial=ignore)
    # The wire strips both parts: the space between them is the hypothesis's to restore.
    turn.latest = AsrPartial(stable="order a large", unstable="pizza.", audio_ms=900, revision=3)
    assert turn.hypothesis() == "order a large pizza."
    turn.latest = AsrPartial(stable="", unstable=" pizza. ", audio_ms=900, revision=4)
    assert turn.hypothesis() == "pizza."
    turn.latest = AsrPartial(stable="order", unstable="", audio_ms=900, revision=5)
    assert turn.hypothesis() == "order"
    turn.close()


class _RecordingAsr(FakeAsr):
    """Records every push and end-of-speech hint its streams get, in order."""

    def __init__(self) -> None:
        super().__init__(WORDS)
        self.log: list[int | str] = []  # push sizes (bytes), "eos" for a hint

    async def open_stream(self, *, language: str | None = None,
                          prompt: str | None = None) -> FakeAsrStream:
        stream = await super().open_stream(language=language, prompt=prompt)
        push, eos = stream.push, stream.end_of_speech

        async def recorded_push(pcm16: bytes) -> None:
            self.log.append(len(pcm16))
            await push(pcm16)

        async def recorded_eos(audio_ms: int) -> None:
            self.log.append("eos")
            await eos(audio_ms)

        stream.push = recorded_push  # type: ignore[method-assign]
        stream.end_of_speech = recorded_eos  # type: ignore[method-assign]
        return stream


async def test_audio_reaches_the_stage_in_pushes_of_60_ms_and_the_end_of_speech_at_once(
) -> None:
    """20 ms frames are coalesced into pushes of >= 60 ms (one stage message per frame
    was the feeder's cost); nothing is lost or reordered, and an end of speech sends
    what is pending at once, before the hint."""
    asr = _RecordingAsr()
    h = Harness(asr)  # type: ignore[arg-type]
    audio = words(2) + silence(800)
    await h.say(audio)
    await h.controller.wait_idle()
    pushes = [x for x in asr.log if isinstance(x, int)]
    assert "eos" in asr.log
    segment: list[int] = []  # the pushes since the last hint: only the last may be short
    for entry in [*asr.log, "eos"]:
        if entry == "eos":
            assert all(size >= 1920 for size in segment[:-1]), asr.log
            segment = []
        else:
            assert isinstance(entry, int)
            segment.append(entry)
    # everything pushed: the turn's audio (from the prefix padding on) up to its end
    streams = asr.streams
    assert len(streams) == 1
    assert sum(pushes) == streams[0]._received * 2
    assert len(pushes) < len(audio) // 640 // 2  # far fewer pushes than 20 ms frames
    done = h.of(TranscriptDone)
    assert len(done) == 1 and done[0].text == "turn on"
    await h.controller.aclose()
