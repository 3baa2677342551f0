"""The services' event loop (``stages/common/event_loop.py``): uvloop unless
``CASCADE_EVENT_LOOP=asyncio``, a bad value refused at start with its reason, and a real
served process answering and draining on either loop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import httpx
import pytest
import uvloop

from stages.common import event_loop
from tests.support.procs import first_answer, free_port


def test_unset_or_empty_means_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(event_loop.ENV, raising=False)
    assert event_loop.configured() == "uvloop"
    monkeypatch.setenv(event_loop.ENV, " ")
    assert event_loop.configured() == "uvloop"
    monkeypatch.setenv(event_loop.ENV, " AsyncIO ")
    assert event_loop.configured() == "asyncio"


def test_an_unknown_loop_is_refused_with_the_choices() -> None:
    with pytest.raises(event_loop.EventLoopError, match=r"'tokio'.*uvloop, asyncio"):
        event_loop.configured("tokio")


async def _loop_type() -> type[asyncio.AbstractEventLoop]:
    return type(asyncio.get_running_loop())


def test_each_name_gives_its_loop() -> None:
    with asyncio.Runner(loop_factory=event_loop.loop_factory("uvloop")) as runner:
        assert runner.run(_loop_type()) is uvloop.Loop
    assert event_loop.loop_factory("asyncio") is None  # asyncio.Runner's default loop


def test_a_missing_uvloop_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails as if not installed
    with pytest.raises(event_loop.EventLoopError, match=r"not installed.*=asyncio"):
        event_loop.loop_factory("uvloop")


APP = (
    "import asyncio\n"
    "from fastapi import FastAPI\n"
    "from stages.common.load import StageLoad\n"
    "from stages.common.service import add_common_routes, serve\n"
    "app = FastAPI()\n"
    "add_common_routes(app, 'tts', lambda: True, lambda: StageLoad(stage='tts', ready=True,"
    " active=0, queued=0, capacity=4, busy=0.0), drain_timeout_s=5.0)\n"
    "@app.get('/loop')\n"
    "async def loop() -> str:\n"
    "    return type(asyncio.get_running_loop()).__module__\n"
    "serve(app, '127.0.0.1', {port}, log_level='warning')\n"
)


def _spawn(port: int, loop: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", APP.format(port=port)],
                            env={**os.environ, event_loop.ENV: loop},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(("loop", "module"), [("uvloop", "uvloop"),
                                              ("asyncio", "asyncio.unix_events")])
def test_a_served_process_runs_on_the_configured_loop_and_drains(loop: str,
                                                                 module: str) -> None:
    port = free_port()
    proc = _spawn(port, loop)
    try:
        answer = first_answer(proc, f"http://127.0.0.1:{port}/loop")
        assert answer.status_code == 200 and answer.json() == module
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5.0).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_a_bad_loop_name_stops_the_service_at_start_with_its_reason() -> None:
    proc = _spawn(free_port(), "gevent")
    try:
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    assert "CASCADE_EVENT_LOOP='gevent': use one of uvloop, asyncio" in err
