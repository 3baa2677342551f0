"""Redis session store: any orchestrator process sharing the Redis resumes any session.

Keys are ``{prefix}:s:{session_id}:{meta|order|items|turn|lease}``; the braces make the
session id the cluster hash tag, so one session's keys live in one slot and a Lua script
may touch them all. Every operation is one script (see ``redis_scripts``), hence atomic
with no WATCH retry loops, and every write refreshes the idle TTL of all the session's
keys in the same step. Item order is a list of ids (insert-after is ``LINSERT``, bounded
by ``max_items``), item bodies a hash. A write with ``owner=`` is fenced inside its script:
the lease key is compared with the owner in the same atomic step as the write.

Client secrets are plain string keys ``{prefix}:ek:{key_id}`` (the id a digest of the key)
set with ``PX``: Redis drops them at expiry, for every process at once.

Connection failures surface as ``StoreUnavailable``; a read or an idempotent write whose
pooled connection turns out dead (Redis restarted) is first run once more on a fresh one
(``_RETRY_ONCE``). After ``aclose()`` every call raises
``StoreClosed`` instead of silently reconnecting.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from orchestrator.store import redis_scripts as lua
from orchestrator.store.codec import (
    ROOT,
    JsonObject,
    as_dict,
    check_owner,
    check_secret_id,
    check_session_id,
    check_ttl,
    decode,
    encode,
    encode_item,
    hash_token,
    new_resume_token,
    new_session_id,
    token_matches,
    valid_secret_id,
)
from orchestrator.store.errors import (
    InvalidResumeToken,
    ItemExists,
    ItemNotFound,
    LeaseLost,
    SessionBusy,
    SessionNotFound,
    StoreClosed,
    StoreError,
    StoreLimitError,
    StoreUnavailable,
)
from orchestrator.store.interface import NewSession, SessionSnapshot
from orchestrator.store.settings import StoreSettings

_PARTS = ("meta", "order", "items", "turn", "lease")


async def _once_more(call: Callable[[], Awaitable[Any]]) -> Any:
    """An idempotent command, run again once on a fresh connection if its connection
    failed (see ``_RETRY_ONCE``)."""
    try:
        return await call()
    except RedisConnectionError:
        return await call()
# Scripts whose second run changes nothing more than the first (or, for CREATE, a fresh
# session id each time): run again once on a fresh connection when the connection fails.
# A Redis restart leaves every idle pooled connection dead, and the pool does not notice
# before using one. APPEND and DELETE_ITEM are not among them: a retry after a lost reply
# would say ``item_exists`` / ``item_not_found``; the write-behind retries those.
_RETRY_ONCE = frozenset({
    "CREATE", "RESUME", "SNAPSHOT", "UPDATE_ITEM", "SET_CONFIG", "SET_TURN", "TOUCH",
    "DELETE_SESSION", "ACQUIRE_LEASE", "RENEW_LEASE", "RELEASE_LEASE", "LEASE_OWNER",
    "GET_ITEM", "GET_CONFIG_TURN"})


class RedisStore:
    def __init__(self, settings: StoreSettings | None = None, *,
                 client: aioredis.Redis | None = None) -> None:
        self.settings = settings or StoreSettings()
        if client is None:
            if not self.settings.redis_url:
                raise ValueError("RedisStore needs settings.redis_url or a client")
            timeout = self.settings.redis_timeout_s
            # Bounded pool: past max_connections a call waits (up to the timeout) for a
            # free connection instead of opening more.
            pool = aioredis.BlockingConnectionPool.from_url(
                self.settings.redis_url, max_connections=self.settings.redis_max_connections,
                timeout=timeout, decode_responses=True, socket_timeout=timeout,
                socket_connect_timeout=timeout)
            client = aioredis.Redis.from_pool(pool)
        self._redis = client
        self._closed = False
        self._ttl_ms = str(max(1, round(self.settings.session_ttl_s * 1000)))
        self._lease_ms = str(max(1, round(self.settings.lease_ttl_s * 1000)))
        self._scripts = {name: client.register_script(getattr(lua, name)) for name in (
            "CREATE", "RESUME", "SNAPSHOT", "APPEND", "UPDATE_ITEM", "DELETE_ITEM",
            "SET_CONFIG", "SET_TURN", "TOUCH", "DELETE_SESSION", "ACQUIRE_LEASE",
            "RENEW_LEASE", "RELEASE_LEASE", "LEASE_OWNER", "GET_ITEM", "GET_CONFIG_TURN")}

    @property
    def client(self) -> aioredis.Redis:
        """The Redis client (its pool), for state shared beside the sessions'."""
        return self._redis

    @classmethod
    async def connect(cls, settings: StoreSettings) -> RedisStore:
        """A store whose Redis answered PING (fail at start-up, not at the first turn)."""
        store = cls(settings)
        try:
            await store._redis.ping()
        except RedisError as exc:
            await store.aclose()
            raise StoreUnavailable(f"redis at {settings.redis_url} unreachable: {exc}") from exc
        return store

    def _keys(self, session_id: str) -> list[str]:
        check_session_id(session_id)
        base = f"{self.settings.key_prefix}:s:{{{session_id}}}:"
        return [base + part for part in _PARTS]

    async def _run(self, name: str, session_id: str, *args: str) -> list[Any]:
        """Run one script; its status word mapped to the store's errors."""
        if self._closed:
            raise StoreClosed("the session store is closed")
        keys = self._keys(session_id)
        try:
            try:
                reply = await self._scripts[name](keys=keys, args=list(args))
            except RedisConnectionError:
                if name not in _RETRY_ONCE or self._closed:
                    raise
                reply = await self._scripts[name](keys=keys, args=list(args))
        except RedisError as exc:
            if self._closed:
                raise StoreClosed("the session store is closed") from exc
            raise StoreUnavailable(f"redis: {exc}") from exc
        if not isinstance(reply, list) or not reply:
            raise StoreUnavailable(f"redis: unexpected reply {reply!r:.80}")
        status = reply[0]
        if status == "ok":
            return reply
        error = _ERRORS.get(status)
        if error is None:
            raise StoreError(f"redis script {name}: unexpected status {status!r}")
        value = reply[1] if len(reply) > 1 else ""
        raise error(_MESSAGES[status].format(session_id=session_id, value=value))

    # -- sessions ---------------------------------------------------------------------

    async def create_session(self, config: JsonObject, *,
                             owner: str | None = None) -> NewSession:
        text = encode(as_dict(config, "config"), "config", self.settings.max_config_bytes)
        owner_arg = check_owner(owner) if owner is not None else ""
        token = new_resume_token()
        while True:  # an id collision (2^-96) only costs a retry
            session_id = new_session_id()
            try:
                await self._run("CREATE", session_id, hash_token(token), text, self._ttl_ms,
                                owner_arg, self._lease_ms)
            except ItemExists:
                continue
            return NewSession(session_id, token)

    async def resume(self, session_id: str, token: str, *, owner: str | None = None,
                     takeover: bool = False) -> SessionSnapshot:
        owner_arg = check_owner(owner) if owner is not None else ""
        meta = self._keys(session_id)[0]
        if self._closed:
            raise StoreClosed("the session store is closed")
        try:
            stored = await _once_more(lambda: self._redis.hget(meta, "token"))
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        if not isinstance(stored, str):
            raise SessionNotFound(f"no session {session_id!r}")
        if not token_matches(token, stored):
            raise InvalidResumeToken("the resume token does not match this session")
        reply = await self._run("RESUME", session_id, stored, self._ttl_ms, owner_arg,
                                self._lease_ms, "1" if takeover else "0")
        return _snapshot(session_id, reply)

    async def get_config(self, session_id: str) -> dict[str, Any]:
        reply = await self._run("GET_CONFIG_TURN", session_id)
        return decode(reply[1])

    async def update_config(self, session_id: str, config: JsonObject, *,
                            owner: str | None = None) -> None:
        text = encode(as_dict(config, "config"), "config", self.settings.max_config_bytes)
        await self._run("SET_CONFIG", session_id, text, self._ttl_ms, _fence(owner))

    async def touch(self, session_id: str, *, owner: str | None = None) -> None:
        await self._run("TOUCH", session_id, self._ttl_ms, _fence(owner))

    async def delete_session(self, session_id: str, *, owner: str | None = None) -> bool:
        fence = _fence(owner)
        try:
            await self._run("DELETE_SESSION", session_id, fence)
        except SessionNotFound:
            return False
        return True

    # -- items ------------------------------------------------------------------------

    async def append_item(self, session_id: str, item: JsonObject,
                          previous_item_id: str | None = None, *,
                          owner: str | None = None) -> int:
        item_id, text, _ = encode_item(item, self.settings.max_item_bytes)
        fence = _fence(owner)
        if previous_item_id is None:
            mode, prev = "end", ""
        elif previous_item_id == ROOT:
            mode, prev = "root", ""
        elif isinstance(previous_item_id, str):
            mode, prev = "after", previous_item_id
        else:
            raise ItemNotFound(f"previous item {previous_item_id!r} not found")
        try:
            reply = await self._run("APPEND", session_id, item_id, text, mode, prev,
                                    self._ttl_ms, str(self.settings.max_items),
                                    str(self.settings.max_session_bytes), fence)
        except ItemExists as exc:
            raise ItemExists(f"item {item_id!r} already exists") from exc
        except ItemNotFound as exc:
            raise ItemNotFound(f"previous item {previous_item_id!r} not found") from exc
        return int(reply[1])

    async def update_item(self, session_id: str, item_id: str, item: JsonObject, *,
                          owner: str | None = None) -> None:
        item_id, text, _ = encode_item(item, self.settings.max_item_bytes, item_id)
        fence = _fence(owner)
        try:
            await self._run("UPDATE_ITEM", session_id, item_id, text, self._ttl_ms,
                            str(self.settings.max_session_bytes), fence)
        except ItemNotFound as exc:
            raise ItemNotFound(f"item {item_id!r} not found") from exc

    async def delete_item(self, session_id: str, item_id: str, *,
                          owner: str | None = None) -> None:
        fence = _fence(owner)
        if not isinstance(item_id, str):
            raise ItemNotFound(f"item {item_id!r} not found")
        try:
            await self._run("DELETE_ITEM", session_id, item_id, self._ttl_ms, fence)
        except ItemNotFound as exc:
            raise ItemNotFound(f"item {item_id!r} not found") from exc

    async def get_item(self, session_id: str, item_id: str) -> dict[str, Any]:
        if not isinstance(item_id, str):
            raise ItemNotFound(f"item {item_id!r} not found")
        try:
            reply = await self._run("GET_ITEM", session_id, item_id)
        except ItemNotFound as exc:
            raise ItemNotFound(f"item {item_id!r} not found") from exc
        return decode(reply[1])

    async def list_items(self, session_id: str) -> list[dict[str, Any]]:
        reply = await self._run("SNAPSHOT", session_id)
        return [decode(t) for t in reply[3:]]

    # -- turn state -------------------------------------------------------------------

    async def set_turn_state(self, session_id: str, state: JsonObject, *,
                             owner: str | None = None) -> None:
        text = encode(as_dict(state, "turn state"), "turn state",
                      self.settings.max_turn_state_bytes)
        await self._run("SET_TURN", session_id, text, self._ttl_ms, _fence(owner))

    async def get_turn_state(self, session_id: str) -> dict[str, Any] | None:
        reply = await self._run("GET_CONFIG_TURN", session_id)
        return decode(reply[2]) if reply[2] else None

    # -- leases -----------------------------------------------------------------------

    async def acquire_lease(self, session_id: str, owner: str, *,
                            takeover: bool = False) -> None:
        await self._run("ACQUIRE_LEASE", session_id, check_owner(owner), self._lease_ms,
                        "1" if takeover else "0")

    async def renew_lease(self, session_id: str, owner: str) -> None:
        await self._run("RENEW_LEASE", session_id, check_owner(owner), self._lease_ms,
                        self._ttl_ms)

    async def release_lease(self, session_id: str, owner: str) -> None:
        await self._run("RELEASE_LEASE", session_id, check_owner(owner))

    async def lease_owner(self, session_id: str) -> str | None:
        reply = await self._run("LEASE_OWNER", session_id)
        return reply[1] or None

    # -- client secrets ---------------------------------------------------------------

    def _secret_key(self, key_id: str) -> str:
        return f"{self.settings.key_prefix}:ek:{key_id}"

    async def put_client_secret(self, key_id: str, record: JsonObject, ttl_s: float) -> None:
        check_secret_id(key_id)
        ttl_ms = max(1, math.ceil(check_ttl(ttl_s) * 1000))
        text = encode(as_dict(record, "client secret"), "client secret",
                      self.settings.max_client_secret_bytes)
        if self._closed:
            raise StoreClosed("the session store is closed")
        try:
            await _once_more(lambda: self._redis.set(self._secret_key(key_id), text, px=ttl_ms))
        except RedisError as exc:
            raise self._unavailable(exc) from exc

    async def get_client_secret(self, key_id: str) -> dict[str, Any] | None:
        if not valid_secret_id(key_id):
            return None
        if self._closed:
            raise StoreClosed("the session store is closed")
        try:
            text = await _once_more(lambda: self._redis.get(self._secret_key(key_id)))
        except RedisError as exc:
            raise self._unavailable(exc) from exc
        return decode(text) if isinstance(text, str) else None

    def _unavailable(self, exc: RedisError) -> StoreUnavailable:
        if self._closed:
            return StoreClosed("the session store is closed")
        return StoreUnavailable(f"redis: {exc}")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._redis.aclose()


