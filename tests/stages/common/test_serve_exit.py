"""``serve`` ends a graceful shutdown with exit status 0 (uvicorn alone re-raises the
SIGTERM afterwards, so the process died "killed by signal" after closing cleanly; process
supervisors and the orchestrator's drain test read that as a crash)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.support.procs import first_answer, free_port

APP = {
    "plain": "from fastapi import FastAPI; app = FastAPI()",
    "draining": (
        "from fastapi import FastAPI; from stages.common.load import StageLoad;"
        "from stages.common.service import add_common_routes; app = FastAPI();"
        "add_common_routes(app, 'tts', lambda: True, lambda: StageLoad(stage='tts',"
        " ready=True, active=0, queued=0, capacity=4, busy=0.0), drain_timeout_s=5.0)"),
}


@pytest.mark.parametrize("kind", sorted(APP))
def test_sigterm_exits_0_after_the_graceful_shutdown(kind: str) -> None:
    port = free_port()
    code = (f"{APP[kind]}\nfrom stages.common.service import serve\n"
            f"serve(app, '127.0.0.1', {port}, log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        first_answer(proc, f"http://127.0.0.1:{port}/docs")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
