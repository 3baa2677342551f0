"""Waiting in tests for something another task or thread does, with a hang guard only."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

HANG_GUARD_S = 60.0  # a hang guard, not a speed bound


async def until(condition: Callable[[], bool], limit_s: float = HANG_GUARD_S) -> None:
    """Poll ``condition`` every 5 ms until it holds; fail after ``limit_s``."""
    for _ in range(int(limit_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition never held")
