"""Stage services as real separate processes on loopback (see orchestrator.launcher)."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import httpx

from orchestrator.launcher import free_port, stage_process, stage_processes

__all__ = ["first_answer", "free_port", "stage_process", "stage_processes"]


def first_answer(proc: subprocess.Popen[Any], url: str, limit_s: float = 60.0
                 ) -> httpx.Response:
    """GET ``url`` until the server ``proc`` starts answering; its first answer. Fails if
    the process exits first or nothing answers within ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while True:
        assert proc.poll() is None, f"the server exited early (status {proc.returncode})"
        try:
            return httpx.get(url, timeout=1.0)
        except httpx.HTTPError:
            assert time.monotonic() < deadline, f"the server did not start: {url}"
            time.sleep(0.1)
