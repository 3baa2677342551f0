"""One real request per image, for deploy/images/smoke.sh (standard library only).

    python3 smoke_requests.py NAME=URL ...     # NAME: asr, tts, llm, orchestrator, all-in-one

Prints one tab-separated line per image (name, ok|FAIL, detail) and exits 1 if any
failed. The TTS answer is the ASR's input: a spoken sentence made by the tts image and
transcribed by the asr image, so both are checked on real audio and nothing has to be
shipped for the test.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

SENTENCE = "The weather in Paris is sunny today."
TIMEOUT_S = 120.0


def post(url: str, body: bytes, content_type: str) -> bytes:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        data: bytes = response.read()
        return data


def post_json(url: str, payload: dict[str, Any]) -> bytes:
    return post(url, json.dumps(payload).encode(), "application/json")


def speech(base: str) -> bytes:
    wav = post_json(f"{base}/v1/audio/speech", {"model": "tts-1", "input": SENTENCE,
                                                "voice": "alloy", "response_format": "wav"})
    if wav[:4] != b"RIFF" or len(wav) < 10_000:
        raise RuntimeError(f"not a spoken WAV: {len(wav)} bytes starting {wav[:4]!r}")
    return wav


def transcribe(base: str, wav: bytes) -> str:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n',
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="s.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n",
    ]
    body = "".join(parts).encode() + wav + f"\r\n--{boundary}--\r\n".encode()
    answer = json.loads(post(f"{base}/v1/audio/transcriptions", body,
                             f"multipart/form-data; boundary={boundary}"))
    text: str = answer["text"]
    # Whisper tiny may mishear a word of synthetic speech ("pairs"); most must be there.
    said = set(SENTENCE.lower().strip(".").split())
    heard = set(text.lower().replace(".", " ").replace(",", " ").split())
    if len(said & heard) < len(said) - 2:
        raise RuntimeError(f"transcript {text!r} is not {SENTENCE!r}")
    return text


def chat(base: str) -> str:
    answer = json.loads(post_json(f"{base}/v1/chat/completions", {
        "model": "smollm2-135m-instruct", "max_tokens": 16,
        "messages": [{"role": "user", "content": "Say hello in three words."}]}))
    text: str = answer["choices"][0]["message"]["content"]
    if not text.strip():
        raise RuntimeError("empty completion")
    return text


def ready(base: str) -> str:
    with urllib.request.urlopen(f"{base}/readyz", timeout=TIMEOUT_S) as response:
        body: bytes = response.read()
        return body.decode()


def main(argv: list[str]) -> int:
    urls = dict(arg.split("=", 1) for arg in argv)
    failed = 0
    wav: bytes | None = None

    def run(name: str, check: Callable[[str], str]) -> None:
        nonlocal failed
        if name not in urls:
            return
        start = time.monotonic()
        try:
            detail = check(urls[name].rstrip("/"))
            status = "ok"
        except (OSError, urllib.error.URLError, RuntimeError, KeyError, ValueError) as exc:
            detail, status = f"{type(exc).__name__}: {exc}", "FAIL"
            failed += 1
        took = time.monotonic() - start
        print(f"{name}\t{status}\t{took:.2f} s: {' '.join(detail.split())[:90]}", flush=True)

    def tts(base: str) -> str:
        nonlocal wav
        wav = speech(base)
        return f"POST /v1/audio/speech -> {len(wav)} byte WAV"

    def asr(base: str) -> str:
        if wav is None:
            raise RuntimeError("no speech to transcribe (the tts request failed)")
        return f"POST /v1/audio/transcriptions -> {transcribe(base, wav)!r}"

    run("tts", tts)
    run("asr", asr)
    run("llm", lambda base: f"POST /v1/chat/completions -> {chat(base)!r}")
    run("orchestrator", lambda base: f"GET /readyz -> {ready(base)}")
    run("all-in-one", lambda base: f"GET /readyz -> {ready(base)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
