"""What the limits part drives: one ``cascade serve`` with short limits and several API
keys, Realtime WebSocket clients of it, and a neighbour session that proves a refusal or
a cut left the other sessions alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from orchestrator.launcher import CascadeProcess

Event = dict[str, Any]
# The stages are never reached: these limits are all enforced before a turn needs one.
NOWHERE = "http://127.0.0.1:9"


@dataclass(frozen=True)
class Limits:
    """The settings the server runs with (short, so every limit is hit in seconds)."""

    max_sessions: int = 8
    max_session_s: float = 6.0
    max_idle_s: float = 1.5
    max_event_bytes: int = 65536
    max_items: int = 20
    max_audio_rate: float = 4.0
    capped_sessions: int = 2  # tenant "capped"
    rated_connections: int = 3  # tenant "rated", per window
    rated_window_s: float = 60.0


@dataclass
class Server:
    url: str
    keys: dict[str, str]  # tenant name -> key
    limits: Limits
    proc: CascadeProcess

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/v1/realtime"

    def log(self) -> str:
        return self.proc.log_tail(1_000_000)


def new_key(name: str) -> str:
    return f"sk-{name}-{secrets.token_urlsafe(24)}"


@contextlib.contextmanager
def limits_server(limits: Limits, ready_timeout: float = 180.0, *,
                  keys: dict[str, str] | None = None, redis_url: str = "",
                  name: str = "serve-limits") -> Iterator[Server]:
    """``cascade serve`` (remote stages that are never reached, the memory store, or
    ``redis_url``'s) with ``limits``, the standard key and two named keys: "capped" (few
    concurrent sessions) and "rated" (few connections per window); new keys unless
    ``keys`` (servers sharing a Redis share their keys)."""
    keys = keys or {"default": new_key("default"), "capped": new_key("capped"),
                    "rated": new_key("rated")}
    env = {
        "CASCADE_REDIS_URL": redis_url,
        "CASCADE_API_KEY": keys["default"],
        "CASCADE_API_KEYS": json.dumps([
            {"name": "capped", "key": keys["capped"], "max_sessions": limits.capped_sessions},
            {"name": "rated", "key": keys["rated"],
             "connection_rate": limits.rated_connections,
             "connection_window_s": limits.rated_window_s}]),
        "CASCADE_MAX_SESSIONS": str(limits.max_sessions),
        "CASCADE_MAX_SESSION_S": str(limits.max_session_s),
        "CASCADE_MAX_IDLE_S": str(limits.max_idle_s),
        "CASCADE_MAX_EVENT_BYTES": str(limits.max_event_bytes),
        "CASCADE_MAX_ITEMS": str(limits.max_items),
        "CASCADE_MAX_AUDIO_RATE": str(limits.max_audio_rate),
        "CASCADE_LLM_CONTEXT_WINDOW": "4096",
        "CASCADE_LLM_PRIME_INSTRUCTIONS": "false",
        "CASCADE_LLM_PRIME_TURNS": "false",
        "CASCADE_DEMO": "false",
    }
    with mock.patch.dict(os.environ, env):  # the child copies the environment at spawn
        # DEBUG: the keys-not-logged row reads every line the server writes
        proc = CascadeProcess(name, ["--log-level", "DEBUG", "serve"],
                              "--asr-url", NOWHERE, "--llm-url", NOWHERE, "--tts-url", NOWHERE)
    try:
        url = proc.wait_ready(ready_timeout)
        yield Server(url, keys, limits, proc)
    finally:
        proc.stop()


class Conn:
    """One Realtime WebSocket; events queue up as they arrive."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: asyncio.Queue[Event | None] = asyncio.Queue()
        self.close_code: int | None = None
        self.closed_at: float | None = None
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                if isinstance(raw, str):
                    self.events.put_nowait(json.loads(raw))
        except ConnectionClosed:
            pass
        finally:
            rcvd = self.ws.protocol.close_rcvd
            self.close_code = None if rcvd is None else rcvd.code
            self.closed_at = time.monotonic()
            self.events.put_nowait(None)

    async def next(self, within: float = 10.0) -> Event | None:
        """The next event; None once the connection is closed."""
        got = await asyncio.wait_for(self.events.get(), within)
        if got is None:
            self.events.put_nowait(None)
        return got

    async def until(self, *types: str, within: float = 10.0) -> Event | None:
        """The next event of one of ``types`` (others are skipped); None when closed."""
        deadline = time.monotonic() + within
        while True:
            event = await self.next(max(0.01, deadline - time.monotonic()))
            if event is None or event.get("type") in types:
                return event

    async def send(self, event: Event | str | bytes) -> None:
        await self.ws.send(event if isinstance(event, str | bytes) else json.dumps(event))

    async def closed(self, within: float = 10.0) -> int | None:
        """Wait for the close; its code."""
        with contextlib.suppress(TimeoutError):
            while await self.next(within) is not None:
                pass
        await asyncio.wait_for(self._reader, within)
        return self.close_code

    async def alive(self) -> bool:
        """A round trip: session.update answered with session.updated."""
        while not self.events.empty():  # what came before the question
            if self.events.get_nowait() is None:
                self.events.put_nowait(None)
                return False
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            await self.send({"type": "session.update",
                             "session": {"type": "realtime", "instructions": "still here"}})
            got = await self.until("session.updated", within=5.0)
            return got is not None
        return False

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


@contextlib.asynccontextmanager
async def session(server: Server, key: str, query: str = "") -> AsyncIterator[Conn]:
    """A connection with ``key`` as a Bearer token (open until the block ends)."""
    ws = await connect(server.ws_url + query, proxy=None, open_timeout=10,
                       additional_headers={"Authorization": f"Bearer {key}"} if key else {},
                       max_size=None)
    conn = Conn(ws)
    try:
        yield conn
    finally:
        await conn.aclose()


async def refusal(server: Server, key: str) -> tuple[str | None, int | None]:
    """Connect and expect a refusal: (the error event's code, the close code)."""
    async with session(server, key) as conn:
        first = await conn.next()
        code = None if first is None else (first.get("error") or {}).get("code")
        return code, await conn.closed()


async def handshake_status(server: Server, key: str, query: str = "") -> int | None:
    """A WebSocket handshake with ``key``: the HTTP status of a refusal, None if accepted."""
    try:
        async with session(server, key, query):
            return None
    except InvalidStatus as exc:
        return exc.response.status_code


class Neighbour:
    """A session of the standard key that keeps talking (so it is never idle) and checks
    at the end that it is still open and answering."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.pings = 0
        self._task = asyncio.create_task(self._ping())

    async def _ping(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(0.4)
                await self.conn.send({"type": "session.update",
                                      "session": {"type": "realtime"}})
                self.pings += 1

    async def unaffected(self) -> bool:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.conn.close_code is None and await self.conn.alive()


@contextlib.asynccontextmanager
async def neighbour(server: Server) -> AsyncIterator[Neighbour]:
    async with session(server, server.keys["default"]) as conn:
        created = await conn.until("session.created")
        assert created is not None, "the neighbour session was not created"
        yield Neighbour(conn)
