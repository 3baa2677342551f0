"""Cross-stream batched decoding (``batch_decodes=true``), meant for GPUs.

Every stream's window becomes a [80, 3000] log-mel block (Whisper pads to 30 s), so the
windows of different streams stack into one batch without any extra padding cost:

1. ``decode()`` (called by a stream's decode loop, at most one pending per stream) appends
   the request to a list and wakes the batch task.
2. The batch task takes up to ``max_batch`` pending requests and runs one blocking job on the
   decode pool: feature extraction per window, ONE ``model.model.encode`` of the stacked
   features, ONE ``model.model.generate`` with one prompt per stream (its committed text as
   previous-text context, then the no-timestamps SOT sequence), then ONE batched
   ``model.model.align`` (cross-attention DTW) for word timestamps.
3. Each request's future gets its own words back; requests that arrived meanwhile form the
   next batch — so under load the batch size grows by itself, and with one stream it
   degenerates to a plain decode.

Measured on the 2-core CPU box (tiny.en int8, 4 windows of 3 s, ``batch4_ms`` vs
``sequential4_ms`` in ``benchmarks/stages/asr.py``): 1.65-1.90 s batched vs 1.85-1.93 s
one by one, i.e. 0-15 %, within the shared box's noise: the CPU encoder is compute-bound.
It is therefore off by default and meant for CUDA, where one batched encode costs about
as much as a single one. (Not measured on a GPU here.)
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens

from stages.asr.types import AsrWord
from stages.common.audio import Float32Array
from stages.common.metrics import ASR_DECODE_SECONDS

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

    from stages.asr.settings import AsrSettings

_Request = tuple[Float32Array, str | None, str | None, "asyncio.Future[list[AsrWord]]"]


def decode_batch(model: WhisperModel, items: list[tuple[Float32Array, str | None]],
                 language: str | None, beam_size: int) -> list[list[AsrWord]]:
    """Decode several windows (<= 30 s each) in one encode + generate + align call."""
    if not items:
        return []
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe",
                          language=language or "en")
    feats = []
    frames: list[int] = []
    for audio, _ in items:
        f = model.feature_extractor(audio)
        frames.append(min(3000, max(1, audio.size // model.feature_extractor.hop_length)))
        feats.append(pad_or_trim(f))
    stacked = np.ascontiguousarray(np.stack(feats).astype(np.float32))
    encoder_output = model.encode(stacked)
    prompts = []
    for _, prompt in items:
        previous = tokenizer.encode(" " + prompt.strip()) if prompt else []
        prompts.append(model.get_prompt(tokenizer, previous, without_timestamps=True))
    results = model.model.generate(
        encoder_output, prompts, beam_size=beam_size, max_length=model.max_length,
        suppress_blank=True, suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
    )
    text_tokens = [[t for t in r.sequences_ids[0] if t < tokenizer.eot] for r in results]
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


class DecodeBatcher:
    """Gathers concurrent decode requests of different streams into batches."""

    def __init__(self, model: WhisperModel, pool: ThreadPoolExecutor,
                 settings: AsrSettings) -> None:
        self._model = model
        self._pool = pool
        self._max_batch = max(1, settings.max_batch)
        self._beam_size = settings.beam_size
        self._pending: list[_Request] = []
        self._task: asyncio.Task[None] | None = None

    async def decode(self, audio: Float32Array, prompt: str | None, language: str | None,
                     kind: str) -> list[AsrWord]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[AsrWord]] = loop.create_future()
        self._pending.append((audio, prompt, language, fut))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            # One language per batch (the prompt's language token is shared).
            lang = self._pending[0][2]
            batch = [r for r in self._pending if r[2] == lang][: self._max_batch]
            for r in batch:
                self._pending.remove(r)
            try:
                with ASR_DECODE_SECONDS.labels("batch").time():
                    results = await loop.run_in_executor(
                        self._pool, decode_batch, self._model,
                        [(r[0], r[1]) for r in batch], lang, self._beam_size)
            except Exception as exc:
                for r in batch:
                    if not r[3].done():
                        r[3].set_exception(exc)
                continue
            for r, words in zip(batch, results, strict=True):
                if not r[3].done():
                    r[3].set_result(words)
