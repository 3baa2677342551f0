"""Resume across two ``cascade serve`` processes sharing a real redis-server.

Process A holds a conversation, is killed (SIGKILL, no goodbye); the client reconnects to
process B with its session id and resume token and finds every item. A wrong token is
refused. Raw WebSocket client: the resume parameters are cascade's extension.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from orchestrator.launcher import CascadeProcess
from tests.support.realtime_client import ws_url
from tests.support.redis_server import redis_server

KEY = "resume-key"


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[CascadeProcess, CascadeProcess]]:
    with redis_server() as url:
        a = CascadeProcess("serve-a", ["serve"], "--api-key", KEY, "--redis-url", url)
        b = CascadeProcess("serve-b", ["serve"], "--api-key", KEY, "--redis-url", url)
        try:
            a.wait_ready(180)
            b.wait_ready(180)
            yield a, b
        finally:
            a.stop()
            b.stop()


async def recv_type(ws: ClientConnection, kind: str) -> dict[str, Any]:
    while True:
        event = json.loads(await ws.recv())
        if event["type"] == kind:
            return event  # type: ignore[no-any-return]
        assert event["type"] != "error", event


async def test_conversation_survives_the_loss_of_its_process(
        servers: tuple[CascadeProcess, CascadeProcess]) -> None:
    a, b = servers
    headers = {"Authorization": f"Bearer {KEY}"}
    texts = ["My name is Ada.", "I live in Lyon.", "Remember both, please."]
    async with connect(ws_url(a), additional_headers=headers) as ws:
        session = (await recv_type(ws, "session.created"))["session"]
        sid, token = session["id"], session["cascade"]["resume_token"]
        ids = []
        for text in texts:
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": text}]}}))
            ids.append((await recv_type(ws, "conversation.item.done"))["item"]["id"])
        a.proc.send_signal(signal.SIGKILL)  # the replica dies mid-conversation
        a.proc.wait(10)

    async with connect(ws_url(b, session_id=sid, resume_token=token),
                       additional_headers=headers) as ws:
        resumed = (await recv_type(ws, "session.created"))["session"]
        assert resumed["id"] == sid
        for item_id, text in zip(ids, texts, strict=True):
            await ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": item_id}))
            item = (await recv_type(ws, "conversation.item.retrieved"))["item"]
            assert item["content"][0]["text"] == text
        # the conversation goes on where it was: a new item lands after the old ones
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "What is my name?"}]}}))
        done = await recv_type(ws, "conversation.item.done")
        assert done["previous_item_id"] == ids[-1]


async def test_a_wrong_resume_token_is_refused(
        servers: tuple[CascadeProcess, CascadeProcess]) -> None:
    _a, b = servers
    headers = {"Authorization": f"Bearer {KEY}"}
    async with connect(ws_url(b), additional_headers=headers) as ws:
        sid = (await recv_type(ws, "session.created"))["session"]["id"]
    async with connect(ws_url(b, session_id=sid, resume_token="not-the-token"),
                       additional_headers=headers) as ws:
        event = json.loads(await ws.recv())
        assert event["type"] == "error"
        assert event["error"]["code"] == "invalid_resume_token"
        with pytest.raises(ConnectionClosed):
            await ws.recv()
