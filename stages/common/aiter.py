"""``closing``: an async iterator closed as soon as the block that uses it ends.

An async generator abandoned mid-iteration (its consumer cancelled in its loop body, a
``break``) stays suspended at its ``yield``: its ``finally`` runs only once the collector
finds it, which for anything in a reference cycle (an exception's traceback) can take
minutes. A stream holding a connection (an LLM response) keeps it that long.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")


@contextlib.asynccontextmanager
async def closing(items: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """``async with closing(stream) as items: async for x in items: ...``; ``items`` is
    closed (its ``aclose``, when it has one) when the block ends, however it ends."""
    try:
        yield items
    finally:
        close = getattr(items, "aclose", None)
        if close is not None:
            await close()
