"""In-memory session store: the embedded default (one orchestrator process).

Same semantics as the Redis backend, including idle TTLs and leases. Expiry is lazy: a
session past its deadline is dropped when next touched, and all expired sessions are swept
when the ``max_sessions`` bound is reached. Client secrets keep a heap of their deadlines:
every put first drops those that expired (O(log n) each), so the live ones alone count
against ``max_client_secrets``. One ``asyncio.Lock`` makes every operation
atomic; none of them awaits anything else while holding it, and each costs at most
O(max_items) (an insert into a bounded list), so the lock is never held for long. A fenced
write (``owner=...``) checks the lease under that same lock, before it changes anything.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    StoreLimitError,
)
from orchestrator.store.interface import NewSession, SessionSnapshot
from orchestrator.store.settings import StoreSettings


@dataclass
class _Lease:
    owner: str
    expires_at: float


@dataclass
class _Session:
    token_hash: str
    config: str
    expires_at: float
    order: list[str] = field(default_factory=list)
    items: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    item_bytes: int = 0
    turn_state: str | None = None
    lease: _Lease | None = None


class MemoryStore:
    def __init__(self, settings: StoreSettings | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or StoreSettings()
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        # Client secrets: id -> (record JSON, deadline), and a min-heap of (deadline, id)
        # that may hold stale entries for replaced records (checked against the dict).
        self._secrets: dict[str, tuple[str, float]] = {}
        self._secret_deadlines: list[tuple[float, str]] = []
        self._lock = asyncio.Lock()
        self._closed = False

    # -- internals (call with the lock held) -------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the session store is closed")

    def _get(self, session_id: str) -> _Session:
        self._check_open()
        check_session_id(session_id)
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}")
        if session.expires_at <= self._clock():
            del self._sessions[session_id]
            raise SessionNotFound(f"no session {session_id!r} (expired)")
        return session

    def _refresh(self, session: _Session) -> None:
        session.expires_at = self._clock() + self.settings.session_ttl_s

    def _live_lease(self, session: _Session) -> _Lease | None:
        lease = session.lease
        if lease is not None and lease.expires_at <= self._clock():
            session.lease = lease = None
        return lease

    def _take_lease(self, session: _Session, owner: str, takeover: bool) -> None:
        lease = self._live_lease(session)
        if lease is not None and lease.owner != owner and not takeover:
            raise SessionBusy("the session is held by another live connection")
        session.lease = _Lease(owner, self._clock() + self.settings.lease_ttl_s)

    def _fence(self, session: _Session, owner: str | None) -> None:
        """Refuse a write by ``owner`` unless it holds the live lease (None: unfenced)."""
        if owner is None:
            return
        check_owner(owner)
        lease = self._live_lease(session)
        if lease is None or lease.owner != owner:
            raise LeaseLost("the lease expired or was taken over")

    def _check_bytes(self, session: _Session, total: int) -> None:
        if total > self.settings.max_session_bytes:
            raise StoreLimitError(f"the session's items would take {total} bytes, over the "
                                  f"limit of {self.settings.max_session_bytes}")

    def _sweep(self) -> None:
        now = self._clock()
        for sid in [sid for sid, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[sid]

    # -- sessions ---------------------------------------------------------------------

    async def create_session(self, config: JsonObject, *,
                             owner: str | None = None) -> NewSession:
        text = encode(as_dict(config, "config"), "config", self.settings.max_config_bytes)
        token = new_resume_token()
        async with self._lock:
            self._check_open()
            if len(self._sessions) >= self.settings.max_sessions:
                self._sweep()
                if len(self._sessions) >= self.settings.max_sessions:
                    raise StoreLimitError(
                        f"too many sessions (limit {self.settings.max_sessions})")
            session_id = new_session_id()
            while session_id in self._sessions:
                session_id = new_session_id()
            session = _Session(hash_token(token), text, 0.0)
            self._refresh(session)
            if owner is not None:
                self._take_lease(session, check_owner(owner), takeover=False)
            self._sessions[session_id] = session
        return NewSession(session_id, token)

    async def resume(self, session_id: str, token: str, *, owner: str | None = None,
                     takeover: bool = False) -> SessionSnapshot:
        async with self._lock:
            session = self._get(session_id)
            if not token_matches(token, session.token_hash):
                raise InvalidResumeToken("the resume token does not match this session")
            if owner is not None:
                self._take_lease(session, check_owner(owner), takeover)
            elif self._live_lease(session) is not None and not takeover:
                raise SessionBusy("the session is held by another live connection")
            self._refresh(session)
            config, texts, turn = (session.config, [session.items[i] for i in session.order],
                                   session.turn_state)
        return SessionSnapshot(session_id=session_id, config=decode(config),
                               items=[decode(t) for t in texts],
                               turn_state=decode(turn) if turn is not None else None)

    async def get_config(self, session_id: str) -> dict[str, Any]:
        async with self._lock:
            text = self._get(session_id).config
        return decode(text)

    async def update_config(self, session_id: str, config: JsonObject, *,
                            owner: str | None = None) -> None:
        text = encode(as_dict(config, "config"), "config", self.settings.max_config_bytes)
        async with self._lock:
            session = self._get(session_id)
            self._fence(session, owner)
            session.config = text
            self._refresh(session)

    async def touch(self, session_id: str, *, owner: str | None = None) -> None:
        async with self._lock:
            session = self._get(session_id)
            self._fence(session, owner)
            self._refresh(session)

    async def delete_session(self, session_id: str, *, owner: str | None = None) -> bool:
        async with self._lock:
            try:
                session = self._get(session_id)
            except SessionNotFound:
                return False
            self._fence(session, owner)
            del self._sessions[session_id]
            return True

    # -- items ------------------------------------------------------------------------

    async def append_item(self, session_id: str, item: JsonObject,
                          previous_item_id: str | None = None, *,
                          owner: str | None = None) -> int:
        item_id, text, size = encode_item(item, self.settings.max_item_bytes)
        async with self._lock:
            session = self._get(session_id)
            self._fence(session, owner)
            if item_id in session.items:
                raise ItemExists(f"item {item_id!r} already exists")
            if len(session.order) >= self.settings.max_items:
                raise StoreLimitError(
                    f"the session has {len(session.order)} items, the limit")
            self._check_bytes(session, session.item_bytes + size)
            if previous_item_id is None:
                position = len(session.order)
            elif previous_item_id == ROOT:
                position = 0
            elif previous_item_id in session.items:
                position = session.order.index(previous_item_id) + 1
            else:
                raise ItemNotFound(f"previous item {previous_item_id!r} not found")
            session.order.insert(position, item_id)
            session.items[item_id] = text
            session.sizes[item_id] = size
            session.item_bytes += size
            self._refresh(session)
            return position

    async def update_item(self, session_id: str, item_id: str, item: JsonObject, *,
                          owner: str | None = None) -> None:
        item_id, text, size = encode_item(item, self.settings.max_item_bytes, item_id)
        async with self._lock:
            session = self._get(session_id)
            self._fence(session, owner)
            if item_id not in session.items:
                raise ItemNotFound(f"item {item_id!r} not found")
            total = session.item_bytes - session.sizes[item_id] + size
            self._check_bytes(session, total)
            session.items[item_id] = text
            session.sizes[item_id] = size
            session.item_bytes = total
            self._refresh(session)

    async def delete_item(self, session_id: str, item_id: str, *,
                          owner: str | None = None) -> None:
        async with self._lock:
            session = self._get(session_id)
            self._fence(session, owner)
            if not isinstance(item_id, str) or session.items.pop(item_id, None) is None:
                raise ItemNotFound(f"item {item_id!r} not found")
            session.order.remove(item_id)
            session.item_bytes -= session.sizes.pop(item_id)
            self._refresh(session)

    async def get_item(self, session_id: str, item_id: str) -> dict[str, Any]:
        async with self._lock:
            text = self._get(session_id).items.get(item_id) if isinstance(item_id, str) \
                else None
        if text is None:
            raise ItemNotFound(f"item {item_id!r} not found")
        return decode(text)

    async def list_items(self, session_id: str) -> list[dict[str, Any]]:
        async with self._lock:
            session = self._get(session_id)
            texts = [session.items[i] for i in session.order]
        return [decode(t) for t in texts]

    # -- turn state -------------------------------------------------------------------

    async def set_turn_state(self, session_id: str, state: JsonObject, *,
                             owner: str | None = None) -> None:
        text = encode(as_dict(state, "turn state"), "turn state",
                      self.settings.max_turn_state_bytes)
        async with self._lock:
            session = self._get(session_id)
            self._fence(session, owner)
            session.turn_state = text
            self._refresh(session)

    async def get_turn_state(self, session_id: str) -> dict[str, Any] | None:
        async with self._lock:
            text = self._get(session_id).turn_state
        return decode(text) if text is not None else None

    # -- leases -----------------------------------------------------------------------

    async def acquire_lease(self, session_id: str, owner: str, *,
                            takeover: bool = False) -> None:
        check_owner(owner)
        async with self._lock:
            self._take_lease(self._get(session_id), owner, takeover)

    async def renew_lease(self, session_id: str, owner: str) -> None:
        check_owner(owner)
        async with self._lock:
            session = self._get(session_id)
            lease = self._live_lease(session)
            if lease is None or lease.owner != owner:
                raise LeaseLost("the lease expired or was taken over")
            lease.expires_at = self._clock() + self.settings.lease_ttl_s
            self._refresh(session)

    async def release_lease(self, session_id: str, owner: str) -> None:
        async with self._lock:
            try:
                session = self._get(session_id)
            except SessionNotFound:
                return
            if session.lease is not None and session.lease.owner == owner:
                session.lease = None

    async def lease_owner(self, session_id: str) -> str | None:
        async with self._lock:
            lease = self._live_lease(self._get(session_id))
        return lease.owner if lease is not None else None

    # -- client secrets ---------------------------------------------------------------

    def _drop_expired_secrets(self) -> None:
        now = self._clock()
        heap = self._secret_deadlines
        while heap and heap[0][0] <= now:
            deadline, key_id = heapq.heappop(heap)
            entry = self._secrets.get(key_id)
            if entry is not None and entry[1] == deadline:
                del self._secrets[key_id]

    async def put_client_secret(self, key_id: str, record: JsonObject, ttl_s: float) -> None:
        check_secret_id(key_id)
        ttl = check_ttl(ttl_s)
        text = encode(as_dict(record, "client secret"), "client secret",
                      self.settings.max_client_secret_bytes)
        async with self._lock:
            self._check_open()
            self._drop_expired_secrets()
            limit = self.settings.max_client_secrets
            if key_id not in self._secrets and len(self._secrets) >= limit:
                raise StoreLimitError(f"too many live client secrets (limit {limit})")
            deadline = self._clock() + ttl
            self._secrets[key_id] = (text, deadline)
            heapq.heappush(self._secret_deadlines, (deadline, key_id))
            if len(self._secret_deadlines) > 2 * len(self._secrets) + 1024:
                # Replaced records left stale entries: rebuild from the live ones.
                self._secret_deadlines = [(d, k) for k, (_, d) in self._secrets.items()]
                heapq.heapify(self._secret_deadlines)

    async def get_client_secret(self, key_id: str) -> dict[str, Any] | None:
        if not valid_secret_id(key_id):
            return None
        async with self._lock:
            self._check_open()
            entry = self._secrets.get(key_id)
            if entry is None:
                return None
            text, deadline = entry
            if deadline <= self._clock():
                del self._secrets[key_id]  # its heap entry goes at the next put
                return None
        return decode(text)

    async def aclose(self) -> None:
        async with self._lock:
            self._closed = True
            self._sessions.clear()
            self._secrets.clear()
            self._secret_deadlines.clear()
