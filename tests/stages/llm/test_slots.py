"""Slot choice by held prefix (no model): the keys, the shared prefix, and the ranking that
keeps each conversation on its own slot."""

from __future__ import annotations

from stages.llm.slots import Keys, prompt_keys, rank, reply_key, shared_prefix
from stages.llm.types import ChatMessage, LlmRequest, Role
from tests.stages.llm.conftest import WEATHER_TOOL

INSTRUCTIONS = "You are a friendly voice assistant. Answer in one or two short sentences. " * 8


def conversation(*turns: str) -> list[ChatMessage]:
    """System prompt, then user/assistant turns alternating."""
    roles: tuple[Role, Role] = ("user", "assistant")
    return [ChatMessage(role="system", content=INSTRUCTIONS),
            *(ChatMessage(role=roles[i % 2], content=t) for i, t in enumerate(turns))]


def keys(*turns: str) -> Keys:
    return prompt_keys(LlmRequest(messages=conversation(*turns)))


def test_keys_follow_the_template_order() -> None:
    k = prompt_keys(LlmRequest(messages=conversation("Hi"), tools=[WEATHER_TOOL]))
    assert len(k) == 3
    assert "get_weather" in k[0]  # the tools come first
    assert k[1].startswith("system") and k[1].endswith(INSTRUCTIONS)
    assert k[2].startswith("user") and k[2].endswith("Hi")
    assert prompt_keys(LlmRequest(messages=conversation("Hi")))[0] == ""  # no tools
    # a finished reply is keyed as the assistant message it becomes in the next turn
    assert keys("Hi", "Hello!", "More")[3] == reply_key("Hello!")


def test_shared_prefix_counts_whole_keys_then_a_partial_one() -> None:
    held = keys("What is the weath")
    new = keys("What is the weather like?")
    assert shared_prefix(held, new) == len(held[0]) + len(held[1]) + len(held[2])
    assert shared_prefix(keys("Hi"), keys("Ho")) == sum(map(len, keys("H")))
    assert shared_prefix((), new) == 0
    assert shared_prefix(new, new) == sum(map(len, new))


def best(keys: Keys, *slots: tuple[Keys, bool]) -> int:
    """Index of the preferred slot among (held, live) pairs."""
    return min(range(len(slots)), key=lambda i: rank(slots[i][0], keys, slots[i][1]))


SHIPS_TURN = (*keys("Tell me about ships."), reply_key("Ships carry goods across seas."))
COLOR_TURN = (*keys("Name a color."), reply_key("Blue."))


def test_next_turn_prefers_the_slot_holding_its_history() -> None:
    turn2 = keys("Tell me about ships.", "Ships carry goods across seas.", "And boats?")
    assert best(turn2, (COLOR_TURN, True), ((), True), (SHIPS_TURN, True)) == 2
    # the reply trimmed at barge-in only revises the last held message
    trimmed = keys("Tell me about ships.", "Ships carry", "And boats?")
    assert rank(SHIPS_TURN, trimmed, True)[0] is False
    assert best(trimmed, ((), True), (SHIPS_TURN, True)) == 1
    # a reply cancelled at barge-in is not recorded: the next turn extends the prompt
    cancelled = keys("Tell me about ships.")
    assert best(trimmed, ((), True), (cancelled, True)) == 1


def test_a_new_conversation_takes_a_cold_slot_over_a_live_one() -> None:
    """Saving the instructions' prefill is not worth evicting another conversation, even
    when the instructions are much longer than its history."""
    new = keys("What time is it?")
    assert rank(SHIPS_TURN, new, True)[0] is True
    assert best(new, (SHIPS_TURN, True), ((), True)) == 1
    # every slot live: the least work (here: the shorter history to overwrite)
    assert best(new, (COLOR_TURN, True), (SHIPS_TURN, True)) == 0


def test_a_stale_slot_is_reused_for_its_instructions() -> None:
    new = keys("What time is it?")
    assert rank(SHIPS_TURN, new, False) == (False, sum(map(len, new)) - shared_prefix(
        SHIPS_TURN, new))
    assert best(new, ((), True), (SHIPS_TURN, False)) == 1


def test_a_speculative_restart_prefers_its_slot_over_a_cold_one() -> None:
    """The prompt that was started on a hypothesis is held (its reply was cancelled);
    the final transcript revises the last message: that slot holds the history."""
    speculative = keys("Tell me about ships.", "Ships carry goods.", "What is the wea")
    final = keys("Tell me about ships.", "Ships carry goods.", "What's the weather today?")
    assert rank(speculative, final, True)[0] is False
    assert best(final, ((), True), (COLOR_TURN, True), (speculative, True)) == 2
    # on the first turn too, where only the instructions are held before it
    assert best(keys("What's the weather?"), ((), True), (keys("What is the"), True)) == 1


def test_rank_counts_prefill_and_live_overwrite() -> None:
    held, new = keys("abc", "reply"), keys("abd")
    shared = shared_prefix(held, new)
    prefill = sum(map(len, new)) - shared
    assert rank(held, new, True) == (True, prefill + sum(map(len, held)) - shared)
    assert rank(held, new, False) == (False, prefill)
    assert rank((), new, True) == (False, sum(map(len, new)))
