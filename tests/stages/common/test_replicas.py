"""ReplicaSet's routing rules with scripted replicas (no network: polling off): order by
load, refusal and failure handling within one attempt, affinity, DNS expansion. The same
rules against real stage processes are in tests/stages/test_replica_routing.py."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import pytest

from stages.common.load import StageLoad
from stages.common.replicas import (
    VLLM_MAX_SEQS,
    NoReplicaError,
    Replica,
    ReplicaRefused,
    ReplicaSet,
    ReplicaUnreachable,
    split_urls,
    vllm_load,
)

A, B, C = "http://10.0.0.1:8001", "http://10.0.0.2:8001", "http://10.0.0.3:8001"


def load(active: int, capacity: int = 4, queued: int = 0, busy: float = 0.0,
         ready: bool = True) -> StageLoad:
    return StageLoad(stage="asr", ready=ready, active=active, queued=queued,
                     capacity=capacity, busy=busy)


def replica_set(*loads: StageLoad | None) -> ReplicaSet:
    urls = [A, B, C][: len(loads)]
    rs = ReplicaSet("asr", ",".join(urls), poll_interval_s=0)
    for url, value in zip(urls, loads, strict=True):
        rs._replicas[url].load = value
    return rs


def urls(replicas: list[Replica]) -> list[str]:
    return [r.url for r in replicas]


def test_split_urls() -> None:
    assert split_urls(" http://a:1/ , http://b:2,http://a:1") == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError, match="not an http"):
        split_urls("a:1")
    with pytest.raises(ValueError, match="no stage URL"):
        split_urls(" , ")


def test_least_loaded_first_full_then_down_last() -> None:
    rs = replica_set(load(3), load(1, busy=0.9), load(4))
    assert urls(rs.order()) == [B, A, C]  # C is at capacity: tried only after the others
    rs.failed(rs._replicas[B], "test")
    assert urls(rs.order()) == [A, C, B]


def test_queued_work_and_busy_fraction_count() -> None:
    rs = replica_set(load(1, queued=3), load(2))
    assert urls(rs.order()) == [B, A]
    rs = replica_set(load(1, busy=1.0), load(1, busy=0.1))
    assert urls(rs.order()) == [B, A]


def test_streams_opened_since_the_report_count_until_the_next() -> None:
    rs = replica_set(load(0), load(1))
    a = rs._replicas[A]
    rs._opened(a)
    rs._opened(a)  # A now holds 2 by our count, B 1 by its report
    assert urls(rs.order()) == [B, A]
    rs.finished(a)
    rs.finished(a)
    assert urls(rs.order()) == [A, B]


def test_equal_load_rotates() -> None:
    rs = replica_set(None, None)
    first = rs.order()[0]
    rs._opened(first)
    rs.finished(first)
    assert rs.order()[0] is not first


def test_affinity_sticks_unless_much_busier() -> None:
    rs = replica_set(load(1), load(1), load(1))
    chosen = {rs.order(affinity=f"session-{i}")[0].url for i in range(30)}
    assert len(chosen) > 1  # sessions spread over replicas
    home = rs.order(affinity="session-7")[0]
    for _ in range(5):
        assert rs.order(affinity="session-7")[0] is home  # one session: one replica
    home.load = load(4, capacity=8)  # busier by 0.375 of capacity: still within the slack
    assert rs.order(affinity="session-7")[0] is home
    home.load = load(7, capacity=8)
    assert rs.order(affinity="session-7")[0] is not home


async def test_attempt_moves_past_refusal_and_failure() -> None:
    rs = replica_set(load(0), load(1), load(2))
    tried: list[str] = []

    async def open_fn(replica: Replica) -> str:
        tried.append(replica.url)
        if replica.url == A:
            raise ReplicaRefused("at capacity")
        if replica.url == B:
            raise ReplicaUnreachable("connection refused")
        return replica.url

    try:
        assert await rs.attempt(open_fn, deadline_s=5) == C
        assert tried == [A, B, C]
        a, b, c = (rs._replicas[u] for u in (A, B, C))
        assert a.up and a.full() and a.local_open == 0  # refused: full until its next report
        assert not b.up and b.local_open == 0  # unreachable: down until a probe answers
        assert c.local_open == 1
        # The next stream does not try A or B first.
        tried.clear()
        assert await rs.attempt(open_fn, deadline_s=5) == C
        assert tried == [C]
    finally:
        await rs.aclose()


async def test_attempt_gives_up_with_every_reason() -> None:
    rs = replica_set(load(0), load(0))

    async def refuse(replica: Replica) -> None:
        raise ReplicaRefused("at capacity")

    try:
        with pytest.raises(NoReplicaError, match=r"at capacity.*at capacity"):
            await rs.attempt(refuse, deadline_s=5)
    finally:
        await rs.aclose()


async def test_attempt_deadline_and_own_errors() -> None:
    rs = replica_set(load(0), load(0))

    async def hang(replica: Replica) -> None:
        await asyncio.sleep(60)

    async def bad_request(replica: Replica) -> None:
        raise ValueError("unsupported sample rate")

    try:
        with pytest.raises(NoReplicaError, match=r"deadline of 0\.2 s"):
            await rs.attempt(hang, deadline_s=0.2)
        with pytest.raises(ValueError):  # the request's own fault: not retried elsewhere
            await rs.attempt(bad_request, deadline_s=5)
        assert all(r.local_open == 0 for r in rs.replicas)
    finally:
        await rs.aclose()


async def test_a_name_with_many_addresses_becomes_many_replicas(
        monkeypatch: pytest.MonkeyPatch) -> None:
    answers: dict[str, list[str]] = {"asr-headless": ["10.1.0.1", "10.1.0.2"],
                                      "single": ["10.2.0.9"]}

    async def getaddrinfo(host: str, port: Any, **_: Any) -> list[Any]:
        if host not in answers:
            raise socket.gaierror("no such name")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in answers[host]]

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    rs = ReplicaSet("asr", "http://asr-headless:8001,http://single:8001", poll_interval_s=0)
    try:
        await rs.resolve()
        assert sorted(urls(rs.replicas)) == ["http://10.1.0.1:8001", "http://10.1.0.2:8001",
                                             "http://single:8001"]
        answers["asr-headless"] = ["10.1.0.2", "10.1.0.3"]  # scaled: one pod replaced
        await rs.resolve()
        assert sorted(urls(rs.replicas)) == ["http://10.1.0.2:8001", "http://10.1.0.3:8001",
                                             "http://single:8001"]
        del answers["asr-headless"]  # a DNS hiccup keeps what the name gave before
        await rs.resolve()
        assert "http://10.1.0.3:8001" in urls(rs.replicas)
        answers["asr-headless"] = ["fd00::5", "fd00::6"]
        await rs.resolve()
        assert "http://[fd00::5]:8001" in urls(rs.replicas)
    finally:
        await rs.aclose()


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="smol"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="smol"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="smol"} 0.25
"""


