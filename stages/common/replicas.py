"""Replicas of one stage, and which one takes the next stream.

A stage is given as one URL, a comma-separated list, or a DNS name that resolves to many
addresses (a Kubernetes headless Service): ``ReplicaSet("asr", "http://asr:8001")``.
Names are re-resolved every ``resolve_interval_s`` (``loop.getaddrinfo``: a worker
thread, never the event loop); a name with several addresses becomes one replica per
address, a name with one address stays one replica named as given (TLS and Host headers
keep working for a single external endpoint). Until the first resolution a name is used as
it is (the system resolver picks an address): ``start`` waits a few seconds at most for it.

Each replica's ``GET /load`` (stages/common/load.py) is polled every ``poll_interval_s``
with a short timeout (a vLLM server has none: its Prometheus gauges stand in). A new
stream goes to the healthy replica with the lowest load figure, corrected for the streams
this process opened or closed there since the last report (reports are up to one interval
old). ``attempt(open_fn)`` tries replicas in that order within one deadline: a replica
that refuses (at capacity, not ready: ``ReplicaRefused``) is skipped for this stream; one
that cannot be reached or dies (``ReplicaUnreachable``, or ``failed()`` reported by a
stream) is marked down and used again once its ``/load`` (or ``/health`` for other
servers) answers. When every replica is down they are still tried, oldest failure first:
the poll may be stale, and trying costs one connect. A stage with one replica is not
polled at all.

Streams stay where they opened (a turn's ASR stream is one WebSocket); ``affinity`` keeps
a session's LLM requests on one replica, whose KV cache holds its conversation, while
that replica is up and not much busier than the least-loaded one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from stages.common.load import StageLoad
from stages.common.metrics import REPLICA_FAILOVERS, REPLICA_STREAMS, REPLICA_UP

log = logging.getLogger(__name__)
T = TypeVar("T")

# An affine replica is kept while its load figure is within this of the least-loaded one.
AFFINITY_SLACK = 0.5


class ReplicaRefused(Exception):
    """The replica answered but will not take this stream now (503/429: full, loading)."""


class ReplicaUnreachable(Exception):
    """The replica could not be reached, timed out, or broke the connection."""


class NoReplicaError(RuntimeError):
    """Every replica of the stage refused or failed within the deadline."""


@dataclass(eq=False)
class Replica:
    url: str  # base URL without a trailing slash, as the clients use it
    stage: str
    load: StageLoad | None = None
    up: bool = True
    reason: str = ""  # why it is down
    down_at: float = 0.0
    local_open: int = 0  # this process's streams on it now
    delta: int = 0  # streams opened minus closed here since the last load report
    has_load: bool = True  # False: the server has no /load (vLLM): /health only
    picked_at: float = 0.0  # equal loads: the least recently chosen goes first
    seen: set[str] = field(default_factory=set)  # DNS names that yielded it

    @property
    def root(self) -> str:
        """The server root (probes live there even when the API base ends in /v1)."""
        return self.url.removesuffix("/v1")

    def score(self) -> float:
        if self.load is None:
            return float(self.local_open)  # no report: spread by what we know
        estimate = max(0, self.load.active + self.delta)
        return (estimate + self.load.queued) / self.load.capacity + 0.5 * self.load.busy

    def full(self) -> bool:
        if self.load is None:
            return False
        return (not self.load.ready
                or self.load.active + self.delta >= self.load.capacity)


def split_urls(spec: str | Sequence[str]) -> list[str]:
    """``"http://a:1, http://b:1"`` or a list -> distinct URLs without trailing slashes."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for part in parts:
        url = part.strip().rstrip("/")
        if not url:
            continue
        scheme = urlsplit(url).scheme
        if scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        if url not in urls:
            urls.append(url)
    if not urls:
        raise ValueError("no stage URL given")
    return urls


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return True


def _with_host(url: str, address: str) -> str:
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _stage_load(resp: httpx.Response) -> StageLoad | None:
    """A cascade stage's /load answer; None for anything else (a 404, another server's
    /load, such as vLLM's ``{"server_load": n}``)."""
    if resp.status_code != 200:
        return None
    try:
        return StageLoad.model_validate_json(resp.content)
    except ValidationError:
        return None


def vllm_load(stage: str, metrics: str) -> StageLoad | None:
    """A vLLM server's load from its Prometheus text: requests running + waiting, of
    ``VLLM_MAX_SEQS`` (vLLM's default ``--max-num-seqs``), busy = KV cache usage. None when
    the text has no vLLM gauges."""
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(metrics):
            if family.name in _VLLM_GAUGES:
                values[family.name] = sum(sample.value for sample in family.samples)
    except ValueError:
        return None
    if "vllm:num_requests_running" not in values:
        return None
    running = int(values["vllm:num_requests_running"])
    waiting = int(values.get("vllm:num_requests_waiting", 0))
    usage = values.get("vllm:kv_cache_usage_perc", values.get("vllm:gpu_cache_usage_perc", 0.0))
    return StageLoad(stage=stage, ready=True, active=running + waiting, queued=waiting,
                     capacity=VLLM_MAX_SEQS, busy=min(1.0, max(0.0, usage)))


