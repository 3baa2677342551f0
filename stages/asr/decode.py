"""Whisper decoding with an encoder context sized to the window ("short-context" decoding).

Why
---
Whisper was trained on 30 s inputs, and faster-whisper's ``transcribe`` pads every window
to 30 s of log-mel frames. The encoder's cost grows faster than linearly with that length
(self-attention): on the 2-core CPU box, tiny.en int8 encodes 5 s in ~26 ms, 10 s in
~60 ms, 20 s in ~180 ms and 30 s in ~490 ms, while the decoder's few tokens cost tens of
ms. A streaming window is usually 1-5 s long, so nearly the whole decode (~0.5-0.6 s) was
spent encoding silence. CTranslate2 accepts shorter inputs, so here the window is padded
with digital silence only up to a *context bucket* (``min_context_s``, then 5 s steps up
to 30 s) and decoded with ``encode`` + ``generate`` + ``align`` directly.

What a shorter context changes, and what is done about it
---------------------------------------------------------
* With little trailing silence the decoder does not always see where the audio ends and
  starts the utterance over ("Set a timer for ten minutes. Set a timer ..."). Two guards:
  generation is capped at ``TOKENS_PER_S`` tokens per second of audio, and a restart of
  the window's text (an exact repeat of its beginning, or a sentence that begins with the
  window's first words) is cut off before word alignment (:func:`cut_restart`).
* At least one second of silence follows the speech in every bucket, so the decoder hears
  an end. Measured on 45 piper windows (15 sentences, whole and cut at 40 % / 70 %):
  10 s buckets agree word for word with the 30 s decode on 31 of 45 windows and are as
  often exactly right on the complete sentences (9/15 both); most disagreements are on
  cut windows, where the short context tends to complete the last word instead of
  guessing a fragment. ``min_context_s = 30`` restores faster-whisper's behaviour.

The same function decodes one window or a batch of windows of different streams (one
encode, one generate, one align; ``batching.py``): a batch is padded to its longest
window's bucket.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import numpy as np
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens

from stages.asr.types import AsrWord
from stages.common.audio import ASR_RATE, Float32Array

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

FULL_CONTEXT_S = 30.0  # what Whisper was trained on: the longest window it can hear
BUCKET_S = 5.0
MIN_TRAILING_SILENCE_S = 1.0
TOKENS_PER_S = 12  # generous: fast speech is ~5 words (~7 tokens) per second
MIN_TOKENS = 16
_WORD = re.compile(r"[a-z0-9']+")
_SENTENCE_END = (".", "?", "!", ",", ";", ":")


def context_seconds(samples: int, min_context_s: float) -> float:
    """Encoder input length for a window of ``samples``: at least ``min_context_s`` and
    ``MIN_TRAILING_SILENCE_S`` more than the audio, in ``BUCKET_S`` steps, at most 30 s."""
    need = samples / ASR_RATE + MIN_TRAILING_SILENCE_S
    if need >= FULL_CONTEXT_S or min_context_s >= FULL_CONTEXT_S:
        return FULL_CONTEXT_S
    return max(min_context_s, min(FULL_CONTEXT_S, BUCKET_S * math.ceil(need / BUCKET_S)))


def cut_restart(words: list[str]) -> int:
    """How many of ``words`` to keep when the decoder started the window over.

    A restart is a suffix that repeats the beginning exactly ("yes yes yes", "A. A. A"),
    or, after a sentence or clause end, begins with the same first words as the window
    ("Play some music please. Place some music please."). Returns ``len(words)`` when
    there is none.
    """
    norm = [" ".join(_WORD.findall(w.lower())) for w in words]
    n = len(norm)
    for k in range(1, n):
        if norm[k:] == norm[: n - k]:
            return k
        m = min(3, n - k)
        if m >= 2 and words[k - 1].rstrip().endswith(_SENTENCE_END) and norm[k:k + m] == norm[:m]:
            return k
    return n


def decode_windows(model: WhisperModel, items: list[tuple[Float32Array, str | None]],
                   language: str | None, beam_size: int,
                   min_context_s: float = 10.0) -> list[list[AsrWord]]:
    """Decode windows (16 kHz float32, <= 30 s each) with their prompts (previous text) in
    one encode + generate + align. Word times are seconds from each window's start."""
    if not items:
        return []
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe",
                          language=language or "en")
    longest = max(audio.size for audio, _ in items)
    context_s = context_seconds(longest, min_context_s)
    padded = int(context_s * ASR_RATE)
    hop = model.feature_extractor.hop_length
    feats = []
    frames: list[int] = []
    for audio, _ in items:
        buf = np.zeros(padded, dtype=np.float32)
        n = min(audio.size, padded)
        buf[:n] = audio[:n]
        # Features of the padded audio (not zero features): the padding must look like
        # the silence Whisper was trained on, exactly as transcribe() pads to 30 s.
        f = model.feature_extractor(buf, padding=0)
        width = min(f.shape[1], padded // hop)
        feats.append(f[:, :width - width % 2])
        frames.append(max(1, n // hop))
    width = min(f.shape[1] for f in feats)
    stacked = np.ascontiguousarray(np.stack([f[:, :width] for f in feats]).astype(np.float32))
    encoder_output = model.encode(stacked)
    prompts = []
    for _, prompt in items:
        previous = tokenizer.encode(" " + prompt.strip()) if prompt else []
        prompts.append(model.get_prompt(tokenizer, previous, without_timestamps=True))
    max_tokens = min(model.max_length, MIN_TOKENS + math.ceil(TOKENS_PER_S * longest / ASR_RATE))
    if context_s >= FULL_CONTEXT_S:
        max_tokens = model.max_length
    options: dict[str, Any] = {
        "beam_size": beam_size, "max_length": max_tokens, "suppress_blank": True,
        "suppress_tokens": get_suppressed_tokens(tokenizer, [-1])}
    # CTranslate2 needs the start-of-transcript token at one position across a batch, i.e.
    # prompts of one length: windows with other prompt lengths are generated separately
    # (their features re-encoded; only in batches mixing prompt lengths).
    sequences: list[list[int]] = [[] for _ in items]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for group in by_length.values():
        source = encoder_output if len(group) == len(items) else model.encode(stacked[group])
        results = model.model.generate(source, [prompts[i] for i in group], **options)
        for i, r in zip(group, results, strict=True):
            sequences[i] = r.sequences_ids[0]
    text_tokens = [_without_restart(tokenizer, [t for t in seq if t < tokenizer.eot])
                   for seq in sequences]
    out: list[list[AsrWord]] = [[] for _ in items]
    todo = [i for i, toks in enumerate(text_tokens) if toks]
    if not todo:
        return out
    aligned: Any = model.model.align(
        model.encode(stacked[todo]) if len(todo) < len(items) else encoder_output,
        tokenizer.sot_sequence, [text_tokens[i] for i in todo], [frames[i] for i in todo],
        median_filter_width=7,
    )
    for i, result in zip(todo, aligned, strict=True):
        out[i] = _words_from_alignment(tokenizer, text_tokens[i], result, model)
    return out


def _without_restart(tokenizer: Tokenizer, tokens: list[int]) -> list[int]:
    if not tokens:
        return tokens
    words, word_tokens = tokenizer.split_to_word_tokens([*tokens, tokenizer.eot])
    words, word_tokens = words[:-1], word_tokens[:-1]  # the end-of-text "word"
    keep = cut_restart(words)
    if keep == len(words):
        return tokens
    return [t for toks in word_tokens[:keep] for t in toks]


def _words_from_alignment(tokenizer: Tokenizer, tokens: list[int], result: Any,
                          model: WhisperModel) -> list[AsrWord]:
    words, word_tokens = tokenizer.split_to_word_tokens([*tokens, tokenizer.eot])
    if len(word_tokens) <= 1:
        return []
    text_idx = np.array([p[0] for p in result.alignments])
    time_idx = np.array([p[1] for p in result.alignments])
    bounds = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
    jump_times = time_idx[jumps] / model.tokens_per_second
    probs = result.text_token_probs
    out: list[AsrWord] = []
    for k, word in enumerate(words[:-1]):
        if not word.strip():
            continue
        a, b = int(bounds[k]), int(bounds[k + 1])
        if out and not any(ch.isalnum() for ch in word):
            # Punctuation token: attach to the previous word, as faster-whisper does.
            out[-1] = out[-1].model_copy(update={"word": out[-1].word + word.strip()})
            continue
        out.append(AsrWord(word=word, start=float(jump_times[a]), end=float(jump_times[b]),
                           probability=float(np.mean(probs[a:b])) if b > a else 0.0))
    return out
