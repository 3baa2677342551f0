"""Replica routing against real stage processes on loopback: two TTS, two ASR and two LLM
services, each a ``cascade stage`` process, and the network clients the orchestrator uses
(``TtsClient``, ``AsrClient``, ``OpenAICompatLlm``) given both URLs.

* least-loaded choice from the replicas' own ``/load`` reports;
* a full replica refuses in the handshake and the stream opens on the other at once;
* a replica that hangs (SIGSTOP) is passed over after one connect timeout or probe;
* a replica killed mid-stream: a TTS stream moves to the other replica and goes on where
  its audio stopped, an ASR stream sends its audio again to the other and the turn is
  transcribed whole; the dead replica is routed around, and used again once a new
  process answers on its address;
* a stream stays on its replica for its whole life (a TTS stream's rounds, an ASR turn),
  even while the replica drains after SIGTERM (new streams go elsewhere);
* a session's LLM requests stay on one replica (affinity) and move when it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from prometheus_client import REGISTRY
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from orchestrator.launcher import StageProcess
from stages.asr.client import AsrClient
from stages.common.replicas import NoReplicaError, ReplicaSet
from stages.llm.client import OpenAICompatLlm
from stages.llm.types import ChatMessage, LlmRequest
from stages.tts.client import TtsClient
from tests.stages.asr.helpers import stream_clip
from tests.support.speech import SENTENCES, piper_clip, with_silence, word_errors
from tests.support.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

CAPACITY = 2
POLL_S = 0.2
STORY = ("Once upon a time a small dragon lived in a cave above the sea. " * 12).strip()


class Pair:
    """Two processes of one stage; ``respawn`` starts a new one on a dead one's port."""

    def __init__(self, name: str, *extra: str) -> None:
        self.name, self.extra = name, extra
        self.procs = [StageProcess(name, *extra), StageProcess(name, *extra)]
        self.retired: list[StageProcess] = []

    def wait_ready(self) -> None:
        for p in self.procs:
            p.wait_ready(180)

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.procs]

    def kill(self, url: str) -> None:
        proc = next(p for p in self.procs if p.url == url)
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(10)

    def respawn(self, url: str) -> StageProcess:
        i = next(i for i, p in enumerate(self.procs) if p.url == url)
        old = self.procs[i]
        self.retired.append(old)
        self.procs[i] = StageProcess(self.name, *self.extra, port=old.port)
        return self.procs[i]

    def stop(self) -> None:
        for p in (*self.procs, *self.retired):
            p.stop()


@pytest.fixture(scope="module")
def tts_pair() -> Iterator[Pair]:
    pair = Pair("tts", "--set", f"max_streams={CAPACITY}")
    try:
        pair.wait_ready()
        yield pair
    finally:
        pair.stop()


async def load_of(url: str) -> dict[str, object]:
    async with httpx.AsyncClient() as http:
        body: dict[str, object] = (await http.get(f"{url}/load")).json()
        return body


@contextlib.asynccontextmanager
async def held(url: str, n: int) -> AsyncIterator[list[ClientConnection]]:
    """``n`` raw TTS streams held open on one replica (another orchestrator's load)."""
    streams = [await connect("ws" + url.removeprefix("http") + "/v1/stream") for _ in range(n)]
    try:
        for ws in streams:
            await ws.recv()  # ready
        yield streams
    finally:
        for ws in streams:
            await ws.close()


def reported(replicas: ReplicaSet, url: str) -> int | None:
    """Active streams in the newest load report of ``url`` that ``replicas`` polled."""
    load = next(r.load for r in replicas.replicas if r.url == url)
    return None if load is None else load.active


async def idle(url: str) -> None:
    async def check() -> bool:
        return (await load_of(url))["active"] == 0
    for _ in range(300):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never went idle")


async def test_tts_least_loaded_and_full_replicas(tts_pair: Pair) -> None:
    a, b = tts_pair.urls
    client = TtsClient(ReplicaSet("tts", [a, b], poll_interval_s=POLL_S))
    try:
        await client.replicas.start()
        async with held(a, 1):
            await until(lambda: reported(client.replicas, a) == 1
                        and reported(client.replicas, b) == 0)
            # A holds one stream (someone else's): the next two go to B, then A is next.
            first = await client.open_stream()
            assert first.replica == b
            second = await client.open_stream()
            assert second.replica == a  # B (1 of 2) and A (1 of 2) tie: rotation
            assert (await load_of(a))["active"] == 2 and (await load_of(b))["active"] == 1
            third = await client.open_stream()
            assert third.replica == b
            # Both full now: every replica refuses, with its reason.
            with pytest.raises(NoReplicaError, match=r"HTTP 503.*HTTP 503"):
                await client.open_stream()
            # A stream keeps its replica across rounds.
            for text in ("First round.", "Second round."):
                await first.push_text(text)
                await first.flush()
                chunks = [c async for c in first.chunks()]
                assert "".join(c.text for c in chunks) == text
            for s in (first, second, third):
                await s.aclose()
    finally:
        await client.aclose()


