"""Start stage services as child processes on loopback and stop them by PID.

Used by ``cascade demo`` (the distributed shape on one machine) and by the tests, which
drive each stage as a real separate process over its network API.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class CascadeProcess:
    """One ``cascade <command...> --host H --port P`` child process on a free port."""

    def __init__(self, name: str, command: list[str], *extra: str,
                 host: str = "127.0.0.1", port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix=f"cascade-{name}-", suffix=".log",
                                                delete=False)
        cmd = [sys.executable, "-m", "orchestrator.cli", *command,
               "--host", host, "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} service exited early:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return self.url
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} service not ready in {timeout:.0f}s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._log.name)

    def log_tail(self, n: int = 40) -> str:
        self._log.flush()
        with open(self._log.name, errors="replace") as f:
            return "".join(f.readlines()[-n:])


class StageProcess(CascadeProcess):
    """``cascade stage NAME`` as a child process."""

    def __init__(self, name: str, *extra: str, host: str = "127.0.0.1",
                 port: int | None = None) -> None:
        super().__init__(name, ["stage", name], *extra, host=host, port=port)


@contextlib.contextmanager
def serve_process(*extra: str, ready_timeout: float = 180.0) -> Iterator[str]:
    """``cascade serve`` (the Realtime server) on a free loopback port; yields its URL."""
    proc = CascadeProcess("serve", ["serve"], *extra)
    try:
        yield proc.wait_ready(ready_timeout)
    finally:
        proc.stop()


@contextlib.contextmanager
def stage_process(name: str, *extra: str, ready_timeout: float = 120.0) -> Iterator[str]:
    """Run ``cascade stage NAME`` on a free loopback port; yield its base URL."""
    proc = StageProcess(name, *extra)
    try:
        yield proc.wait_ready(ready_timeout)
    finally:
        proc.stop()


@contextlib.contextmanager
def stage_processes(names: tuple[str, ...], ready_timeout: float = 180.0
                    ) -> Iterator[dict[str, str]]:
    """Start several stages at once (they load their models in parallel)."""
    procs = [StageProcess(name) for name in names]
    try:
        yield {p.name: p.wait_ready(ready_timeout) for p in procs}
    finally:
        for p in procs:
            p.stop()