VLLM_MAX_SEQS = 256
_VLLM_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting",
                "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def _rank(key: str, url: str) -> bytes:
    return hashlib.blake2b(f"{key}\0{url}".encode(), digest_size=8).digest()


class ReplicaSet:
    """The replicas of one stage, their health and load, and the routing choice."""

    def __init__(self, stage: str, spec: str | Sequence[str], *,
                 poll_interval_s: float = 1.0, probe_timeout_s: float = 1.0,
                 resolve_interval_s: float = 10.0, headers: dict[str, str] | None = None,
                 verify: ssl.SSLContext | bool = True) -> None:
        self.stage = stage
        self.specs = split_urls(spec)
        self.poll_interval_s = poll_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.resolve_interval_s = resolve_interval_s
        self._headers = headers or {}  # on every probe (the stage key: access.py)
        self._verify = verify  # TLS trust for https replicas
        # Before the first resolution every URL is a replica as given.
        self._replicas: dict[str, Replica] = {u: Replica(u, stage) for u in self.specs}
        self._needs_dns = any(not _is_literal(urlsplit(u).hostname or "") for u in self.specs)
        self._resolved_at = -1e9
        self._http: httpx.AsyncClient | None = None
        self._poller: asyncio.Task[None] | None = None
        self._first_round = asyncio.Event()
        self._closed = False

    # ------------------------------------------------------------------ routing
    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    def order(self, affinity: str | None = None) -> list[Replica]:
        """Replicas in the order a new stream tries them: up and not full by load (the
        affine one first when close enough), then full ones, then down ones (oldest
        failure first)."""
        up = [r for r in self._replicas.values() if r.up]
        ready = sorted((r for r in up if not r.full()), key=lambda r: (r.score(), r.picked_at))
        full = sorted((r for r in up if r.full()), key=lambda r: (r.score(), r.picked_at))
        down = sorted((r for r in self._replicas.values() if not r.up),
                      key=lambda r: r.down_at)
        if affinity is not None and ready:
            preferred = max(ready, key=lambda r: _rank(affinity, r.url))
            if preferred.score() <= ready[0].score() + AFFINITY_SLACK:
                ready.remove(preferred)
                ready.insert(0, preferred)
        return ready + full + down

    async def attempt(self, open_fn: Callable[[Replica], Awaitable[T]], *,
                      deadline_s: float, affinity: str | None = None) -> T:
        """``open_fn(replica)`` on each replica in routing order until one succeeds,
        within ``deadline_s``. ``open_fn`` raises ``ReplicaRefused`` / ``ReplicaUnreachable``
        to move on; any other exception is the request's own fault and propagates. The
        replica is counted as holding a stream from the call on: the caller reports its
        end with ``finished(replica)`` (a failed attempt is un-counted here)."""
        await self.start()
        tried: list[str] = []
        reasons: list[str] = []
        try:
            async with asyncio.timeout(deadline_s):
                while True:
                    candidates = [r for r in self.order(affinity) if r.url not in tried]
                    if not candidates:
                        break
                    replica = candidates[0]
                    tried.append(replica.url)
                    self._opened(replica)
                    try:
                        return await open_fn(replica)
                    except ReplicaRefused as exc:
                        self.finished(replica)
                        reasons.append(f"{replica.url}: {exc}")
                        self._note_full(replica)
                        REPLICA_FAILOVERS.labels(self.stage, "refused").inc()
                    except ReplicaUnreachable as exc:
                        self.finished(replica)
                        reasons.append(f"{replica.url}: {exc}")
                        self.failed(replica, str(exc))
                        REPLICA_FAILOVERS.labels(self.stage, "unreachable").inc()
                    except BaseException:
                        self.finished(replica)
                        raise
        except TimeoutError:
            reasons.append(f"deadline of {deadline_s:g} s passed")
        raise NoReplicaError(f"no {self.stage} replica took the stream ("
                             + "; ".join(reasons or ["none configured"]) + ")")

    def _opened(self, replica: Replica) -> None:
        replica.picked_at = time.monotonic()
        replica.local_open += 1
        replica.delta += 1
        REPLICA_STREAMS.labels(self.stage, replica.url).inc()

    def finished(self, replica: Replica) -> None:
        """A stream on ``replica`` ended (or never opened)."""
        replica.local_open = max(0, replica.local_open - 1)
        replica.delta -= 1

    def failed(self, replica: Replica, reason: str) -> None:
        """``replica`` broke a connection or did not answer: route around it until a
        probe finds it well again."""
        if replica.up:
            log.warning("%s replica %s is down: %s", self.stage, replica.url, reason)
        replica.up = False
        replica.reason = reason
        replica.down_at = time.monotonic()
        REPLICA_UP.labels(self.stage, replica.url).set(0)

    def _note_full(self, replica: Replica) -> None:
        """It refused: until its next report, count it as full."""
        if replica.load is not None:
            replica.delta = max(replica.delta, replica.load.capacity - replica.load.active)
        else:
            replica.load = StageLoad(stage=self.stage, ready=True, active=1, queued=0,
                                     capacity=1, busy=1.0)

    def snapshot(self) -> list[dict[str, object]]:
        """Each replica's state as this process sees it (the orchestrator's /readyz)."""
        return [{"url": r.url, "up": r.up, "reason": r.reason or None,
                 "streams": r.local_open, "load": r.load.model_dump() if r.load else None}
                for r in self._replicas.values()]

    # ------------------------------------------------------------------ polling
    async def start(self) -> None:
        """Resolve the names and probe the replicas once (bounded: a few probe timeouts),
        so the first stream is already routed by load, then keep polling in the
        background. The orchestrator calls it while loading; ``attempt`` calls it too.
        ``poll_interval_s <= 0``: no polling (routing by this process's own counts)."""
        if self._poller is not None or self._closed or self.poll_interval_s <= 0:
            return
        self._http = httpx.AsyncClient(timeout=self.probe_timeout_s, headers=self._headers,
                                       verify=self._verify)
        self._poller = asyncio.create_task(self._poll_loop(), name=f"replicas-{self.stage}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.probe_timeout_s * 3):
                await self._first_round.wait()

    async def _poll_loop(self) -> None:
        while not self._closed:
            try:
                if time.monotonic() - self._resolved_at >= self.resolve_interval_s:
                    await self.resolve()
                if len(self._replicas) > 1:  # one replica: nothing to choose or fail over to
                    await self.probe_all()
            except asyncio.CancelledError:
                raise
            except Exception:  # a poll must never stop polling
                log.exception("%s replica poll failed", self.stage)
            self._first_round.set()
            await asyncio.sleep(self.poll_interval_s)

    async def resolve(self) -> None:
        """Re-resolve DNS names; add new addresses, drop ones no name yields any more (their
        open streams go on: they hold their own connections)."""
        self._resolved_at = time.monotonic()
        if not self._needs_dns:
            return
        loop = asyncio.get_running_loop()
        wanted: dict[str, str] = {}  # url -> spec
        for spec in self.specs:
            host = urlsplit(spec).hostname or ""
            if _is_literal(host):
                wanted[spec] = spec
                continue
            try:
                infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("%s: cannot resolve %s: %s", self.stage, host, exc)
                # Keep what this name yielded before (a DNS hiccup is not a dead replica).
                for url, replica in self._replicas.items():
                    if spec in replica.seen or url == spec:
                        wanted[url] = spec
                continue
            addresses = sorted({str(info[4][0]) for info in infos})
            urls = [spec] if len(addresses) <= 1 else [_with_host(spec, a) for a in addresses]
            for url in urls:
                wanted[url] = spec
        for url in list(self._replicas):
            if url not in wanted:
                log.info("%s replica %s left the set", self.stage, url)
                del self._replicas[url]
                with contextlib.suppress(KeyError):
                    REPLICA_UP.remove(self.stage, url)
        for url, spec in wanted.items():
            known = self._replicas.get(url)
            if known is None:
                log.info("%s replica %s joined the set", self.stage, url)
                known = self._replicas[url] = Replica(url, self.stage)
            known.seen.add(spec)

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(r) for r in list(self._replicas.values())))

    async def probe(self, replica: Replica) -> None:
        """One health + load check; a replica that answers is up, one that does not, down."""
        assert self._http is not None
        try:
            if replica.has_load:
                counted = replica.delta  # changes up to now are in the report
                resp = await self._http.get(f"{replica.root}/load")
                if resp.status_code >= 500:
                    raise ReplicaUnreachable(f"/load answered {resp.status_code}")
                load = _stage_load(resp)
                if load is None:  # not ours (vLLM has its own /load): vLLM's gauges
                    resp = await self._http.get(f"{replica.root}/metrics")
                    load = vllm_load(self.stage, resp.text) if resp.status_code == 200 else None
                if load is None:
                    replica.has_load = False
                else:
                    # Keep the streams opened/closed while the report was on its way.
                    replica.load, replica.delta = load, replica.delta - counted
            if not replica.has_load:
                # vLLM and other OpenAI-compatible servers: /health, or any answer below
                # 500 from a server that has none, means it is up.
                resp = await self._http.get(f"{replica.root}/health")
                if resp.status_code >= 500:
                    raise ReplicaUnreachable(f"/health answered {resp.status_code}")
        except (httpx.HTTPError, ValidationError, ReplicaUnreachable) as exc:
            self.failed(replica, f"probe: {type(exc).__name__}: {exc}")
            return
        if not replica.up:
            log.info("%s replica %s is back", self.stage, replica.url)
        replica.up, replica.reason = True, ""
        REPLICA_UP.labels(self.stage, replica.url).set(1)

    async def aclose(self) -> None:
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._http is not None:
            await self._http.aclose()
