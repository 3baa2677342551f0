"""Semantic end-of-turn benchmark: Smart Turn v3.2's cost per decision and its accuracy.

    python -m benchmarks.stages.turn

Cost: one decision (``SmartTurn.probability``: log-mel features + the ONNX encoder over the
fixed 8 s window) timed over ``CALLS`` calls at 1 and at 2 intra-op threads, as wall time
and as process CPU time (what the decision takes from the machine's thread budget).
The audio's content and length do not change the work: the window is always 8 s.

Accuracy: built-in utterances spoken by piper (deterministic joe voice), each followed by
200 ms of silence, the way a server feeds the turn when the VAD sees a short pause:

- complete: ``COMPLETE`` (questions, commands, statements) plus the whole sentences that
  ``INCOMPLETE`` cuts;
- incomplete, two renderings of the same fragment ("I want to", "Could you tell me about
  the", ... cut after a conjunction, preposition, article or infinitive "to"):
  - ``spoken``: piper speaks the fragment text alone. Piper reads it as a finished
    utterance (falling pitch at the end), so it is the hard case for a model that listens
    to intonation;
  - ``cut``: the whole sentence's audio cut at the end of the fragment's last word (piper's
    word timings) - mid-sentence prosody, closer to a speaker who pauses mid-clause.

For thresholds 0.3/0.5/0.7 it reports how many complete turns are judged complete (the
early endpoints that semantic VAD wins) and how many incomplete ones are wrongly judged
complete (turns cut off early).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading
import time

import numpy as np

from benchmarks.speech import piper_speech
from stages.common.audio import Int16Array
from stages.tts.engine import PiperTts
from stages.tts.settings import TtsSettings
from stages.vad.smart_turn import SAMPLE_RATE, SmartTurn

COMPLETE = (
    "What is the weather like in Paris today?",
    "Can you book a table for two at eight?",
    "How long does it take to drive to Boston?",
    "Turn off the lights in the living room.",
    "Set a timer for ten minutes.",
    "Please send the report to my manager.",
    "I just got back from a trip to Spain.",
    "My favorite color is blue.",
    "The meeting has been moved to Thursday.",
    "Thanks, that is all I needed.",
)
# (whole sentence, words kept): the fragment is its first N words.
INCOMPLETE = (
    ("I want to book a flight to Chicago.", 3),
    ("Could you tell me about the history of Rome?", 6),
    ("What is the weather like in London this weekend?", 6),
    ("I need a taxi to the airport and a hotel near the beach.", 8),
    ("Can you remind me to call my mother because it is her birthday?", 9),
    ("Send a message to Sarah saying that I will be late.", 4),
    ("My daughter wants a new bike for her birthday.", 4),
    ("Play some music by the Beatles.", 4),
    ("I was wondering if you could help me with my homework.", 4),
    ("Tell me the difference between a crocodile and an alligator.", 5),
)
THRESHOLDS = (0.3, 0.5, 0.7)
PAUSE_S = 0.2
CALLS = 50


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _with_pause(audio: Int16Array) -> Int16Array:
    return np.concatenate([audio, np.zeros(int(PAUSE_S * SAMPLE_RATE), dtype=np.int16)])


def cost(threads: int, audio: Int16Array, calls: int = CALLS) -> dict[str, float]:
    """Wall and CPU ms per decision at ``threads`` intra-op threads (after a warm-up)."""
    model = SmartTurn(threads=threads)
    try:
        model.warmup()
        wall: list[float] = []
        cpu: list[float] = []
        feats: list[float] = []
        for _ in range(calls):
            c0, t0 = time.process_time(), time.perf_counter()
            model.probability(audio)
            wall.append((time.perf_counter() - t0) * 1000.0)
            cpu.append((time.process_time() - c0) * 1000.0)
            t0 = time.perf_counter()
            model.features(audio)
            feats.append((time.perf_counter() - t0) * 1000.0)
    finally:
        model.close()
    return {
        "wall_ms_p50": round(statistics.median(wall), 1),
        "wall_ms_p90": round(_pct(wall, 0.9), 1),
        "cpu_ms_p50": round(statistics.median(cpu), 1),
        "features_ms_p50": round(statistics.median(feats), 1),
    }


def utterances() -> tuple[dict[str, Int16Array], dict[str, Int16Array], dict[str, Int16Array]]:
    """(complete, incomplete spoken, incomplete cut): text -> 16 kHz pcm16, pause included."""
    complete = {t: _with_pause(piper_speech(t, SAMPLE_RATE)) for t in COMPLETE}
    spoken: dict[str, Int16Array] = {}
    cut: dict[str, Int16Array] = {}
    # Word timings come from the TTS stage's aligned renderer; noise off = same audio as
    # piper_speech, every run.
    tts = PiperTts(TtsSettings(noise_scale=0.0, noise_w_scale=0.0, synth_workers=1))
    try:
        scale = tts.voice.config.length_scale
        for sentence, keep in INCOMPLETE:
            audio, words = tts.render(sentence, SAMPLE_RATE, scale, threading.Event())
            if not words or len(words) <= keep:
                raise RuntimeError(f"no word timings for {sentence!r}")
            fragment = " ".join(w.text for w in words[:keep])
            complete[sentence] = _with_pause(audio)
            spoken[fragment] = _with_pause(piper_speech(fragment, SAMPLE_RATE))
            cut[fragment] = _with_pause(audio[: int(words[keep - 1].end_ms * SAMPLE_RATE / 1000)])
    finally:
        asyncio.run(tts.aclose())
    return complete, spoken, cut


def accuracy() -> tuple[dict[str, float], list[tuple[str, str, float]]]:
    """Counts per threshold, and every (kind, text, probability) for the table."""
    complete, spoken, cut = utterances()
    model = SmartTurn()
    rows: list[tuple[str, str, float]] = []
    try:
        model.warmup()
        for kind, clips in (("complete", complete), ("spoken", spoken), ("cut", cut)):
            rows += [(kind, text, model.probability(audio)) for text, audio in clips.items()]
    finally:
        model.close()
    out: dict[str, float] = {
        "turn_complete_n": len(complete), "turn_incomplete_n": len(spoken)}
    for thr in THRESHOLDS:
        tag = f"t{round(thr * 100)}"
        for kind, key in (("complete", "complete_judged_complete"),
                          ("spoken", "incomplete_spoken_judged_complete"),
                          ("cut", "incomplete_cut_judged_complete")):
            out[f"turn_{key}_{tag}"] = sum(1 for k, _, p in rows if k == kind and p >= thr)
    return out, rows


def bench(repeats: int = 3) -> dict[str, float]:
    """``repeats`` is bench-stages' knob; cost uses ``CALLS`` decisions per thread count
    (times ``repeats`` / 3), accuracy is deterministic and runs once."""
    load = os.getloadavg()[0]
    probe = _with_pause(piper_speech(COMPLETE[2], SAMPLE_RATE))
    calls = max(10, CALLS * max(1, repeats) // 3)
    costs = {t: cost(t, probe, calls) for t in (1, 2)}
    counts, rows = accuracy()
    _print_table(costs, counts, rows, calls, load)
    result: dict[str, float] = {"turn_load_avg_1m_at_start": round(load, 2)}
    for t, c in costs.items():
        result.update({f"turn_decision_{k}_{t}t": v for k, v in c.items()})
    result.update(counts)
    return result


def _print_table(costs: dict[int, dict[str, float]], counts: dict[str, float],
                 rows: list[tuple[str, str, float]], calls: int, load: float) -> None:
    print(f"Smart Turn v3.2 cost per decision ({calls} calls, load avg {load:.2f}):")
    print(f"  {'threads':>7}  {'wall p50':>9}  {'wall p90':>9}  {'cpu p50':>8}  {'features':>8}")
    for t, c in costs.items():
        print(f"  {t:>7}  {c['wall_ms_p50']:>7.1f}ms  {c['wall_ms_p90']:>7.1f}ms  "
              f"{c['cpu_ms_p50']:>6.1f}ms  {c['features_ms_p50']:>6.1f}ms")
    print("P(complete) per utterance (+ 200 ms pause):")
    for kind, text, p in rows:
        print(f"  {kind:>8}  {p:5.3f}  {text}")
    n_c, n_i = int(counts["turn_complete_n"]), int(counts["turn_incomplete_n"])
    print("Judged complete (p >= threshold):")
    print(f"  {'threshold':>9}  {'complete':>9}  {'incomplete spoken':>17}  "
          f"{'incomplete cut':>14}")
    for thr in THRESHOLDS:
        tag = f"t{round(thr * 100)}"
        n_ok = int(counts[f"turn_complete_judged_complete_{tag}"])
        s = int(counts[f"turn_incomplete_spoken_judged_complete_{tag}"])
        k = int(counts[f"turn_incomplete_cut_judged_complete_{tag}"])
        print(f"  {thr:>9.1f}  {n_ok:>4}/{n_c:<4}  {s:>12}/{n_i:<4}  {k:>9}/{n_i:<4}")


if __name__ == "__main__":
    print(json.dumps(bench(3), indent=2))