def test_vllm_gauges_stand_in_for_load() -> None:
    load = vllm_load("llm", VLLM_METRICS)
    assert load == StageLoad(stage="llm", ready=True, active=3, queued=1,
                             capacity=VLLM_MAX_SEQS, busy=0.25)
    assert vllm_load("llm", "# TYPE other gauge\nother 1.0\n") is None
    assert vllm_load("llm", "not prometheus {{{") is None


async def test_probe_reads_our_load_vllms_gauges_or_plain_health() -> None:
    """One probe per replica kind (scripted HTTP, no network): a cascade stage's /load; a
    vLLM server, whose own /load is something else, by its gauges; any other server by
    /health alone; a server error marks the replica down."""
    ours = load(1, capacity=8).model_dump_json()
    answers: dict[str, dict[str, httpx.Response]] = {
        "stage": {"/load": httpx.Response(200, text=ours)},
        "vllm": {"/load": httpx.Response(200, json={"server_load": 3}),
                 "/metrics": httpx.Response(200, text=VLLM_METRICS)},
        "other": {"/health": httpx.Response(200)},
        "broken": {"/load": httpx.Response(500)},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        return answers[request.url.host].get(request.url.path, httpx.Response(404))

    rs = ReplicaSet("llm", [f"http://{h}:8000/v1" for h in answers], poll_interval_s=0)
    rs._http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    try:
        await rs.probe_all()
        by_host = {r.url.split("//")[1].split(":")[0]: r for r in rs.replicas}
        assert by_host["stage"].load == load(1, capacity=8)
        vllm = by_host["vllm"].load
        assert vllm is not None and (vllm.active, vllm.queued) == (3, 1)
        assert by_host["other"].up and by_host["other"].load is None
        assert not by_host["other"].has_load  # asked for /health only from now on
        assert not by_host["broken"].up and "500" in by_host["broken"].reason
        assert all(r.up for h, r in by_host.items() if h != "broken")
    finally:
        await rs.aclose()
