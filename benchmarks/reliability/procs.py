"""The processes of a load or soak run: fake stages + one ``cascade serve``, and what
``/proc`` and ``/metrics`` say about them (CPU, RSS, fds, sockets, loop lag, tasks)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fds(pid: int) -> tuple[int, int]:
    """(open file descriptors, of which sockets) of a process, counted in /proc."""
    base = f"/proc/{pid}/fd"
    names = os.listdir(base)
    sockets = 0
    for name in names:
        with contextlib.suppress(OSError):
            if os.readlink(f"{base}/{name}").startswith("socket:"):
                sockets += 1
    return len(names), sockets


def pin(pid: int, cpus: set[int]) -> bool:
    """Pin a process (every thread) to ``cpus`` where the machine has them."""
    available = os.sched_getaffinity(0)
    if not cpus <= available or len(available) < 2:
        return False
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), cpus)
        return True
    return False


@dataclass
class CpuMeter:
    """CPU share of a process over an interval (1.0 = one core busy)."""

    pid: int
    _cpu: float = 0.0
    _wall: float = 0.0

    def start(self) -> None:
        self._cpu, self._wall = cpu_seconds(self.pid), time.monotonic()

    def read(self) -> float:
        return (cpu_seconds(self.pid) - self._cpu) / max(1e-6, time.monotonic() - self._wall)


class Histogram:
    """Cumulative buckets of one Prometheus histogram, and quantiles between two reads."""

    def __init__(self, buckets: dict[float, float]) -> None:
        self.buckets = buckets

    def since(self, earlier: Histogram) -> Histogram:
        return Histogram({le: n - earlier.buckets.get(le, 0.0)
                          for le, n in self.buckets.items()})

    @property
    def count(self) -> float:
        return self.buckets.get(float("inf"), 0.0)

    def quantile(self, q: float) -> float:
        """Linear interpolation within the bucket holding the q-th observation."""
        total = self.count
        if total <= 0:
            return float("nan")
        rank = q * total
        lower, below = 0.0, 0.0
        for le in sorted(self.buckets):
            n = self.buckets[le]
            if n >= rank:
                if le == float("inf"):
                    return lower
                share = (rank - below) / (n - below) if n > below else 1.0
                return lower + (le - lower) * share
            lower, below = le, n
        return lower


@dataclass
class Scrape:
    lag: Histogram
    tasks: float
    sessions: float
    sockets: float
    open_fds: float


def parse_metrics(text: str) -> Scrape:
    buckets: dict[float, float] = {}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cascade_event_loop_lag_seconds_bucket":
                buckets[float(sample.labels["le"])] = sample.value
            elif not sample.labels:
                values[sample.name] = sample.value
    return Scrape(Histogram(buckets), values.get("cascade_asyncio_tasks", float("nan")),
                  values.get("cascade_active_sessions", float("nan")),
                  values.get("cascade_open_sockets", float("nan")),
                  values.get("process_open_fds", float("nan")))


class Rig:
    """Fake stages and one orchestrator, started and stopped together."""

    def __init__(self, *, orchestrator_cpus: set[int] | None = None,
                 others_cpus: set[int] | None = None, env: dict[str, str] | None = None
                 ) -> None:
        self.fakes: subprocess.Popen[str] | None = None
        self.orch: subprocess.Popen[str] | None = None
        self.port = 0
        self.stage_ports: dict[int, str] = {}
        self.orchestrator_cpus = orchestrator_cpus
        self.others_cpus = others_cpus
        self.pinned = False
        self._own_cpus = os.sched_getaffinity(0)
        self.env = env or {}
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"cascade-rig-{os.getpid()}.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    async def start(self, max_sessions: int = 1000, ready_timeout_s: float = 120.0) -> None:
        self.fakes = self._spawn_fakes()
        assert self.fakes.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.fakes.stdout.readline), 60)
        parts = line.split()  # "fake stages: asr P llm P tts P"
        if len(parts) < 8:
            raise RuntimeError(f"fake stages did not start: {line!r}")
        asr, llm, tts = parts[3], parts[5], parts[7]
        self.stage_ports = {int(asr): "asr", int(llm): "llm", int(tts): "tts"}
        self.port = free_port()
        env = {**os.environ, "CASCADE_ASR_URL": f"http://127.0.0.1:{asr}",
               "CASCADE_LLM_URL": f"http://127.0.0.1:{llm}",
               "CASCADE_TTS_URL": f"http://127.0.0.1:{tts}",
               "CASCADE_PORT": str(self.port), "CASCADE_HOST": "127.0.0.1",
               "CASCADE_MAX_SESSIONS": str(max_sessions), "CASCADE_DEMO": "false",
               "CASCADE_REDIS_URL": "",
               # The per-key connection rate (300 a minute) would refuse a ramp's
               # connects and resumes: this run measures capacity, not that limit.
               "CASCADE_KEY_CONNECTION_RATE": "0", **self.env}
        self.orch = self._spawn_orchestrator(env)
        deadline = time.monotonic() + ready_timeout_s
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                if self.orch.poll() is not None:
                    raise RuntimeError(f"cascade serve exited {self.orch.returncode}: "
                                       f"{self.log.read_text()[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{self.base}/readyz")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("cascade serve was not ready in time")
                await asyncio.sleep(0.25)
        if self.orchestrator_cpus and self.others_cpus:
            self.pinned = (pin(self.orch.pid, self.orchestrator_cpus)
                           and pin(self.fakes.pid, self.others_cpus)
                           and pin(os.getpid(), self.others_cpus))

    def _spawn_fakes(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "benchmarks.reliability.fake_stages", "--port", "0"],
            stdout=subprocess.PIPE, text=True, env={**os.environ, **self.env})

    def _spawn_orchestrator(self, env: dict[str, str]) -> subprocess.Popen[str]:
        with self.log.open("w") as log:
            return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve"],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, text=True)

    def alive(self) -> bool:
        return self.orch is not None and self.orch.poll() is None

    async def scrape(self) -> Scrape:
        async with httpx.AsyncClient(timeout=10) as http:
            resp = await http.get(f"{self.base}/metrics")
        return parse_metrics(resp.text)

    async def stop(self) -> None:
        for proc in (self.orch, self.fakes):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in (self.orch, self.fakes):
            if proc is None:
                continue
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), 30)
            except TimeoutError:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        if self.fakes is not None and self.fakes.stdout is not None:
            self.fakes.stdout.close()
        if self.pinned:
            for tid in os.listdir("/proc/self/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), self._own_cpus)


def socket_peers(pid: int) -> dict[str, int]:
    """The process's TCP sockets by what they are: ``listen``, ``to:<port>`` (connections
    it opened to that local port, e.g. a stage's), ``from-clients`` (accepted) or
    ``other`` (UDP, unix, closing), matched through ``/proc/<pid>/net/tcp*`` by inode."""
    inodes: set[str] = set()
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        with contextlib.suppress(OSError):
            link = os.readlink(f"{base}/{name}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    listening: set[int] = set()
    rows: list[tuple[int, int, str, str]] = []  # local port, remote port, state, inode
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                local = int(cols[1].rsplit(":", 1)[1], 16)
                remote = int(cols[2].rsplit(":", 1)[1], 16)
                if cols[3] == "0A":
                    listening.add(local)
                rows.append((local, remote, cols[3], cols[9]))
    out: dict[str, int] = {}
    seen: set[str] = set()
    for local, remote, state, inode in rows:
        if inode not in inodes or inode in seen:
            continue
        seen.add(inode)
        if state == "0A":
            key = "listen"
        elif local in listening:
            key = "from-clients"
        else:
            key = f"to:{remote}"
        out[key] = out.get(key, 0) + 1
    other = len(inodes) - len(seen)
    if other:
        out["other"] = other
    return out


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0
