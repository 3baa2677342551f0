"""TLS and keys end to end, with real processes on loopback.

Three ``cascade stage`` processes (ASR, LLM, TTS), each serving HTTPS/WSS directly
(``--ssl-certfile/--ssl-keyfile``, a certificate from a CA made for the test) and
requiring ``CASCADE_STAGE_API_KEY``; one ``cascade serve`` over TLS too, with an API key,
reaching the stages at ``https://`` URLs with the same stage key and trusting the CA
(``CASCADE_STAGE_CA_FILE``). The LLM is given as two URLs naming the same service, so the
orchestrator polls its ``/load`` (a stage with one replica is not polled).

- a Realtime client over ``wss://`` (trusting the CA) has a spoken turn answered: ASR,
  LLM and TTS all reached over TLS with the key;
- the orchestrator's replica polls got the LLM's load (they sent the key over TLS);
- plain ``ws://`` to the TLS port, and ``wss://`` without trusting the CA, fail;
- each stage refuses a request or stream without the key, or with a wrong one (401 and
  a JSON reason), while its probes stay open;
- no process logged a key.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage, InvalidStatus

from orchestrator.launcher import CascadeProcess, StageProcess
from tests.support.realtime_client import RATE, Client, answered_turn
from tests.support.speech import piper_clip
from tests.support.tls import TlsFiles, make_certs

pytestmark = pytest.mark.slow
ON_CLIENT_LOOP = pytest.mark.asyncio(loop_scope="module")  # the Realtime client's loop

API_KEY = "tls-test-client-key"
STAGE_KEY = "tls-test-stage-key"
QUESTION = "What is the capital of France?"


@dataclass
class Deployment:
    tls: TlsFiles
    stages: dict[str, CascadeProcess]
    serve: CascadeProcess

    def https(self, proc: CascadeProcess) -> str:
        return f"https://127.0.0.1:{proc.port}"

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail(25)}"
                         for p in (self.serve, *self.stages.values()))


def wait_ready(proc: CascadeProcess, tls: TlsFiles, timeout_s: float = 180.0) -> None:
    """``/readyz`` over HTTPS answers 200 (the launcher's own wait speaks plain HTTP)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(verify=tls.client_context(), timeout=2.0) as http:
        while True:
            if proc.proc.poll() is not None:
                raise RuntimeError(f"{proc.name} exited early:\n{proc.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if http.get(f"https://127.0.0.1:{proc.port}/readyz").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} not ready:\n{proc.log_tail()}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tls = make_certs(Path(tmp_path_factory.mktemp("tls")))
    serving_tls = ("--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key))
    procs: list[CascadeProcess] = []
    try:
        with pytest.MonkeyPatch.context() as env:  # a child copies os.environ at its start
            env.setenv("CASCADE_STAGE_API_KEY", STAGE_KEY)
            stages: dict[str, CascadeProcess] = {
                name: StageProcess(name, *serving_tls) for name in ("asr", "llm", "tts")}
            procs += stages.values()
            for proc in stages.values():
                wait_ready(proc, tls)
            env.setenv("CASCADE_STAGE_CA_FILE", str(tls.ca))
            llm = stages["llm"].port
            serve = CascadeProcess(
                "serve", ["serve"], "--api-key", API_KEY, *serving_tls,
                "--asr-url", f"https://127.0.0.1:{stages['asr'].port}",
                "--llm-url", f"https://127.0.0.1:{llm},https://localhost:{llm}",
                "--tts-url", f"https://localhost:{stages['tts'].port}")
            procs.append(serve)
        wait_ready(serve, tls)
        yield Deployment(tls, stages, serve)
    finally:
        for proc in procs:
            proc.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(deployment: Deployment) -> AsyncIterator[Client]:
    piper_clip(QUESTION, RATE)  # synthesized before any clock runs
    url = f"wss://127.0.0.1:{deployment.serve.port}/v1/realtime?model=cascade"
    async with connect(url, ssl=deployment.tls.client_context(), max_size=2**24,
                       additional_headers={"Authorization": f"Bearer {API_KEY}"}) as ws:
        c = Client(ws, deployment.logs)
        await c.until("session.created", limit_s=30)
        await c.configure({"instructions": "Answer in one short sentence.",
                           "max_output_tokens": 30})
        yield c


@ON_CLIENT_LOOP
async def test_a_spoken_turn_over_wss_reaches_every_stage_over_tls_with_the_key(
        client: Client) -> None:
    try:
        await answered_turn(client, QUESTION)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{client.logs()}") from None


@ON_CLIENT_LOOP
async def test_the_orchestrator_polls_keyed_replicas_over_tls(deployment: Deployment) -> None:
    async with httpx.AsyncClient(verify=deployment.tls.client_context()) as http:
        ready = (await http.get(f"{deployment.https(deployment.serve)}/readyz")).json()
    llm = ready["stages"]["llm"]
    assert len(llm) == 2, llm
    for replica in llm:
        assert replica["up"], replica
        # A /load answered 401 would leave no load: the poll sent the key over TLS.
        assert replica["load"] is not None and replica["load"]["stage"] == "llm", replica


@ON_CLIENT_LOOP
async def test_plain_or_untrusted_connections_to_the_tls_server_fail(
        deployment: Deployment) -> None:
    port = deployment.serve.port
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with pytest.raises((InvalidMessage, OSError, EOFError)):
        async with connect(f"ws://127.0.0.1:{port}/v1/realtime?model=cascade",
                           additional_headers=auth, open_timeout=10):
            pass
    with pytest.raises(ssl.SSLCertVerificationError):
        async with connect(f"wss://127.0.0.1:{port}/v1/realtime?model=cascade",
                           additional_headers=auth, open_timeout=10,
                           ssl=ssl.create_default_context()):
            pass
    # Without the client's API key, over a trusted TLS connection: refused (the
    # orchestrator's handshake refusal is a 403, docs/limits.md).
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"wss://127.0.0.1:{port}/v1/realtime?model=cascade",
                           ssl=deployment.tls.client_context(), open_timeout=10):
            pass
    assert refused.value.response.status_code == 403


WORK = {"asr": ("ws", "/v1/stream?sample_rate=16000"),
        "tts": ("ws", "/v1/stream?sample_rate=24000"),
        "llm": ("post", "/v1/chat/completions")}


@ON_CLIENT_LOOP
@pytest.mark.parametrize("stage", sorted(WORK))
async def test_a_stage_refuses_work_without_its_key(deployment: Deployment,
                                                     stage: str) -> None:
    base = deployment.https(deployment.stages[stage])
    kind, path = WORK[stage]
    async with httpx.AsyncClient(verify=deployment.tls.client_context(), timeout=10) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": f"Bearer {API_KEY}"}):  # the client key is not it
            resp = await http.get(f"{base}/load", headers=headers)
            assert resp.status_code == 401, resp.text
            assert resp.json()["error"]["code"] == "invalid_api_key"
            if kind == "post":
                resp = await http.post(f"{base}{path}", headers=headers, json={
                    "model": "x", "messages": [{"role": "user", "content": "hi"}]})
                assert resp.status_code == 401, resp.text
            else:
                with pytest.raises(InvalidStatus) as refused:
                    async with connect("wss" + base[len("https"):] + path, open_timeout=10,
                                       ssl=deployment.tls.client_context(),
                                       additional_headers=headers):
                        pass
                assert refused.value.response.status_code == 401
        keyed = {"Authorization": f"Bearer {STAGE_KEY}"}
        assert (await http.get(f"{base}/load", headers=keyed)).status_code == 200
        for probe in ("/healthz", "/readyz", "/metrics"):
            assert (await http.get(f"{base}{probe}")).status_code == 200, probe
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port
            await http.get(f"http://127.0.0.1:{deployment.stages[stage].port}/healthz")


def test_no_process_logged_a_key(deployment: Deployment) -> None:
    for proc in (deployment.serve, *deployment.stages.values()):
        text = Path(proc._log.name).read_text(errors="replace")
        assert text, proc.name
        assert STAGE_KEY not in text and API_KEY not in text, proc.name
    assert os.environ.get("CASCADE_STAGE_API_KEY") != STAGE_KEY  # the env was restored
