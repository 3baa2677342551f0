"""The README's main command: ``cascade demo`` against three real stage processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from stages.common.audio import REALTIME_RATE, read_wav
from stages.common.text import normalize


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
    assert normalize(result["transcript"]) == normalize("Please turn on the lights in the kitchen.")
    assert result["reply"]
    assert "partial:" in proc.stdout  # partial transcripts streamed while audio arrived
    samples, rate = read_wav(out.read_bytes())
    assert rate == REALTIME_RATE
    assert samples.size > REALTIME_RATE // 2  # at least half a second of reply
    assert abs(samples.astype("float32")).mean() > 100  # not silence
