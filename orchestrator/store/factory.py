"""Pick the backend from settings: Redis when ``redis_url`` is set, else memory."""

from __future__ import annotations

from orchestrator.store.interface import SessionStore
from orchestrator.store.memory import MemoryStore
from orchestrator.store.settings import StoreSettings


async def open_store(settings: StoreSettings | None = None) -> SessionStore:
    settings = settings or StoreSettings()
    if settings.redis_url:
        from orchestrator.store.redis_store import RedisStore

        return await RedisStore.connect(settings)
    return MemoryStore(settings)
