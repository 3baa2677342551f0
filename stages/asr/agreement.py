"""Local agreement: decide which words of a re-decoded window are final ("stable").

Each decode of the audio window yields a hypothesis of the whole window. A word is
committed once two consecutive hypotheses agree on it *and on everything before it* (the
longest common prefix, compared case- and punctuation-insensitively; LocalAgreement-2).
Committed words never change: the committed list only grows, and its joined text is the
stable prefix that every later partial and the final transcript start with.

The window may still hold the audio of some committed words (``window_from`` is the index
of the first committed word inside it; see ``session.py`` for where the window is cut).
Their re-transcription is removed from each hypothesis before comparing: first by matching
the committed words in order, else by time (words centred before the committed end).
"""

from __future__ import annotations

import re

from stages.asr.types import AsrWord

_NON_WORD = re.compile(r"[^\w']+")
_MAX_OVERLAP_NGRAM = 5
_SENTENCE_END = (".", "?", "!")


def norm_word(word: str) -> str:
    return _NON_WORD.sub("", word.lower())


def join_words(words: list[AsrWord]) -> str:
    return "".join(w.word for w in words).strip()


def ends_sentence(word: AsrWord) -> bool:
    return word.word.rstrip().endswith(_SENTENCE_END)


def strip_committed(in_window: list[AsrWord], hyp: list[AsrWord],
                    committed_end: float | None) -> list[AsrWord]:
    """Remove from ``hyp`` the words that re-transcribe committed audio."""
    if not hyp:
        return hyp
    if in_window:
        i = j = 0
        while i < len(in_window) and j < len(hyp):
            if norm_word(in_window[i].word) != norm_word(hyp[j].word):
                break
            i += 1
            j += 1
        if i == len(in_window):
            return hyp[j:]
    if in_window and committed_end is not None:
        k = 0
        while k < len(hyp) and (hyp[k].start + hyp[k].end) / 2 < committed_end:
            k += 1
        hyp = hyp[k:]
    return hyp


def strip_overlap(committed: list[AsrWord], hyp: list[AsrWord]) -> list[AsrWord]:
    """Drop leading hypothesis words that repeat the tail of the committed words."""
    if not committed or not hyp:
        return hyp
    if hyp[0].start > committed[-1].end + 1.0:
        return hyp
    for n in range(min(_MAX_OVERLAP_NGRAM, len(committed), len(hyp)), 0, -1):
        tail = [norm_word(w.word) for w in committed[-n:]]
        head = [norm_word(w.word) for w in hyp[:n]]
        if tail == head:
            return hyp[n:]
    return hyp


def common_prefix_len(a: list[AsrWord], b: list[AsrWord]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if norm_word(x.word) != norm_word(y.word) or not norm_word(y.word):
            break
        n += 1
    return n


class LocalAgreement:
    """Commits the prefix on which the two latest hypotheses agree (LocalAgreement-2)."""

    def __init__(self) -> None:
        self.committed: list[AsrWord] = []
        self.tentative: list[AsrWord] = []  # latest hypothesis, minus what is committed
        self.window_from = 0  # index of the first committed word still inside the window

    def _new_part(self, hyp: list[AsrWord]) -> list[AsrWord]:
        end = self.committed[-1].end if self.committed else None
        hyp = strip_committed(self.committed[self.window_from:], hyp, end)
        return strip_overlap(self.committed, hyp)

    def update(self, hyp: list[AsrWord]) -> list[AsrWord]:
        """Feed a hypothesis of the whole window; return the newly committed words."""
        hyp = self._new_part(hyp)
        n = common_prefix_len(self.tentative, hyp)
        new = hyp[:n]
        self.committed.extend(new)
        self.tentative = hyp[n:]
        return new

    def commit_until(self, t: float) -> list[AsrWord]:
        """Force-commit tentative words that end before ``t`` (window too long)."""
        n = 0
        while n < len(self.tentative) and self.tentative[n].end <= t:
            n += 1
        new = self.tentative[:n]
        self.committed.extend(new)
        self.tentative = self.tentative[n:]
        return new

    def commit_all(self, hyp: list[AsrWord] | None = None) -> list[AsrWord]:
        """End of stream: everything in ``hyp`` (or the latest hypothesis) becomes final."""
        words = self.tentative if hyp is None else self._new_part(hyp)
        self.committed.extend(words)
        self.tentative = []
        return words

    @property
    def stable_text(self) -> str:
        return join_words(self.committed)

    @property
    def unstable_text(self) -> str:
        return join_words(self.tentative)

    def prompt_text(self) -> str:
        """Committed text before the window: context for the next decode."""
        return join_words(self.committed[: self.window_from])
