"""Word timings from piper's per-phoneme sample alignments.

Piper tells how many audio samples each phoneme of a sentence produced, but espeak's
phoneme stream does not map one-to-one onto the text's words: it merges function words
("of the" -> "ʌvðə"), expands numbers and abbreviations ("3.14", "Dr."), and drops
punctuation. So instead of counting space phonemes we align two phoneme strings:

- reference: every text word phonemized on its own (cached), tagged with its word index;
- context: the phonemes piper actually spoke, each with its sample span.

Stress marks, spaces and punctuation are removed from both, then difflib matches them.
A word spans from its first to its last matched context phoneme; a word with no match
(e.g. "a", which alone reads as the letter name) gets the gap between its neighbours.
When too little of either string matches, the result is None: no timings rather than
wrong ones.
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stages.tts.types import TtsWord

_SKIP = frozenset(" ˈˌ.,!?;:…—–-\"'()[]{}^$_\n\t")  # noqa: RUF001 - en dash on purpose
# Share of the per-word reference that must match, and of the spoken phonemes (lower:
# expansions such as "e.g." -> "for example" leave spoken phonemes unmatched).
_MIN_REF_MATCH = 0.5
_MIN_CTX_MATCH = 0.4


@dataclass(frozen=True)
class PhonemeSpan:
    """One spoken phoneme and its [start, end) sample span within the phrase audio."""

    phoneme: str
    start: int
    end: int


def _clean(phonemes: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", phonemes) if c not in _SKIP)


def text_words(text: str) -> list[tuple[int, str]]:
    """Speakable words of ``text``: whitespace tokens holding a letter or digit."""
    out: list[tuple[int, str]] = []
    pos = 0
    for token in text.split():
        pos = text.index(token, pos)
        if any(c.isalnum() for c in token):
            out.append((pos, token))
        pos += len(token)
    return out


def word_timings(text: str, spans: Sequence[PhonemeSpan], sample_rate: int,
                 phonemize_word: Callable[[str], str]) -> list[TtsWord] | None:
    """Map spoken phonemes back to the words of ``text``; None when not reliable."""
    words = [w for _pos, w in text_words(text)]
    if not words:
        return []
    ctx_chars: list[str] = []
    ctx_span: list[tuple[int, int]] = []
    for span in spans:
        for c in _clean(span.phoneme):
            ctx_chars.append(c)
            ctx_span.append((span.start, span.end))
    ref_chars: list[str] = []
    ref_word: list[int] = []
    for i, word in enumerate(words):
        for c in _clean(phonemize_word(word)):
            ref_chars.append(c)
            ref_word.append(i)
    if not ctx_chars or not ref_chars:
        return None
    matcher = difflib.SequenceMatcher(None, ref_chars, ctx_chars, autojunk=False)
    first: list[int | None] = [None] * len(words)
    last: list[int | None] = [None] * len(words)
    matched = 0
    for a, b, size in matcher.get_matching_blocks():
        for k in range(size):
            w = ref_word[a + k]
            if first[w] is None:
                first[w] = b + k
            last[w] = b + k
        matched += size
    if matched < _MIN_REF_MATCH * len(ref_chars) or matched < _MIN_CTX_MATCH * len(ctx_chars):
        return None
    starts: list[int | None] = [ctx_span[f][0] if f is not None else None for f in first]
    ends: list[int | None] = [ctx_span[f][1] if f is not None else None for f in last]
    # Unmatched words take the gap between their neighbours' spans.
    audio_start = spans[0].start if spans else 0
    audio_end = spans[-1].end if spans else 0
    for i in range(len(words)):
        if starts[i] is None:
            prev_end = next((e for e in reversed(ends[:i]) if e is not None), audio_start)
            next_start = next((s for s in starts[i + 1:] if s is not None), audio_end)
            starts[i], ends[i] = prev_end, max(prev_end, next_start)
    out: list[TtsWord] = []
    scale = 1000.0 / sample_rate
    prev = 0
    for word, s, e in zip(words, starts, ends, strict=True):
        assert s is not None and e is not None
        s = max(s, prev)
        e = max(e, s)
        out.append(TtsWord(text=word, start_ms=s * scale, end_ms=e * scale))
        prev = e
    return out
