"""The pause: the ASR's end-of-speech hint, speculation that follows the newest hypothesis,
and semantic_vad endpoints decided by an end-of-turn model (a scripted fake here; the real
Smart Turn is tested in tests/stages/vad and end to end in tests/orchestrator)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from orchestrator.policy import OverlapPolicy, SemanticRule
from orchestrator.turn import ReplyCancelled, ReplyReleased, SpeechStopped, TurnController
from tests.orchestrator.fakes import FakeVad, silence
from tests.orchestrator.test_turn import Harness, words

RULE = SemanticRule(first_check_ms=150, threshold=0.5, max_wait_ms=2000, recheck_ms=100)


class ScriptedTurnModel:
    """Answers with ``probability(seconds of audio heard)``; records every question."""

    def __init__(self, answer: float) -> None:
        self.answer = answer
        self.heard_s: list[float] = []

    async def predict(self, audio: npt.NDArray[np.float32]) -> float:
        self.heard_s.append(audio.size / 16_000)
        await asyncio.sleep(0)
        return self.answer


def semantic_harness(answer: float, rule: SemanticRule = RULE) -> tuple[Harness, ScriptedTurnModel]:
    h = Harness(policy=OverlapPolicy(semantic=rule, speculative_pause_ms=rule.first_check_ms))
    model = ScriptedTurnModel(answer)
    h.controller = TurnController(vad=FakeVad(), asr=h.asr, make_reply=h.reply, emit=h.emit,
                                  policy=h.controller.policy, turn_model=model)
    return h, model


async def test_the_asr_hears_each_pause_once_where_the_speech_stopped() -> None:
    h = Harness()
    await h.say(silence(200), words(2), silence(300), words(2), silence(800))
    # Every silent gap of >= asr_pause_hint_ms (64) is one hint, at the end of the voiced
    # frames before it, in stream ms (the turn's audio starts at 0 here: the speech began
    # 200 ms in, less than prefix_padding_ms). Word ends: 440, 780 | 1320, 1660 ms.
    ends = h.asr.speech_ends
    assert len(ends) == 4
    for got, word_end in zip(ends, (440, 780, 1320, 1660), strict=True):
        assert 0 <= got - word_end <= 32 + 32, ends  # VAD frames are 32 ms
    assert len(h.of(SpeechStopped)) == 1


async def test_a_newer_hypothesis_in_the_pause_replaces_the_speculation() -> None:
    # The fake ASR's partial lags one word behind while its audio is still being fed:
    # the first speculation may start on fewer words, and is then replaced in the pause.
    h = Harness(policy=replace(OverlapPolicy(), speculative_uncovered_ms=2000))
    await h.say(words(4), silence(800))
    released = h.of(ReplyReleased)
    assert len(released) == 1 and released[0].speculative_hit
    assert h.prompts[-1] == "turn on the lights"
    for cancelled in h.of(ReplyCancelled):
        assert cancelled.reason == "transcript_changed"
    assert len(h.prompts) == len(h.of(ReplyCancelled)) + 1


async def test_semantic_vad_ends_a_complete_turn_at_the_first_check() -> None:
    h, model = semantic_harness(0.9)
    await h.say(silence(200), words(3), silence(700))
    stopped = h.of(SpeechStopped)
    assert len(stopped) == 1 and model.heard_s
    # Ended at the first question (150 ms of silence + one VAD frame), not after 500 ms.
    assert len(model.heard_s) == 1
    assert h.controller.last_turn_probability == 0.9
    assert (stopped[0].reason, stopped[0].probability) == ("semantic", 0.9)
    released = h.of(ReplyReleased)
    assert len(released) == 1


async def test_semantic_vad_waits_while_the_model_says_incomplete() -> None:
    h, model = semantic_harness(0.1)
    await h.say(silence(200), words(3), silence(1200))
    assert h.of(SpeechStopped) == []  # 1.2 s of silence: server_vad would have ended it
    assert len(model.heard_s) >= 5  # asked again every 100 ms of silence
    assert all(s <= 8.0 for s in model.heard_s)
    await h.say(silence(900))  # past max_wait_ms (2 s): ended anyway
    stopped = h.of(SpeechStopped)
    assert len(stopped) == 1 and (stopped[0].reason, stopped[0].probability) == ("silence", 0.1)
    assert len(h.of(ReplyReleased)) == 1


async def test_a_pause_shorter_than_the_first_check_asks_nothing() -> None:
    h, model = semantic_harness(0.9, replace(RULE, first_check_ms=150))
    await h.say(silence(100), words(2, gap_ms=120), silence(100))
    assert model.heard_s == [] and h.of(SpeechStopped) == []


async def test_without_a_model_semantic_vad_falls_back_to_silence() -> None:
    h = Harness(policy=OverlapPolicy(semantic=RULE))  # no turn_model given
    await h.say(words(3), silence(450))
    assert h.of(SpeechStopped) == []
    await h.say(silence(150))
    stopped = h.of(SpeechStopped)
    assert len(stopped) == 1 and stopped[0].reason == "silence"  # as server_vad
