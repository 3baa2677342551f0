"""The processes the fault scenarios run against, and how they are observed.

- ``RedisProcess``: ``redis-server`` on a fixed loopback port with the append-only file on
  (what the Helm chart runs with ``redis.bundled.persistence.enabled``), so it can be
  killed and started again on the same port with its data, or stopped (SIGSTOP).
- ``FakeStagesProcess``: ``python -m benchmarks.reliability.fake_stages`` (ASR, LLM and TTS
  speaking the real protocols, cheap enough for a loaded CI machine).
- ``serve()``: a ``cascade serve`` process with extra environment (short stage deadlines).
- ``Probe``: what a process holds, read from outside: RSS and open fds from ``/proc``, and
  ``cascade_active_sessions`` from its ``/metrics``.
- ``open_client``: a Realtime WebSocket (``tests.support.realtime_client.Client``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

from orchestrator.launcher import CascadeProcess, free_port
from tests.support.realtime_client import Client, ws_url
from tests.support.redis_server import answers_ping

KEY = "faults-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisProcess:
    """redis-server with AOF in a temporary folder, restartable on the same port."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not on PATH")
        self.exe = exe
        self.dir = tempfile.TemporaryDirectory(prefix="cascade-faults-redis-")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> float:
        """Start (or start again); seconds until it answered PING."""
        started = time.monotonic()
        with (Path(self.dir.name) / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [self.exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                 "--appendonly", "yes", "--dir", self.dir.name],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while not answers_ping(self.port):
            if self.proc.poll() is not None or time.monotonic() - started > timeout_s:
                raise RuntimeError("redis-server did not start:\n" + self.log_tail())
            time.sleep(0.02)
        return time.monotonic() - started

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (Path(self.dir.name) / "redis.log").read_text()[-2000:]
        return ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
            _stop(self.proc)
        self.dir.cleanup()


class FakeStagesProcess:
    """The fake ASR, LLM and TTS services in one child process on free ports."""

    def __init__(self, **timing: float) -> None:
        self._log = tempfile.NamedTemporaryFile(prefix="cascade-fake-stages-", suffix=".log",
                                                delete=False)
        args = [f"--{k.replace('_', '-')}={v:g}" for k, v in timing.items()]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.reliability.fake_stages", "--port", "0", *args],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.ports: tuple[int, int, int] = (0, 0, 0)

    def wait_ready(self, timeout_s: float = 60.0) -> tuple[int, int, int]:
        deadline = time.monotonic() + timeout_s
        pattern = re.compile(r"fake stages: asr (\d+) llm (\d+) tts (\d+)")
        while time.monotonic() < deadline:
            found = pattern.search(Path(self._log.name).read_text())
            if found:
                a, b, c = (int(g) for g in found.groups())
                self.ports = (a, b, c)
                return self.ports
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("fake stages did not start:\n" + self.log_tail())

    def log_tail(self) -> str:
        return Path(self._log.name).read_text()[-2000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            _stop(self.proc)
        self._log.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._log.name)


def serve(name: str, env: dict[str, str], *args: str) -> CascadeProcess:
    """``cascade serve --api-key KEY ARGS`` with ``env`` added to its environment."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the child copies os.environ when it starts
    try:
        return CascadeProcess(name, ["serve"], "--api-key", KEY, *args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Probe:
    """RSS, open fds and live sessions of one ``cascade serve`` process."""

    def __init__(self, proc: CascadeProcess) -> None:
        self.proc = proc

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.proc.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        return int(found[1]) / 1024 if found else 0.0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.proc.pid}/fd"))

    async def metric(self, pattern: str) -> float:
        """The value of the first /metrics line matching ``pattern`` (a regex of the
        name and labels); -1 when absent."""
        async with httpx.AsyncClient(timeout=5.0) as http:
            text = (await http.get(f"{self.proc.url}/metrics")).text
        found = re.search(rf"^{pattern} (\S+)$", text, re.MULTILINE)
        return float(found[1]) if found else -1.0

    async def sessions(self) -> float:
        return await self.metric("cascade_active_sessions")

    async def settle(self, sessions: float, fds: int, limit_s: float, fd_slack: int = 2
                     ) -> float | None:
        """Seconds until the process is back to ``sessions`` live sessions and at most
        ``fds + fd_slack`` open fds; None if it is not within ``limit_s``."""
        import asyncio

        started = time.monotonic()
        while time.monotonic() - started < limit_s:
            if await self.sessions() <= sessions and self.fds() <= fds + fd_slack:
                return time.monotonic() - started
            await asyncio.sleep(0.1)
        return None


@contextlib.asynccontextmanager
async def open_client(proc: CascadeProcess, logs: Any = None, **query: str
                      ) -> AsyncIterator[Client]:
    """A Realtime connection (``session_id``/``resume_token`` in ``query`` resume)."""
    async with connect(ws_url(proc, **query), additional_headers=HEADERS,
                       max_size=2**24, open_timeout=20) as ws:
        yield Client(ws, logs or proc.log_tail)


@contextlib.contextmanager
def stopped_by_pid(*procs: Any) -> Iterator[None]:
    """Close every process given (``close()`` or ``stop()``) when the block ends."""
    try:
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(Exception):
                (proc.close if hasattr(proc, "close") else proc.stop)()