async def test_tts_refusal_moves_the_stream_at_once(tts_pair: Pair) -> None:
    a, b = tts_pair.urls
    await idle(a)
    await idle(b)
    # No polling: the client knows nothing of A's load and tries it first.
    client = TtsClient(ReplicaSet("tts", [a, b], poll_interval_s=0))
    refused = REGISTRY.get_sample_value("cascade_replica_failovers_total",
                                        {"stage": "tts", "reason": "refused"}) or 0.0
    try:
        async with held(a, CAPACITY):
            chunks = await client.synthesize("Moved to the other replica.")
            assert "".join(c.text for c in chunks) == "Moved to the other replica."
        assert REGISTRY.get_sample_value("cascade_replica_failovers_total",
                                         {"stage": "tts", "reason": "refused"}) == refused + 1
    finally:
        await client.aclose()


async def test_tts_killed_replica_is_routed_around_then_used_again(tts_pair: Pair) -> None:
    a, b = tts_pair.urls
    client = TtsClient(ReplicaSet("tts", [a, b], poll_interval_s=POLL_S))
    try:
        await client.replicas.start()
        victim = await client.open_stream()
        dead = victim.replica
        survivor = b if dead == a else a
        await victim.push_text(STORY)
        await victim.flush()
        chunks = victim.chunks()
        got = [await anext(chunks)]  # mid-synthesis
        tts_pair.kill(dead)
        # The stream moves to the survivor and goes on where the audio stopped: every
        # phrase once, in order, with continuous indexes and offsets.
        got += [c async for c in chunks]
        assert victim.failovers == 1 and victim.replica == survivor
        assert [c.index for c in got] == list(range(len(got)))
        assert " ".join(c.text.strip() for c in got) == STORY
        for before, after in itertools.pairwise(got):
            assert STORY[before.text_offset:after.text_offset].strip() == before.text.strip()
        await victim.aclose()
        down = next(r for r in client.replicas.replicas if r.url == dead)
        assert not down.up
        # Every new stream goes to the survivor, at once and without an error.
        for _ in range(3):
            stream = await client.open_stream()
            assert stream.replica == survivor
            await stream.aclose()
        # A new process on the dead one's address is found by the poll and used again.
        await asyncio.to_thread(tts_pair.respawn(dead).wait_ready, 120)
        await until(lambda: down.up, limit_s=30)
        seen = set()
        for _ in range(4):
            stream = await client.open_stream()
            seen.add(stream.replica)
            await stream.aclose()
        assert dead in seen  # used again (the survivor may still be the busier one)
    finally:
        await client.aclose()


async def test_a_hung_tts_replica_is_passed_over_then_used_again(tts_pair: Pair) -> None:
    """A replica that stops answering (SIGSTOP: its socket still accepts, nothing answers)
    costs a new stream one connect timeout, then none: it is down until it answers."""
    a, b = tts_pair.urls
    hung = tts_pair.procs[0]
    client = TtsClient(ReplicaSet("tts", [a, b], poll_interval_s=POLL_S))
    try:
        await client.replicas.start()
        await until(lambda: all(r.load is not None for r in client.replicas.replicas))
        hung.proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(3):
                stream = await client.open_stream()
                assert stream.replica == b
                await stream.aclose()
            down = next(r for r in client.replicas.replicas if r.url == a)
            await until(lambda: not down.up, limit_s=10)  # the probe timed out
            # A client that knows nothing yet (no polling) tries A first: its handshake
            # times out and the stream opens on B.
            blind = TtsClient(ReplicaSet("tts", [a, b], poll_interval_s=0))
            before = REGISTRY.get_sample_value("cascade_replica_failovers_total",
                                               {"stage": "tts", "reason": "unreachable"})
            try:
                stream = await blind.open_stream()
                assert stream.replica == b
                await stream.aclose()
            finally:
                await blind.aclose()
            assert REGISTRY.get_sample_value("cascade_replica_failovers_total", {
                "stage": "tts", "reason": "unreachable"}) == (before or 0.0) + 1
        finally:
            hung.proc.send_signal(signal.SIGCONT)
        # Back once it answers (and once the handshakes queued while it hung are gone:
        # until then it reports them as streams and is, rightly, not the least loaded).
        await until(lambda: down.up and down.load is not None and down.load.active == 0,
                    limit_s=30)
        seen = set()
        for _ in range(4):
            stream = await client.open_stream()
            seen.add(stream.replica)
            await stream.aclose()
        assert a in seen  # used again
    finally:
        await client.aclose()


