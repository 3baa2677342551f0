"""The spoken user turns the benchmark streams: a built-in corpus or the user's WAV files.

The built-in corpus is synthesized with piper's bundled voice (no sampling noise, so it is
the same audio on every machine) on first use and cached as WAV + JSON. Every clip is
24 kHz mono pcm16 with its ground-truth end of speech: the last voiced sample.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.speech import piper_speech
from benchmarks.v2v.records import ClipInfo
from stages.common.audio import Int16Array, float_to_pcm16, read_wav, resample, wav_bytes

RATE = 24_000  # the Realtime API's pcm16 rate
PIPER_PAUSE_MS = 400


@dataclass(frozen=True)
class Prompt:
    name: str
    parts: tuple[str, ...]  # spoken with PIPER_PAUSE_MS of silence between parts


BUILTIN: tuple[Prompt, ...] = (
    Prompt("question", ("What is the capital of France?",)),
    Prompt("command", ("Set a timer for ten minutes.",)),
    Prompt("long", ("I am planning a trip to Portugal next spring with two friends, and we "
                    "would like to see both Lisbon and Porto, so how many days should we "
                    "spend in each city before we fly home?",)),
    Prompt("pause", ("I would like to order a large pizza", "with mushrooms and olives.")),
)


# Spoken over the agent's reply in barge-in turns.
INTERRUPT = Prompt("interrupt", ("Wait, hold on a second.",))


@dataclass(frozen=True)
class Clip:
    info: ClipInfo
    pcm: Int16Array  # 24 kHz mono

    @property
    def speech_end(self) -> int:
        """Index of the sample just after the last voiced one."""
        return round(self.info.speech_end_ms * RATE / 1000)


def voiced_span(pcm: Int16Array, rate: int = RATE) -> tuple[int, int]:
    """[start, end) of the voiced part: the first and last 10 ms windows whose level
    stands clear of the clip's noise floor ((0, 0) for silence).

    Threshold: the loudest of 40 dB under the peak window, 10 dB over the noise floor
    (the 10th-percentile window) and -60 dBFS: robust to a quiet room tone in a
    recording and to piper's soft final decay alike.
    """
    win = max(1, rate // 100)
    n = pcm.size // win
    if n == 0:
        return 0, 0
    frames = pcm[: n * win].astype(np.float32).reshape(n, win)
    rms = np.sqrt(np.mean(frames * frames, axis=1))
    floor = float(np.percentile(rms, 10))
    threshold = max(float(rms.max()) * 0.01, floor * 3.16, 32.768)
    loud = np.flatnonzero(rms > threshold)
    if not loud.size:
        return 0, 0
    return int(loud[0] * win), int((loud[-1] + 1) * win)


def speech_end(pcm: Int16Array, rate: int = RATE) -> int:
    """Ground-truth end of speech: index just after the last voiced 10 ms window."""
    return voiced_span(pcm, rate)[1]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cascade" / "bench-corpus"


def _synthesize(prompt: Prompt) -> tuple[Int16Array, list[float]]:
    pieces: list[Int16Array] = []
    pauses: list[float] = []
    for i, text in enumerate(prompt.parts):
        pcm = piper_speech(text, RATE)
        start, end = voiced_span(pcm)
        # Parts are cut to their voiced span so the planted pause is exactly as long.
        first, last = i == 0, i == len(prompt.parts) - 1
        pcm = pcm[0 if first else start: pcm.size if last else end]
        if not first:
            pauses.append(sum(p.size for p in pieces) * 1000 / RATE)
            pieces.append(np.zeros(RATE * PIPER_PAUSE_MS // 1000, np.int16))
        pieces.append(pcm)
    return np.concatenate(pieces), pauses


def builtin_clip(prompt: Prompt, cache: Path | None = None) -> Clip:
    """``prompt`` spoken by piper, from the cache when it was made before."""
    import piper

    text = " ".join(prompt.parts)
    key = hashlib.sha256(json.dumps([prompt.parts, PIPER_PAUSE_MS, RATE,
                                     getattr(piper, "__version__", "")]).encode())
    stem = (cache or cache_dir()) / f"{prompt.name}-{key.hexdigest()[:12]}"
    wav, meta = stem.with_suffix(".wav"), stem.with_suffix(".json")
    if wav.exists() and meta.exists():
        pcm, rate = read_wav(wav.read_bytes())
        if rate == RATE:
            return Clip(ClipInfo.model_validate_json(meta.read_text()), pcm)
    pcm, pauses = _synthesize(prompt)
    info = ClipInfo(name=prompt.name, text=text, source="builtin",
                    duration_ms=pcm.size * 1000 / RATE,
                    speech_end_ms=speech_end(pcm) * 1000 / RATE, pauses_ms=pauses)
    stem.parent.mkdir(parents=True, exist_ok=True)
    # Written under names of this process, then renamed: several processes (parallel test
    # workers, concurrent benches) may make the same clip at once. The metadata is written
    # last, so a reader that finds both files finds both complete.
    tmp = stem.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(wav_bytes(pcm, RATE))
    os.replace(tmp, wav)
    tmp.write_text(info.model_dump_json(indent=2))
    os.replace(tmp, meta)
    return Clip(info, pcm)


def builtin_corpus(names: list[str] | None = None, cache: Path | None = None) -> list[Clip]:
    known = {p.name: p for p in BUILTIN}
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise ValueError(f"unknown built-in clip(s) {unknown}; choose from {sorted(known)}")
    return [builtin_clip(known[n], cache) for n in (names or list(known))]


def wav_clip(path: Path, text: str | None = None) -> Clip:
    """A user's recording: any rate, first channel, 16-bit PCM WAV."""
    samples, rate = read_wav(path.read_bytes())
    pcm = samples if rate == RATE else float_to_pcm16(resample(samples, rate, RATE))
    end = speech_end(pcm)
    if end == 0:
        raise ValueError(f"{path}: no speech found (the file is silent)")
    info = ClipInfo(name=path.stem, text=text, source=str(path),
                    duration_ms=pcm.size * 1000 / RATE, speech_end_ms=end * 1000 / RATE)
    return Clip(info, pcm)
