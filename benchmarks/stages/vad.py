"""VAD benchmark: per-frame cost of the Silero ONNX model through ``VadStream``.

    python -m benchmarks.stages.vad
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np

from stages.vad import SileroVadModel, VadStream


def bench(repeats: int) -> dict[str, float]:
    model = SileroVadModel()
    rng = np.random.default_rng(0)
    # 10 s of noise-like audio: the model's cost does not depend on the content.
    audio = (rng.standard_normal(160_000) * 0.05).astype(np.float32)
    per_frame_us: list[float] = []
    for _ in range(max(1, repeats)):
        stream = VadStream(model)
        stream.process(audio[:16_000])  # warm-up
        for pos in range(16_000, len(audio), 512):
            t0 = time.perf_counter()
            stream.process(audio[pos : pos + 512])
            per_frame_us.append((time.perf_counter() - t0) * 1e6)
    per_frame_us.sort()
    return {
        "vad_frame_us": round(statistics.median(per_frame_us), 1),
        "vad_frame_us_p90": round(per_frame_us[int(0.9 * (len(per_frame_us) - 1))], 1),
        "vad_realtime_factor": round(statistics.mean(per_frame_us) / 32_000.0, 5),
    }


if __name__ == "__main__":
    print(json.dumps(bench(3), indent=2))