def _fence(owner: str | None) -> str:
    """A write's fence argument for the scripts: the owner, or '' for an unfenced write
    (so an empty owner must be refused here, not taken as "unfenced")."""
    return check_owner(owner) if owner is not None else ""


_ERRORS: dict[str, type[StoreError]] = {
    "notfound": SessionNotFound,
    "badtoken": InvalidResumeToken,
    "busy": SessionBusy,
    "lost": LeaseLost,
    "limit": StoreLimitError,
    "toobig": StoreLimitError,
    "exists": ItemExists,
    "noprev": ItemNotFound,
    "noitem": ItemNotFound,
}
_MESSAGES = {
    "notfound": "no session {session_id!r}",
    "badtoken": "the resume token does not match this session",
    "busy": "the session is held by another live connection",
    "lost": "the lease expired or was taken over",
    "limit": "the session has {value} items, the limit",
    "toobig": "the session's items would take {value} bytes, over the limit",
    "exists": "the id already exists",
    "noprev": "previous item not found",
    "noitem": "item not found",
}


def _snapshot(session_id: str, reply: list[Any]) -> SessionSnapshot:
    return SessionSnapshot(session_id=session_id, config=decode(reply[1]),
                           items=[decode(t) for t in reply[3:]],
                           turn_state=decode(reply[2]) if reply[2] else None)
