"""The event loop a service process runs on: uvloop by default, asyncio's own on request.

Every service (the orchestrator and each stage) is one event loop per process, and the
orchestrator's loop is its ceiling: sessions per process are bounded by the loop's time
per 20 ms audio frame. uvloop (libuv) runs the loop's own work (polling, callbacks,
socket transports) in C; under the load benchmark it halves the orchestrator's loop-lag
p99 at the same session count (RELIABILITY.md, "Load held by one orchestrator process").

``CASCADE_EVENT_LOOP``: ``uvloop`` (the default; a core dependency) or ``asyncio`` (the
standard library's loop: to compare, or where uvloop cannot be installed). A value that
cannot be honoured stops the process at start with a message saying why, rather than
silently running on another loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Literal, get_args

LoopName = Literal["uvloop", "asyncio"]
ENV = "CASCADE_EVENT_LOOP"


class EventLoopError(RuntimeError):
    """The configured event loop cannot be used (unknown name, uvloop missing)."""


def configured(value: str | None = None) -> LoopName:
    """The loop ``CASCADE_EVENT_LOOP`` (or ``value``) names; unset or empty: uvloop."""
    name = (os.environ.get(ENV, "") if value is None else value).strip().lower() or "uvloop"
    if name not in get_args(LoopName):
        raise EventLoopError(f"{ENV}={name!r}: use one of {', '.join(get_args(LoopName))}")
    return name  # type: ignore[return-value]


def loop_factory(name: LoopName) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A factory for ``asyncio.Runner``: uvloop's, or None (asyncio's default loop)."""
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as exc:
        raise EventLoopError(f"{ENV}=uvloop but uvloop is not installed ({exc}); install "
                             f"it or set {ENV}=asyncio") from None
    return uvloop.new_event_loop

