"""The distributed shape with replicas, losing one of each kind mid-conversation.

Real processes on loopback: redis-server, two ASR, one LLM and two TTS stage services, and
two ``cascade serve`` orchestrators sharing the Redis store, each given both ASR and both
TTS URLs (``--asr-url A,B``). ONE client conversation (raw WebSocket, piper speech sent
like a microphone) lives through, in order:

a) spoken turns, whose streams spread over both ASR and both TTS replicas;
b) the TTS replica synthesizing the reply is killed (SIGKILL) as its audio starts: the
   reply moves to the other replica and is completed, with no error;
c) the ASR replica holding the user's turn is killed mid-utterance: the turn's stream
   moves to the other replica with its audio, the whole question is transcribed and
   answered, and the next turn is answered by the surviving replica alone;
d) the orchestrator itself is killed: the client resumes the session on the other one
   with its token, every item of the conversation is there, and the next turn is answered;
e) the surviving orchestrator is stopped (SIGTERM, a rolling update) while it speaks a
   reply: the reply finishes, then the session is handed over (``server_draining``, close
   1012), resumes on a third orchestrator with every item, and the process exits 0.

Each step prints its figures (the issue's closing note quotes them).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect

from orchestrator.launcher import CascadeProcess, StageProcess
from tests.support.realtime_client import (
    NOT_TRANSCRIBED,
    RATE,
    SETTLE_S,
    TRANSCRIBED,
    TURN_S,
    Client,
    Stamped,
    answered,
    answered_turn,
    kinds,
    of,
    speaking,
    ws_url,
)
from tests.support.redis_server import redis_server
from tests.support.speech import piper_clip, word_errors

# Short stage deadlines on real models: run alone (.ci/run's serial part), not beside a
# second test worker that would starve the LLM past them.
pytestmark = [pytest.mark.slow, pytest.mark.serial, pytest.mark.asyncio(loop_scope="module")]

KEY = "replica-failover-key"
ASR_FINALIZE_S = 3.0
MARGIN_S = 5.0
DEADLINES = {"CASCADE_ASR_OPEN_TIMEOUT_S": "4", "CASCADE_ASR_FINALIZE_TIMEOUT_S": "3",
             "CASCADE_LLM_FIRST_TOKEN_TIMEOUT_S": "8", "CASCADE_LLM_STALL_TIMEOUT_S": "8",
             "CASCADE_TTS_TIMEOUT_S": "5",
             # long enough for a story to be spoken out before the hand-over (e)
             "CASCADE_DRAIN_TIMEOUT_S": "60"}
SHORT = {"instructions": "You are a voice assistant. Answer in one short sentence.",
         "max_output_tokens": 40}
MEDIUM = {"instructions": "You are a storyteller. Tell a story of at least five sentences.",
          "max_output_tokens": 90}
TEXTS = {
    "capital": "What is the capital of France?",
    "kitchen": "Please turn on the lights in the kitchen.",
    "story": "Tell me a story about a dragon.",
    "train": "What time does the train to Boston leave tomorrow morning?",
    "table": "I would like to book a table for four people at seven.",
    "weather": "How is the weather today?",
}


@dataclass
class Fleet:
    asr: list[StageProcess]
    llm: StageProcess
    tts: list[StageProcess]
    serve: list[CascadeProcess]
    serve_args: list[str]
    items: list[str] = field(default_factory=list)  # every conversation item id, in order
    session: dict[str, Any] = field(default_factory=dict)  # as session.created gave it

    def all(self) -> list[CascadeProcess]:
        return [*self.asr, self.llm, *self.tts, *self.serve]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (pid {p.proc.pid}) ---\n{p.log_tail(20)}"
                         for p in self.all())


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with redis_server() as redis_url:
        stages = [StageProcess("asr"), StageProcess("asr"), StageProcess("llm"),
                  StageProcess("tts"), StageProcess("tts")]
        procs: list[CascadeProcess] = list(stages)
        try:
            for stage in stages:
                stage.wait_ready(180)
            asr, llm, tts = stages[:2], stages[2], stages[3:]
            args = ["--api-key", KEY, "--redis-url", redis_url,
                    "--asr-url", ",".join(p.url for p in asr), "--llm-url", llm.url,
                    "--tts-url", ",".join(p.url for p in tts)]
            serve = [start_serve(f"serve-{n}", args) for n in ("a", "b")]
            procs += serve
            for orchestrator in serve:
                orchestrator.wait_ready(180)
            fleet = Fleet(asr, llm, tts, serve, args)
            yield fleet
            procs += fleet.serve[2:]  # started by a test
        finally:
            for proc in procs:
                proc.stop()


def start_serve(name: str, args: list[str]) -> CascadeProcess:
    with pytest.MonkeyPatch.context() as env:  # the child copies os.environ at start
        for var, value in DEADLINES.items():
            env.setenv(var, value)
        return CascadeProcess(name, ["serve"], *args)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(fleet: Fleet) -> AsyncIterator[Client]:
    for text in TEXTS.values():  # synthesize the speech before any clock runs
        piper_clip(text, RATE)
    async with connect(ws_url(fleet.serve[0]), max_size=2**24,
                       additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        c = Client(ws, fleet.logs)
        created = (await c.until("session.created", limit_s=30))[-1][1]["session"]
        fleet.session = created
        await c.configure(SHORT)
        yield c


def remember(fleet: Fleet, events: list[Stamped]) -> None:
    for _, event in events:
        if event["type"] in ("conversation.item.added", "conversation.item.done"):
            if event["item"]["id"] not in fleet.items:
                fleet.items.append(event["item"]["id"])


def streams_sent(metrics: str, stage: str) -> dict[str, float]:
    """``cascade_replica_streams_total`` of one stage, by replica, from a /metrics text."""
    out: dict[str, float] = {}
    for m in re.finditer(r"^cascade_replica_streams_total\{([^}]*)\} (\S+)$", metrics,
                         re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m[1]))
        if labels.get("stage") == stage:
            out[labels["replica"]] = float(m[2])
    return out


async def missing_items(client: Client, items: list[str]) -> list[str]:
    """The item ids the (resumed) session cannot retrieve."""
    lost = []
    for item_id in items:
        await client.ws.send(json.dumps({"type": "conversation.item.retrieve",
                                         "item_id": item_id}))
        got = (await client.until("conversation.item.retrieved", "error", limit_s=10))[-1][1]
        if got["type"] == "error":
            lost.append(item_id)
    return lost


async def busy_replica(procs: list[StageProcess], limit_s: float = 10.0) -> StageProcess:
    """The replica holding a stream now (its own /load says so)."""
    deadline = time.monotonic() + limit_s
    async with httpx.AsyncClient(timeout=2.0) as http:
        while time.monotonic() < deadline:
            for proc in procs:
                if (await http.get(f"{proc.url}/load")).json()["active"] > 0:
                    return proc
            await asyncio.sleep(0.02)
    raise AssertionError("no replica holds a stream")


async def test_turns_spread_over_the_replicas(client: Client, fleet: Fleet) -> None:
    for text in (TEXTS["capital"], TEXTS["kitchen"]):
        remember(fleet, await answered_turn(client, text))
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{fleet.serve[0].url}/metrics")).text
        ready = (await http.get(f"{fleet.serve[0].url}/readyz")).json()
    for stage, procs in (("asr", fleet.asr), ("tts", fleet.tts)):
        sent = streams_sent(metrics, stage)
        print(f"\n[replicas] {stage} streams per replica after 2 turns: {sent}")
        assert set(sent) == {p.url for p in procs} and all(sent.values()), sent
        # The orchestrator's /readyz shows each replica, up, with its polled load.
        seen = {r["url"]: r for r in ready["stages"][stage]}
        assert set(seen) == {p.url for p in procs}
        assert all(r["up"] and r["load"]["stage"] == stage for r in seen.values()), seen
    assert [r["url"] for r in ready["stages"]["llm"]] == [fleet.llm.url + "/v1"]


async def test_a_killed_tts_replica_moves_the_reply(client: Client, fleet: Fleet) -> None:
    await client.configure(MEDIUM)
    client.drain()
    async with speaking(client, TEXTS["story"]) as speech:
        await client.until("response.output_audio.delta", limit_s=TURN_S)
        victim = await busy_replica(fleet.tts)
        victim.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        events = await client.until("response.done", limit_s=TURN_S)
        await asyncio.wait_for(speech, 60)
    remember(fleet, events)
    response = events[-1][1]["response"]
    assert answered(response), (response["status"], response["status_details"], fleet.logs())
    assert not of(events, "error"), of(events, "error")
    after = [t for t, e in events if e["type"] == "response.output_audio.delta" and t > killed]
    gaps = [b - a for a, b in zip([killed, *after], after, strict=False)]
    print(f"\n[replicas] TTS replica killed mid-reply: reply {response['status']}, "
          f"{len(after)} audio deltas after the kill, longest gap {max(gaps, default=0):.2f} s")
    assert after  # the reply went on after the kill
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{fleet.serve[0].url}/metrics")).text
    # ... because its TTS stream moved (not because synthesis had already ended).
    assert 'reason="moved_mid_stream",stage="tts"} 1.0' in metrics, fleet.logs()
    await client.configure(SHORT)
    await asyncio.sleep(SETTLE_S)
    remember(fleet, await answered_turn(client, TEXTS["weather"]))


async def test_a_killed_asr_replica_moves_the_turn(client: Client, fleet: Fleet) -> None:
    client.drain()
    async with speaking(client, TEXTS["train"], speedup=1.0) as speech:
        await client.until("input_audio_buffer.speech_started", limit_s=20)
        await asyncio.sleep(1.6)  # mid-utterance
        victim = await busy_replica(fleet.asr)
        victim.proc.send_signal(signal.SIGKILL)
        events = await client.until(TRANSCRIBED, NOT_TRANSCRIBED,
                                    limit_s=10 + ASR_FINALIZE_S + MARGIN_S)
        ended = next(t for t, e in events if e["type"] == "input_audio_buffer.speech_stopped")
        events += await client.until("response.done", limit_s=TURN_S)
        await asyncio.wait_for(speech, 60)
    remember(fleet, events)
    transcript = of(events, TRANSCRIBED)
    final_at = next(t for t, e in events if e["type"] == TRANSCRIBED)
    print(f"\n[replicas] ASR replica killed mid-utterance: transcript "
          f"{transcript[0]['transcript'] if transcript else None!r} "
          f"{final_at - ended:.2f} s after the end of speech")
    # The stream moved with its audio: the whole question is heard, and answered.
    assert transcript and word_errors(TEXTS["train"], transcript[0]["transcript"]) <= 2, (
        transcript, fleet.logs())
    assert answered(events[-1][1]["response"]) and not of(events, "error"), kinds(events)
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{fleet.serve[0].url}/metrics")).text
    assert 'reason="moved_mid_stream",stage="asr"} 1.0' in metrics, fleet.logs()
    async with httpx.AsyncClient() as http:
        ready = (await http.get(f"{fleet.serve[0].url}/readyz")).json()
    assert {r["url"]: r["up"] for r in ready["stages"]["asr"]}[victim.url] is False
    await asyncio.sleep(SETTLE_S)
    remember(fleet, await answered_turn(client, TEXTS["table"]))  # the survivor alone


async def test_a_killed_orchestrator_resumes_on_the_other(client: Client, fleet: Fleet) -> None:
    sid, token = fleet.session["id"], fleet.session["cascade"]["resume_token"]
    assert len(fleet.items) >= 8, fleet.items  # 4+ answered turns: user + assistant items
    a, b = fleet.serve
    a.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    await asyncio.to_thread(a.proc.wait, 10)
    async with connect(ws_url(b, session_id=sid, resume_token=token), max_size=2**24,
                       additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        resumed = Client(ws, fleet.logs)
        created = (await resumed.until("session.created", limit_s=30))[-1][1]["session"]
        back = time.monotonic() - killed
        assert created["id"] == sid
        lost = await missing_items(resumed, fleet.items)
        print(f"\n[replicas] orchestrator killed: session resumed on the other one "
              f"{back:.2f} s after the kill; items {len(fleet.items) - len(lost)}/"
              f"{len(fleet.items)} there (lost {len(lost)})")
        assert not lost, (lost, kinds(resumed.drain()))
        await resumed.configure(SHORT)
        await answered_turn(resumed, TEXTS["capital"])


async def test_a_draining_orchestrator_hands_the_session_over_between_turns(
        fleet: Fleet) -> None:
    sid, token = fleet.session["id"], fleet.session["cascade"]["resume_token"]
    b = fleet.serve[1]
    c = start_serve("serve-c", fleet.serve_args)  # the replica the rolling update brings
    fleet.serve.append(c)
    await asyncio.to_thread(c.wait_ready, 180)
    async with connect(ws_url(b, session_id=sid, resume_token=token), max_size=2**24,
                       additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        client = Client(ws, fleet.logs)
        await client.until("session.created", limit_s=30)
        await client.configure(MEDIUM)
        async with speaking(client, TEXTS["story"]) as speech:
            events = await client.until("response.output_audio.delta", limit_s=TURN_S)
            b.proc.send_signal(signal.SIGTERM)  # mid-reply
            stopped = time.monotonic()
            async with httpx.AsyncClient(timeout=5.0) as http:
                ready = await http.get(f"{b.url}/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            async with connect(ws_url(b), additional_headers={
                    "Authorization": f"Bearer {KEY}"}) as refused:  # no new sessions
                first = json.loads(await asyncio.wait_for(refused.recv(), 10))
            assert first["type"] == "error", first
            assert first["error"]["code"] == "server_draining", first
            events += await client.until("response.done", limit_s=TURN_S)
            await asyncio.wait_for(speech, 60)
            events += await client.until("error", limit_s=70)
        remember(fleet, events)
        await asyncio.sleep(1.0)  # the close follows the error event
        closed = time.monotonic()
        assert client.close_code == 1012, client.close_code
    response = next(e["response"] for _, e in events if e["type"] == "response.done")
    assert answered(response), (response["status"], response["status_details"])
    assert of(events, "error")[-1]["error"]["code"] == "server_draining"
    deltas = [(t, e) for t, e in events if e["type"] == "response.output_audio.delta"]
    audio_s = sum(len(e["delta"]) * 3 // 4 // 2 for _, e in deltas) / 24000
    handed = next(t for t, e in events if e["type"] == "error")
    # The hand-over waited for the reply to be heard out (the client plays in real time
    # from its first delta), not only generated.
    assert handed >= deltas[0][0] + audio_s - 1.0, (handed - deltas[0][0], audio_s)
    code = await asyncio.to_thread(b.proc.wait, 30)
    exited = time.monotonic()
    assert code == 0, b.log_tail()
    async with connect(ws_url(c, session_id=sid, resume_token=token), max_size=2**24,
                       additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        resumed = Client(ws, fleet.logs)
        await resumed.until("session.created", limit_s=30)
        back = time.monotonic()
        lost = await missing_items(resumed, fleet.items)
        print(f"\n[replicas] orchestrator drained (SIGTERM mid-reply): reply {response['status']} "
              f"with {audio_s:.1f} s of audio; session handed over {handed - stopped:.1f} s "
              f"after the signal ({handed - deltas[0][0] - audio_s:+.1f} s from the end of "
              f"its audio), process exited 0 after {exited - stopped:.1f} s; resumed on a "
              f"third orchestrator {back - closed:.2f} s after the close; items "
              f"{len(fleet.items) - len(lost)}/{len(fleet.items)} there")
        assert not lost, lost
        await resumed.configure(SHORT)
        await answered_turn(resumed, TEXTS["capital"])
