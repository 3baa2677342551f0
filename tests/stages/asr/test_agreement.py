"""Local agreement / commit logic on synthetic hypotheses (no model)."""

from __future__ import annotations

from stages.asr.agreement import (
    LocalAgreement,
    common_prefix_len,
    norm_word,
    strip_committed,
    strip_overlap,
)
from stages.asr.types import AsrWord


def words(text: str, start: float = 0.0, step: float = 0.3) -> list[AsrWord]:
    return [AsrWord(word=" " + w, start=start + i * step, end=start + (i + 1) * step,
                    probability=0.9) for i, w in enumerate(text.split())]


def test_norm_word_ignores_case_and_punctuation() -> None:
    assert norm_word(" Dog.") == "dog"
    assert norm_word("don't,") == "don't"
    assert norm_word(" ...") == ""


def test_commits_only_what_two_hypotheses_agree_on() -> None:
    ag = LocalAgreement()
    assert ag.update(words("the quick")) == []  # first hypothesis: nothing to compare with
    assert ag.stable_text == ""
    assert ag.unstable_text == "the quick"
    new = ag.update(words("the quick brown fax"))
    assert [w.word for w in new] == [" the", " quick"]
    assert ag.stable_text == "the quick"
    assert ag.unstable_text == "brown fax"
    # "fax" is revised to "fox": only "brown" agrees.
    ag.window_from = len(ag.committed)  # window was cut after "quick"
    new = ag.update(words("brown fox jumps", start=0.6))
    assert [w.word for w in new] == [" brown"]
    assert ag.stable_text == "the quick brown"
    assert ag.unstable_text == "fox jumps"


def test_disagreement_at_first_word_commits_nothing() -> None:
    ag = LocalAgreement()
    ag.update(words("a cat sat"))
    assert ag.update(words("the cat sat")) == []
    assert ag.stable_text == ""


def test_stable_text_is_monotonic_over_a_noisy_sequence() -> None:
    hyps = ["what", "what time", "what time does", "what tim does the", "what time does the",
            "what time does the train", "what time does the train to boston",
            "what time does the train to boston leave"]
    ag = LocalAgreement()
    prev = ""
    for h in hyps:
        ag.update(words(h))
        assert ag.stable_text.startswith(prev)
        prev = ag.stable_text
    assert prev == "what time does the train to boston"
    ag.commit_all()
    assert ag.stable_text == "what time does the train to boston leave"


def test_window_retranscription_of_committed_words_is_removed() -> None:
    ag = LocalAgreement()
    ag.update(words("please turn on"))
    ag.update(words("please turn on the lights"))
    assert ag.stable_text == "please turn on"
    # The window still holds all committed audio: the hypothesis repeats it first.
    ag.update(words("Please turn on the lights in"))
    assert ag.stable_text == "please turn on the lights"
    assert ag.unstable_text == "in"


def test_strip_committed_falls_back_to_time_when_words_differ() -> None:
    committed = words("turn on")  # ends at 0.6 s
    hyp = words("turned on the lights")  # re-heard differently
    assert [w.word for w in strip_committed(committed, hyp, committed[-1].end)] == [
        " the", " lights"]


def test_strip_overlap_drops_repeated_tail_ngram() -> None:
    committed = words("book a table")
    hyp = words("a table for four", start=0.3)
    assert [w.word for w in strip_overlap(committed, hyp)] == [" for", " four"]
    far = words("a table", start=5.0)
    assert strip_overlap(committed, far) == far  # too far away in time to be a repeat


def test_commit_until_forces_old_words() -> None:
    ag = LocalAgreement()
    ag.update(words("one two three four"))
    forced = ag.commit_until(0.65)
    assert [w.word for w in forced] == [" one", " two"]
    assert ag.unstable_text == "three four"


def test_common_prefix_len() -> None:
    assert common_prefix_len(words("a b c"), words("A, b d")) == 2
    assert common_prefix_len([], words("a")) == 0
