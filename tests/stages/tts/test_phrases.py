"""Unit tests of the incremental phrase cutter (pure text logic, no model)."""

from __future__ import annotations

import random
import re

import pytest

from stages.tts.phrases import PhraseBounds, PhraseCutter, find_cut, split_phrases

TEXTS = [
    "Hello there! I met Dr. Smith in the U.S. last year, and he paid 3.14 dollars. "
    "Well... I don't know what to say about that. It was a long day, honestly, and I think "
    "we should go home now because it is late and the trains stop running at midnight, "
    "which is annoying. Ok.",
    "Sure. The weather today is sunny with a high of 75 degrees, e.g. perfect for a walk.",
    "one two three four five six seven eight nine ten eleven twelve",
    "Here is a list:\n- apples\n- pears\n\nThat is all, thanks!",
    "  Leading spaces, then a sentence. Another one!  Trailing spaces.   ",
    "Mr. and Mrs. Jones arrived at 5 p.m. on Jan. 3rd. They were late.",
]


def feed(text: str, pieces: list[str]) -> list[str]:
    assert "".join(pieces) == text
    cutter = PhraseCutter()
    out: list[str] = []
    for piece in pieces:
        out += cutter.push(piece)
    return out + cutter.finish()


def llm_tokens(text: str) -> list[str]:
    """Split like an LLM tokenizer would: leading space + up to 3 chars."""
    return re.findall(r"\s*\S{1,3}|\s+", text)


def random_pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, len(text) // 3)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize("text", TEXTS)
def test_concatenation_reproduces_input(text: str) -> None:
    phrases = split_phrases(text)
    assert "".join(phrases) == text
    assert all(phrases)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_feeding_matches_one_shot(text: str) -> None:
    expected = split_phrases(text)
    assert feed(text, llm_tokens(text)) == expected
    assert feed(text, list(text)) == expected  # char by char
    rng = random.Random(7)
    for _ in range(5):
        assert feed(text, random_pieces(text, rng)) == expected


def test_first_phrase_is_short_and_later_ones_are_longer() -> None:
    text = ("Sure, I can help with that. The store opens at nine in the morning and "
            "closes at six. On weekends it opens later. You can also order online at any time.")
    phrases = split_phrases(text)
    assert phrases[0] == "Sure, I can help "  # 4 words: "Sure," is too short a clause
    assert phrases[1] == "with that. "  # the ramp: a sentence end, else at most 8 words
    # later phrases merge short sentences: "On weekends it opens later." is not alone
    assert all(len(p.split()) > 8 for p in phrases[2:])
    assert any("opens later. You can also" in p for p in phrases)


def test_first_phrase_cut_at_clause_after_a_few_words() -> None:
    text = "Well, I think that the answer, if you ask me, is quite simple really."
    phrases = split_phrases(text, PhraseBounds(first_max_words=6))
    assert phrases[0] == "Well, I think that the answer, "  # not after "Well," (1 word)


def test_first_phrase_word_cap_without_punctuation() -> None:
    bounds = PhraseBounds(first_max_words=5)
    phrases = split_phrases("one two three four five six seven eight nine ten", bounds)
    assert phrases[0] == "one two three four five "
    assert phrases[1] == "six seven eight nine ten"


def test_the_phrases_after_the_first_ramp_up() -> None:
    """Each ramp phrase is synthesized while the one before plays: the caps double."""
    words = " ".join(f"w{i}" for i in range(40))
    phrases = split_phrases(words, PhraseBounds(first_max_words=2, ramp=3, later_max_chars=40))
    assert [len(p.split()) for p in phrases[:3]] == [2, 4, 8]
    assert all(len(p) <= 40 for p in phrases[3:])  # then the later rule
    assert "".join(phrases) == words
    # The ramp's phrases end at clause ends too, once first_min_words long.
    phrases = split_phrases("Okay. So the answer, as far as I know, is yes and no.")
    assert phrases == ["Okay. ", "So the answer, ", "as far as I know, is yes and no."]


def test_sentence_end_after_one_word_is_a_first_phrase() -> None:
    assert split_phrases("Hi! How are you doing today?")[0] == "Hi! "


@pytest.mark.parametrize("abbr", ["Dr.", "Mr.", "Mrs.", "e.g.", "i.e.", "U.S.", "etc.", "J."])
def test_abbreviations_are_not_cut(abbr: str) -> None:
    bounds = PhraseBounds(first_min_words=50, first_max_words=50)
    text = f"We talked about {abbr} things with them. Then we left."
    phrases = split_phrases(text, bounds)
    assert phrases[0] == "We talked about " + abbr + " things with them. "


def test_lowercase_after_period_is_not_a_sentence_end() -> None:
    bounds = PhraseBounds(first_min_words=50, first_max_words=50)
    assert split_phrases("It costs approx. five dollars. Bye.", bounds)[0] == \
        "It costs approx. five dollars. "


def test_decimals_and_ellipses_are_not_cut() -> None:
    bounds = PhraseBounds(first_min_words=50, first_max_words=50)
    phrases = split_phrases("Pi is 3.14159 roughly. Next.", bounds)
    assert phrases[0] == "Pi is 3.14159 roughly. "
    phrases = split_phrases("Well... I don't know what to say. Bye.", bounds)
    assert phrases[0] == "Well... I don't know what to say. "
    phrases = split_phrases("Hmm\u2026 maybe later. Bye.", bounds)
    assert phrases[0] == "Hmm\u2026 maybe later. "


def test_boundary_is_only_certain_after_the_next_character() -> None:
    cutter = PhraseCutter()
    assert cutter.push("Hello.") == []
    assert cutter.push(" ") == []  # "Hello. " could still be followed by lowercase
    assert cutter.push("W") == ["Hello. "]
    assert cutter.offset == len("Hello. ")
    cutter = PhraseCutter()
    assert cutter.push("I saw Dr.") == []
    assert cutter.push(" Smith") == []  # "Dr." never ends the phrase
    assert cutter.finish() == ["I saw Dr. Smith"]


def test_never_cuts_inside_a_word() -> None:
    text = "a" * 30 + " " + "b" * 30 + " " + "supercalifragilistic " * 30
    bounds = PhraseBounds(first_max_words=2, later_min_chars=10, later_max_chars=40)
    phrases = split_phrases(text, bounds)
    assert "".join(phrases) == text
    for p in phrases[:-1]:
        assert p.endswith(" ")


def test_long_sentence_split_at_clause_within_cap() -> None:
    bounds = PhraseBounds(later_min_chars=20, later_max_chars=80)
    text = ("Ok. This sentence has many parts, which go on and on, and then some more words "
            "follow, until it finally ends somewhere far away from where it started.")
    phrases = split_phrases(text, bounds)
    assert phrases[0] == "Ok. "
    for p in phrases[1:]:
        assert len(p) <= 80
    assert phrases[1].rstrip().endswith(",")


def test_newline_is_a_boundary_and_whitespace_only_final() -> None:
    phrases = split_phrases("Title\n\nBody text here goes on. End.")
    assert phrases[0] == "Title\n\n"
    assert split_phrases("   ") == ["   "]
    assert find_cut("", index=0, final=True) is None
    assert find_cut("Hello", index=0, final=False) is None
    assert find_cut("Hello", index=0, final=True) == 5
