"""A throwaway ``redis-server`` on loopback for tests, stopped by its PID.

No persistence (``--save ''``, no AOF), its working directory and log in a temporary
folder (output goes to a file, never a pipe, so a chatty server cannot block on a full
pipe). ``redis_server()`` yields the URL once the server answers PING.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from orchestrator.launcher import free_port


def answers_ping(port: int) -> bool:
    """True when a Redis server on this loopback port answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(timeout_s: float = 10.0) -> Iterator[str]:
    """Start redis-server on a free port; yield ``redis://127.0.0.1:PORT/0``."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not on PATH")
    with tempfile.TemporaryDirectory(prefix="cascade-redis-") as tmp:
        log_path = Path(tmp) / "redis.log"
        port = free_port()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                 "--appendonly", "no", "--dir", tmp],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout_s
            while not answers_ping(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not start:\n{log_path.read_text()[-2000:]}")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