async def test_sigterm_drains_a_tts_replica(tts_pair: Pair) -> None:
    """SIGTERM: the replica refuses new streams (503 "draining", /readyz 503) while the
    stream it is synthesizing finishes there; then the process exits by itself."""
    client = TtsClient(ReplicaSet("tts", tts_pair.urls, poll_interval_s=0))
    try:
        stream = await client.open_stream()
        victim = next(p for p in tts_pair.procs if p.url == stream.replica)
        await stream.push_text(STORY)
        await stream.flush()
        chunks = stream.chunks()
        got = [await anext(chunks)]
        victim.proc.send_signal(signal.SIGTERM)
        async with httpx.AsyncClient() as http:
            for _ in range(200):  # the signal is handled between two event loop steps
                ready = await http.get(f"{victim.url}/readyz")
                if ready.status_code == 503:
                    break
                await asyncio.sleep(0.05)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        with pytest.raises(InvalidStatus) as refused:
            await connect("ws" + victim.url.removeprefix("http") + "/v1/stream")
        assert json.loads(refused.value.response.body)["error"]["code"] == "draining"
        other = await client.open_stream()
        assert other.replica != victim.url
        await other.aclose()
        got += [c async for c in chunks]  # the stream in progress ends where it began
        assert stream.failovers == 0 and " ".join(c.text.strip() for c in got) == STORY
        await stream.aclose()
        # uvicorn re-raises the SIGTERM it deferred once it has shut down.
        assert await asyncio.to_thread(victim.proc.wait, 30) in (0, -signal.SIGTERM)
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def asr_pair() -> Iterator[Pair]:
    pair = Pair("asr")
    try:
        pair.wait_ready()
        yield pair
    finally:
        pair.stop()


async def test_asr_stream_moves_when_its_replica_dies(asr_pair: Pair) -> None:
    client = AsrClient(ReplicaSet("asr", asr_pair.urls, poll_interval_s=POLL_S))
    clip = with_silence(piper_clip(SENTENCES[0]))
    half = clip.size // 2
    try:
        await client.replicas.start()
        stream = await client.open_stream()
        dead = stream.replica
        await stream.push(clip[:half].tobytes())
        asr_pair.kill(dead)
        # The rest of the utterance goes to the stream as if nothing happened; the audio
        # already sent is sent again to the other replica, and the whole turn is heard.
        await stream.push(clip[half:].tobytes())
        final = await asyncio.wait_for(stream.finalize(), 60)
        assert stream.failovers == 1 and stream.replica != dead
        assert word_errors(SENTENCES[0], final.text) <= 1, final.text
        await stream.aclose()
        assert not next(r for r in client.replicas.replicas if r.url == dead).up
        before = sent_to("asr", dead)
        _, final, _ = await stream_clip(client, clip, speed=4.0)
        assert word_errors(SENTENCES[0], final.text) <= 1, final.text
        assert sent_to("asr", dead) == before  # the dead replica is not even tried
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def llm_pair() -> Iterator[Pair]:
    pair = Pair("llm")
    try:
        pair.wait_ready()
        yield pair
    finally:
        pair.stop()


def sent_to(stage: str, replica: str) -> float:
    """Streams this process sent to ``replica`` (the routing metric)."""
    return REGISTRY.get_sample_value("cascade_replica_streams_total",
                                     {"stage": stage, "replica": replica}) or 0.0


async def test_llm_session_affinity_and_failover(llm_pair: Pair) -> None:
    a, b = (u + "/v1" for u in llm_pair.urls)
    llm = OpenAICompatLlm([a, b])
    llm.replicas.poll_interval_s = POLL_S
    request = LlmRequest(messages=[ChatMessage(role="user", content="Say hello.")],
                         max_tokens=4, affinity="session-1")
    try:
        before = {u: sent_to("llm", u) for u in (a, b)}
        for _ in range(4):
            text = "".join([d.text async for d in llm.stream(request)])
            assert text.strip()
        counts = {u: sent_to("llm", u) - before[u] for u in (a, b)}
        assert sorted(counts.values()) == [0, 4], counts  # one session: one replica
        home = a if counts[a] else b
        other = b if home == a else a
        llm_pair.kill(home.removesuffix("/v1"))
        text = "".join([d.text async for d in llm.stream(request)])
        assert text.strip()  # moved to the other replica, no error for the caller
        assert sent_to("llm", other) - before[other] == 1
    finally:
        await llm.aclose()
