"""Incremental phrase cutting for streaming TTS (pure functions, no model).

Text arrives token by token from an LLM. ``find_cut`` looks at the not-yet-spoken buffer
and returns where the next phrase ends, or ``None`` while no cut is certain yet.

Design decisions:
- Cuts only happen in whitespace, and a phrase includes the whitespace that follows it,
  so the concatenation of all phrases is exactly the input text.
- A boundary is *certain* only once the first non-space character after it is visible
  (or the input is final). That character decides abbreviations ("Dr. Smith"), sentence
  ends before lowercase ("approx. five"), and completes the whitespace run. Every
  decision therefore depends only on a prefix of the text, so feeding tokens one by one
  gives exactly the phrases of feeding the whole text at once.
- The FIRST phrase is short so audio starts early: it ends at the first sentence end, at
  the first clause end after ``first_min_words`` words, or after ``first_max_words``
  words even without punctuation. The next ones RAMP UP by the same rule, the word cap
  doubling each time (``ramp`` phrases in all: 4, then 8 words by default): each must be
  synthesized while the one before plays, and a whole sentence after a 4-word opening
  would not be (measured: 100-400 ms gaps ~1.6 s into replies).
- LATER phrases are whole sentences, merged while shorter than ``later_min_chars``, up to
  ``later_max_chars``; a longer sentence is split at its last clause boundary (else its
  last word boundary) that fits.
- Never cut at decimals (no whitespace inside "3.14"), ellipses, known abbreviations,
  initialisms (U.S., e.g.) unless a capital letter follows, or single-letter initials.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORD = re.compile(r"\S+")
_CLOSERS = "\"')]}»\u201d\u2019"
_CLAUSE_END = (",", ";", ":")
_DASHES = ("-", "–", "—")  # noqa: RUF001 - en/em dashes are real clause marks
_INITIALISM = re.compile(r"^(?:[A-Za-z]\.)+[A-Za-z]$")  # "U.S" / "e.g" (final dot stripped)
# Words that end with a period but (almost) never end a sentence.
ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof sr jr st mt vs etc approx dept est fig gen gov lt col capt sgt
    rev hon inc ltd corp co no vol ave blvd jan feb mar apr jun jul aug sep sept oct nov
    dec mon tue wed thu fri sat sun""".split()
)
# Of those, these may still end a sentence when a capital letter follows.
_SOFT_ABBREVIATIONS = frozenset({"etc", "inc", "ltd", "corp", "co"})


@dataclass(frozen=True)
class PhraseBounds:
    """Length bounds of phrases (see module docstring)."""

    first_min_words: int = 3
    first_max_words: int = 4
    later_min_chars: int = 40
    later_max_chars: int = 140
    ramp: int = 2  # phrases cut by the first phrase's rule, the word cap doubling


def _boundary_kind(word: str, next_char: str | None, ws: str) -> str | None:
    """Classify the whitespace after ``word``: "sentence", "clause" or None (plain).

    ``next_char`` is the first non-space character after the whitespace ``ws`` (None at
    the end of the final text).
    """
    if "\n" in ws:
        return "sentence"
    core = word.rstrip(_CLOSERS) or word
    if core in _DASHES or core.endswith(("—", "--")):
        return "clause"
    last = core[-1]
    if last in "!?":
        return "sentence"
    if last == "…":
        return None
    if last == ".":
        if core.endswith(".."):
            return None  # ellipsis: a pause, not a sentence end
        stem = core[:-1].lstrip("\"'([{«\u201c\u2018")
        upper_next = next_char is not None and next_char.isupper()
        if next_char is not None and next_char.islower():
            return None
        key = stem.lower()
        if key in ABBREVIATIONS:
            return "sentence" if key in _SOFT_ABBREVIATIONS and upper_next else None
        if _INITIALISM.match(stem):
            return "sentence" if upper_next or next_char is None else None
        if len(stem) == 1 and stem.isalpha() and stem.isupper():
            return None  # an initial: "J. Smith"
        return "sentence"
    if last in _CLAUSE_END:
        return "clause"
    return None


def _word_ends(text: str, final: bool) -> list[tuple[int, int, str | None]]:
    """Certain word boundaries: (cut position, word count so far, kind).

    The cut position is after the whitespace that follows the word. The last word of a
    final text yields the end of the text as a boundary of kind "sentence".
    """
    out: list[tuple[int, int, str | None]] = []
    words = list(_WORD.finditer(text))
    for i, m in enumerate(words):
        if i + 1 < len(words):
            nxt = words[i + 1]
            ws = text[m.end():nxt.start()]
            out.append((nxt.start(), i + 1, _boundary_kind(m.group(), nxt.group()[0], ws)))
        elif final:
            out.append((len(text), i + 1, "sentence"))
    return out


def find_cut(text: str, *, index: int, final: bool,
             bounds: PhraseBounds = PhraseBounds()) -> int | None:
    """End index (exclusive) of the next phrase in ``text``, or None if not certain yet.

    ``text`` is the unspoken buffer; ``index`` is the phrase's number in the stream (0:
    the first); ``final`` says no more text will come (the end of the text is a boundary).
    A final text that holds only whitespace is returned whole.
    """
    if not text:
        return None
    ends = _word_ends(text, final)
    if final and not ends:
        return len(text)  # whitespace only
    if index < max(1, bounds.ramp):
        max_words = bounds.first_max_words << index
        for pos, count, kind in ends:
            if kind == "sentence":
                return pos
            if kind == "clause" and count >= bounds.first_min_words:
                return pos
            if count >= max_words:
                return pos
        return None
    for pos, _count, kind in ends:
        if pos > bounds.later_max_chars:
            break
        if kind == "sentence" and (pos >= bounds.later_min_chars or pos == len(text)):
            return pos
    if len(text) <= bounds.later_max_chars and not final:
        return None
    fitting = [e for e in ends if e[0] <= bounds.later_max_chars]
    for wanted in ("sentence", "clause"):
        cands = [pos for pos, _c, kind in fitting if kind == wanted]
        if cands:
            return cands[-1]
    if fitting:
        return fitting[-1][0]
    return ends[0][0] if ends else None  # one word longer than the cap: cut after it


def split_phrases(text: str, bounds: PhraseBounds = PhraseBounds()) -> list[str]:
    """One-shot cutting of a whole text (the same result as feeding it incrementally)."""
    cutter = PhraseCutter(bounds)
    return [*cutter.push(text), *cutter.finish()]


class PhraseCutter:
    """Stateful wrapper: push text pieces, get the phrases that became certain."""

    def __init__(self, bounds: PhraseBounds = PhraseBounds()) -> None:
        self.bounds = bounds
        self._buf = ""
        self._index = 0  # phrases handed out so far
        self.offset = 0  # index in the whole input where the buffer starts

    @property
    def pending(self) -> str:
        return self._buf

    def push(self, text: str) -> list[str]:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[str]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[str]:
        out: list[str] = []
        while self._buf:
            cut = find_cut(self._buf, index=self._index, final=final, bounds=self.bounds)
            if cut is None:
                break
            out.append(self._buf[:cut])
            self._buf = self._buf[cut:]
            self.offset += cut
            self._index += 1
        return out

    def take_pending(self) -> str:
        """Hand out the whole buffer as a phrase (only for runaway text with no spaces)."""
        text, self._buf = self._buf, ""
        self.offset += len(text)
        self._index += 1
        return text
