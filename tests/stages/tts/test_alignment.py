# ruff: noqa: RUF001, RUF003  (IPA phoneme symbols are intended)
"""Unit tests of phoneme -> word alignment with small hand-made inputs."""

from __future__ import annotations

from stages.tts.alignment import PhonemeSpan, text_words, word_timings

LEXICON = {"of": "ʌv", "the": "ðə", "cat.": "kˈæt.", "a": "ˈeɪ", "dog": "dˈɔɡ", "big": "bˈɪɡ"}


def spans(phonemes: list[str], step: int = 100) -> list[PhonemeSpan]:
    return [PhonemeSpan(p, i * step, (i + 1) * step) for i, p in enumerate(phonemes)]


def test_merged_function_words_are_split_at_the_right_phoneme() -> None:
    # espeak merges "of the" into one phoneme word "ʌvðə"
    ctx = spans(["^", "ʌ", "v", "ð", "ə", " ", "k", "ˈ", "æ", "t", ".", "$"])
    words = word_timings("of the cat.", ctx, 1000, LEXICON.__getitem__)
    assert words is not None
    assert [w.text for w in words] == ["of", "the", "cat."]
    assert (words[0].start_ms, words[0].end_ms) == (100, 300)
    assert (words[1].start_ms, words[1].end_ms) == (300, 500)
    assert (words[2].start_ms, words[2].end_ms) == (600, 1000)


def test_unmatched_word_takes_the_gap_between_neighbours() -> None:
    # "a" alone reads "eɪ" but in context it is "ɐ": no phoneme match
    ctx = spans(["^", "ɐ", " ", "b", "ˈ", "ɪ", "ɡ", " ", "d", "ˈ", "ɔ", "ɡ", "$"])
    words = word_timings("a big dog", ctx, 1000, LEXICON.__getitem__)
    assert words is not None
    assert [w.text for w in words] == ["a", "big", "dog"]
    assert words[0].start_ms == 0 and words[0].end_ms == 300  # up to "b"
    assert words[1].start_ms == 300
    ends = [w.end_ms for w in words]
    starts = [w.start_ms for w in words]
    assert all(s <= e for s, e in zip(starts, ends, strict=True))
    assert all(ends[i] <= starts[i + 1] for i in range(len(words) - 1))


def test_unrelated_phonemes_give_no_timings() -> None:
    ctx = spans(["^", "z", "u", "ʒ", "y", "$"])
    assert word_timings("big dog", ctx, 1000, LEXICON.__getitem__) is None


def test_punctuation_only_tokens_are_not_words() -> None:
    assert text_words("Well — yes, ok ...") == [(0, "Well"), (7, "yes,"), (12, "ok")]
    assert word_timings(" ... ", spans(["^", "$"]), 1000, LEXICON.__getitem__) == []
