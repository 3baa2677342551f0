"""Per-key session caps across every orchestrator that shares one Redis.

``TenantLimiter`` (limits.py) counts a key's live sessions in its own process, so N
replicas let a key hold N times its ``max_sessions``. With the Redis store the servers
also keep, per key with a cap, one sorted set of live sessions: member = the session (its
id once known, a per-connection id before), score = when the entry lapses. A new session
is let in only if the set, less its lapsed entries, holds fewer than the cap: one Lua
script, so two servers admitting at once cannot both take the last place. Each server
renews its own entries every ``ttl_s / 3``; the entries of a server that dies (SIGKILL)
lapse within ``ttl_s``, so its sessions stop counting without anyone cleaning up. A resume
re-uses the session's member, so a session that moves to another server after a crash is
counted once. Times come from Redis (``TIME``): the servers' clocks do not matter. (A
member before the session's id is known: ``limits.new_member()``.)

Imported only with the Redis store: importing redis-py imports the OpenTelemetry SDK.

If Redis cannot be reached the check is skipped (logged): each server's own count still
holds, and the session store refuses new sessions anyway until Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# KEYS[1] the key's set; ARGV: member, cap, ttl ms. -> -1 admitted, else the count held.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local held = redis.call('ZCARD', KEYS[1])
  if held >= tonumber(ARGV[2]) then return held end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return -1
"""

# KEYS[1]; ARGV: ttl ms, members... -> renews the members still there.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""

# KEYS[1]; ARGV: old member, new member, ttl ms.
_RENAME = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 or not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


class SharedSessionCaps:
    """The live sessions of capped keys, shared through Redis (see the module doc)."""

    def __init__(self, redis: Any, prefix: str, ttl_s: float = 30.0) -> None:
        self._redis = redis
        self._prefix = prefix
        self.ttl_s = ttl_s
        self._ttl_ms = str(max(1000, round(ttl_s * 1000)))
        self._reserve = redis.register_script(_RESERVE)
        self._renew = redis.register_script(_RENEW)
        self._rename = redis.register_script(_RENAME)
        self._mine: dict[str, set[str]] = {}  # tenant -> this server's members
        self._renewer: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    def _key(self, tenant: str) -> str:
        return f"{self._prefix}:caps:{{{tenant}}}"

    async def reserve(self, tenant: str, member: str, cap: int) -> int | None:
        """None: ``member`` now counts against ``tenant`` (or already did); else how many
        live sessions the key holds across the servers (its cap reached)."""
        try:
            held = int(await self._reserve(keys=[self._key(tenant)],
                                           args=[member, str(cap), self._ttl_ms]))
        except RedisError as exc:
            log.warning("shared session caps: redis unreachable (%s); key %s checked "
                        "on this server only", exc, tenant)
            held = -1
        if held >= 0:
            return held
        self._mine.setdefault(tenant, set()).add(member)
        self._start_renewer()
        return None

    def rename(self, tenant: str, old: str, new: str) -> None:
        """The session's id is known: its member becomes the id (so that a resume, on any
        server, counts as the same session). In the background."""
        mine = self._mine.get(tenant)
        if mine is None or old not in mine or old == new:
            return
        mine.discard(old)
        mine.add(new)
        self._background(self._rename(keys=[self._key(tenant)],
                                      args=[old, new, self._ttl_ms]), "rename")

    def release(self, tenant: str, member: str) -> None:
        """The session ended here: it stops counting. In the background."""
        mine = self._mine.get(tenant)
        if mine is None or member not in mine:
            return
        mine.discard(member)
        if not mine:
            del self._mine[tenant]
        self._background(self._redis.zrem(self._key(tenant), member), "release")

    async def renew_once(self) -> None:
        for tenant, members in list(self._mine.items()):
            if members:
                await self._renew(keys=[self._key(tenant)], args=[self._ttl_ms, *members])

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=2.0)

    def _start_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_loop(), name="shared-caps-renew")

    async def _renew_loop(self) -> None:
        while self._mine:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await self.renew_once()
            except RedisError as exc:
                log.warning("shared session caps: renewal failed: %s", exc)

    def _background(self, call: Any, what: str) -> None:
        async def run() -> None:
            try:
                await call
            except RedisError as exc:  # the entry lapses by itself within ttl_s
                log.warning("shared session caps: %s failed: %s", what, exc)

        task = asyncio.get_running_loop().create_task(run(), name=f"shared-caps-{what}")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
