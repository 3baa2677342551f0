"""A resumed session fences its old connection: two ``cascade serve`` processes, one redis.

Connection A (process 1) holds a conversation; connection B (process 2) resumes it with
the session id and resume token. From then on the session is B's: A's next write is
refused by the store itself (the lease is compared with the writer inside the Redis
script), A is told (``session_taken_over``) and closed with 1008, nothing of A's reaches
the conversation, and B carries on.

Process 1 renews its leases only every 20 s (``CASCADE_STORE_LEASE_TTL_S=60``), so A's
late write below happens long before its renewal could notice the takeover: the write
fence alone must stop it. Process 2 renews every second (a 3 s lease), so a connection
there that stays silent learns of a takeover within a few seconds.

Only text items are written, so no stage is ever called: the processes run distributed
with stage URLs on a closed port (no models to load; the LLM's context window is then
unknown, which a session tolerates).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from orchestrator.launcher import CascadeProcess, free_port
from tests.support.realtime_client import ws_url
from tests.support.redis_server import redis_server

KEY = "takeover-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
WAIT_S = 20.0  # bound on every single wait: a regression fails instead of hanging
CLOSE_POLICY = 1008


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[CascadeProcess, CascadeProcess]]:
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens: stages are never used
    stages = ("--asr-url", nowhere, "--llm-url", nowhere, "--tts-url", nowhere)
    with redis_server() as url:
        procs: list[CascadeProcess] = []
        try:
            with pytest.MonkeyPatch.context() as env:  # the child copies os.environ
                env.setenv("CASCADE_STORE_LEASE_TTL_S", "60")
                procs.append(CascadeProcess("serve-1", ["serve"], "--api-key", KEY,
                                            "--redis-url", url, *stages))
                env.setenv("CASCADE_STORE_LEASE_TTL_S", "3")
                procs.append(CascadeProcess("serve-2", ["serve"], "--api-key", KEY,
                                            "--redis-url", url, *stages))
            for proc in procs:
                proc.wait_ready(120)
            yield procs[0], procs[1]
        finally:
            for proc in procs:
                proc.stop()


async def next_event(ws: ClientConnection) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
    return event


async def recv_type(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The next event of type ``kind``; any ``error`` before it fails the test."""
    while True:
        event = await next_event(ws)
        if event["type"] == kind:
            return event
        assert event["type"] != "error", event


async def recv_error(ws: ClientConnection) -> dict[str, Any]:
    while True:
        event = await next_event(ws)
        if event["type"] == "error":
            return event
        assert not event["type"].startswith("conversation.item"), event


async def close_code(ws: ClientConnection) -> int | None:
    """Read until the server closes the connection; the close code it sent."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            event = await next_event(ws)
            assert not event["type"].startswith("conversation.item"), event
    return None if closed.value.rcvd is None else closed.value.rcvd.code


async def create_item(ws: ClientConnection, item_id: str, text: str) -> None:
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "id": item_id, "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": text}]}}))


async def retrieve(ws: ClientConnection, item_id: str) -> dict[str, Any]:
    """The item (``conversation.item.retrieved``) or the ``error`` event refusing it."""
    await ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": item_id}))
    while True:
        event = await next_event(ws)
        if event["type"] in ("conversation.item.retrieved", "error"):
            return event


async def test_the_old_connection_cannot_write_after_a_takeover(
        servers: tuple[CascadeProcess, CascadeProcess]) -> None:
    first, second = servers
    async with connect(ws_url(first), additional_headers=HEADERS) as a:
        session = (await recv_type(a, "session.created"))["session"]
        sid, token = session["id"], session["cascade"]["resume_token"]
        await create_item(a, "item_a_before", "Before the takeover.")
        await recv_type(a, "conversation.item.done")

        async with connect(ws_url(second, session_id=sid, resume_token=token),
                           additional_headers=HEADERS) as b:
            assert (await recv_type(b, "session.created"))["session"]["id"] == sid
            # A is still connected and its lease renewal is 20 s away: it writes.
            await create_item(a, "item_a_late", "A late write of the old connection.")
            error = (await recv_error(a))["error"]
            assert error["code"] == "session_taken_over", error
            assert await close_code(a) == CLOSE_POLICY

            # B owns the conversation: A's late item is not in it, A's earlier one is.
            refused = await retrieve(b, "item_a_late")
            assert refused["type"] == "error"
            assert refused["error"]["code"] == "item_not_found", refused
            kept = await retrieve(b, "item_a_before")
            assert kept["type"] == "conversation.item.retrieved", kept
            assert kept["item"]["content"][0]["text"] == "Before the takeover."
            # ... and B keeps working: its own write lands after A's earlier item.
            await create_item(b, "item_b", "After the takeover.")
            done = await recv_type(b, "conversation.item.done")
            assert done["item"]["id"] == "item_b"
            assert done["previous_item_id"] == "item_a_before"

    # What the store holds (a fresh resume reads it back): B's item, never A's late one.
    async with connect(ws_url(first, session_id=sid, resume_token=token),
                       additional_headers=HEADERS) as c:
        await recv_type(c, "session.created")
        assert (await retrieve(c, "item_a_late"))["type"] == "error"
        for item_id in ("item_a_before", "item_b"):
            found = await retrieve(c, item_id)
            assert found["type"] == "conversation.item.retrieved", found
        await create_item(c, "item_c", "Still the same conversation.")
        assert (await recv_type(c, "conversation.item.done"))["previous_item_id"] == "item_b"


async def test_a_silent_old_connection_is_told_and_closed(
        servers: tuple[CascadeProcess, CascadeProcess]) -> None:
    """The old connection only listens (say, to a reply): the lease renewal that finds
    the session taken over tells it and closes it, without waiting for it to write."""
    first, second = servers
    async with connect(ws_url(second), additional_headers=HEADERS) as old:
        session = (await recv_type(old, "session.created"))["session"]
        sid, token = session["id"], session["cascade"]["resume_token"]
        async with connect(ws_url(first, session_id=sid, resume_token=token),
                           additional_headers=HEADERS) as new:
            await recv_type(new, "session.created")
            # Process 2 renews every second; the old connection sends nothing at all.
            error = (await recv_error(old))["error"]
            assert error["code"] == "session_taken_over", error
            assert await close_code(old) == CLOSE_POLICY
            await create_item(new, "item_new", "The new connection owns it.")
            assert (await recv_type(new, "conversation.item.done"))["item"]["id"] == "item_new"
