"""Transcript normalization and word error rate (ASR tests and the latency benchmark)."""

from __future__ import annotations

import re

_NUMBERS = {"4": "four", "7": "seven", "1": "one", "2": "two", "3": "three", "5": "five",
            "6": "six", "8": "eight", "9": "nine", "10": "ten"}


def normalize(text: str) -> list[str]:
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    return [_NUMBERS.get(w, w) for w in text.split()]


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = normalize(reference), normalize(hypothesis)
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
            prev, d[j] = d[j], cur
    return d[len(hyp)] / max(1, len(ref))
