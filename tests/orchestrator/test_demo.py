"""The README's main command: ``cascade demo`` against three real stage processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from stages.common.audio import REALTIME_RATE, read_wav
from tests.support.speech import near_word_errors


def test_demo_round_trip_writes_spoken_reply(tmp_path: Path) -> None:
    out = tmp_path / "reply.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "demo", "--out", str(out),
         "--question", "Please turn on the lights in the kitchen."],
        capture_output=True, text=True, timeout=300,
        # Deterministic piper (no sampling noise) in the stage processes the demo starts.
        env={**os.environ, "CASCADE_TTS_NOISE_SCALE": "0", "CASCADE_TTS_NOISE_W_SCALE": "0"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("result: ", 1)[1].splitlines()[0])
    # Real streaming ASR under load may flip one word ("light" for "lights"); the round
    # trip is what is tested, so at most one word may differ.
    assert near_word_errors("Please turn on the lights in the kitchen.",
                            result["transcript"]) <= 1, result["transcript"]
    assert result["reply"]
    assert "partial:" in proc.stdout  # partial transcripts streamed while audio arrived
    samples, rate = read_wav(out.read_bytes())
    assert rate == REALTIME_RATE
    assert samples.size > REALTIME_RATE // 2  # at least half a second of reply
    assert abs(samples.astype("float32")).mean() > 100  # not silence
