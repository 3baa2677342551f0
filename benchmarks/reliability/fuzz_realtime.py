"""Fuzzing the Realtime WebSocket (``/v1/realtime``, also as a WebRTC call's sideband).

Each fuzzed frame is followed by a *probe* (``conversation.item.retrieve`` of an item
that does not exist, with its own ``event_id``). The session handles frames in order, so
everything the server said about the fuzzed frame arrives before the probe's
``item_not_found``: that window is judged by the case's expectation (``fuzz_cases``),
and a probe left unanswered means the session stopped answering. A *bystander* session
on the same server adds an item every second throughout, and ends with a real reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from benchmarks.reliability.fuzz_cases import Case
from benchmarks.reliability.fuzz_oracle import CLEAN_CLOSES, PARSE_CODES, Tally, bad_error

PROBE_S = 30.0  # the longest a probe may wait (a huge frame is parsed first)
# The event each request type is answered with (besides an error); the others (append,
# response.*, output_audio_buffer.clear) answer later or not at all by design.
REPLIES = {
    "session.update": ("session.updated",),
    "input_audio_buffer.commit": ("input_audio_buffer.committed",),
    "input_audio_buffer.clear": ("input_audio_buffer.cleared",),
    "conversation.item.create": ("conversation.item.added", "conversation.item.done"),
    "conversation.item.delete": ("conversation.item.deleted",),
    "conversation.item.retrieve": ("conversation.item.retrieved",),
    "conversation.item.truncate": ("conversation.item.truncated",),
}

Connect = Callable[[], Awaitable[ClientConnection]]


class Closed(Exception):
    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed {code} {reason!r}")
        self.code, self.reason = code, reason


def realtime_connect(ws_url: str, api_key: str, query: str = "") -> Connect:
    async def open_() -> ClientConnection:
        ws = await connect(f"{ws_url}/v1/realtime{query}", max_size=None, open_timeout=20,
                           additional_headers={"Authorization": f"Bearer {api_key}"},
                           ping_interval=None, close_timeout=5)
        if not query:  # a new session starts with session.created
            await _until(ws, lambda e: e.get("type") == "session.created", PROBE_S)
        return ws
    return open_


async def _recv(ws: ClientConnection, limit_s: float) -> dict[str, Any]:
    try:
        raw = await asyncio.wait_for(ws.recv(), limit_s)
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        raise Closed(None if rcvd is None else rcvd.code,
                     "" if rcvd is None else rcvd.reason) from None
    event: dict[str, Any] = json.loads(raw)
    return event


async def _until(ws: ClientConnection, match: Callable[[dict[str, Any]], bool],
                 limit_s: float) -> list[dict[str, Any]]:
    """Events up to and including the first that matches (TimeoutError after timeout)."""
    deadline = time.monotonic() + limit_s
    seen = []
    while True:
        event = await _recv(ws, max(0.01, deadline - time.monotonic()))
        seen.append(event)
        if match(event):
            return seen


async def _each(cases: Iterable[Case] | AsyncIterable[Case]) -> AsyncIterator[Case]:
    if isinstance(cases, AsyncIterable):
        async for case in cases:
            yield case
    else:
        for case in cases:
            yield case


def _answers(probe_id: str) -> Callable[[dict[str, Any]], bool]:
    def match(event: dict[str, Any]) -> bool:
        err = event.get("error")
        return (event.get("type") == "error" and isinstance(err, dict)
                and err.get("event_id") == probe_id)
    return match


def judge(case: Case, window: list[dict[str, Any]]) -> str | None:
    """Why the events answering ``case`` are wrong (None: they are right)."""
    errors = [e for e in window if e.get("type") == "error"]
    for event in errors:
        why = bad_error(event)
        if why is not None:
            return why
    # An error names the event it answers when the event had a readable event_id (not
    # when the frame was not JSON at all); one naming another event is not about this one.
    mine = [e for e in errors if e["error"].get("event_id") in (None, case.event_id)]
    codes = {e["error"]["code"] for e in mine}
    if case.expect == "error":
        return None if mine else "bad input not answered by an error event"
    if case.expect == "ok":
        wrong = codes & PARSE_CODES
        if case.label != "conversation.item.truncate" and "invalid_value" in codes:
            wrong.add("invalid_value")
        if wrong:
            return f"valid event refused ({', '.join(sorted(wrong))})"
    replies = REPLIES.get(case.label)
    if replies and not mine and not any(e.get("type") in replies for e in window):
        return f"no {replies[0]} and no error"
    return None


async def fuzz_session(open_: Connect, cases: Iterable[Case] | AsyncIterable[Case],
                       tally: Tally, probe_prefix: str) -> None:
    """Replay ``cases`` on one connection, reconnecting after each clean close."""
    ws: ClientConnection | None = None
    n = 0
    try:
        async for case in _each(cases):
            n += 1
            if ws is None:
                try:
                    ws = await open_()
                except (OSError, InvalidStatus, Closed, TimeoutError) as exc:
                    tally.crash("could not reconnect", exc)
                    return
            probe_id = f"{probe_prefix}{n}"
            tally.events += 1
            try:
                await ws.send(case.frame)
                await ws.send(json.dumps({"type": "conversation.item.retrieve",
                                          "item_id": "item_fuzz_probe", "event_id": probe_id}))
                window = await _until(ws, _answers(probe_id), PROBE_S)
            except (Closed, ConnectionClosed) as exc:
                code = exc.code if isinstance(exc, Closed) else (
                    exc.rcvd.code if exc.rcvd is not None else None)
                if code in CLEAN_CLOSES:
                    tally.clean_closes += 1
                else:
                    tally.crash(f"connection dropped ({code}) after {case.label}", case.frame)
                ws = None
                continue
            except TimeoutError:
                tally.crash(f"session stopped answering after {case.label}", case.frame)
                await ws.close()
                ws = None
                continue
            window.pop()  # the probe's own answer
            why = judge(case, window)
            if any(e.get("type") == "error" for e in window):
                tally.errors += 1
            if why is not None:
                tally.crash(f"{case.label}/{case.expect}: {why}", case.frame)
    finally:
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()


class Bystander:
    """A well-behaved session on the fuzzed server: it must keep working throughout (an
    item added and deleted every second, and once more when the fuzzing ends), and at the
    end get a real reply."""

    def __init__(self, open_: Connect) -> None:
        self._open = open_
        self.checks = 0
        self.failures: list[str] = []
        self.turn = ""

    async def run(self, stop: asyncio.Event) -> None:
        try:
            ws = await self._open()
        except Exception as exc:  # reported as the bystander's failure
            self.failures.append(f"bystander could not connect: {exc!r}")
            return
        try:
            n = 0
            while not stop.is_set():
                n += 1
                await self._item(ws, n)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            await self._item(ws, n + 1)  # after the fuzzing too, however short it was
            await self._reply(ws)
        except (Closed, ConnectionClosed, TimeoutError) as exc:
            self.failures.append(f"bystander session broke: {exc!r}")
        finally:
            await ws.close()

    async def _item(self, ws: ClientConnection, n: int) -> None:
        item_id = f"item_bystander{n}"
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "id": item_id,
            "content": [{"type": "input_text", "text": f"note {n}"}]}}))
        seen = await _until(ws, lambda e: e.get("type") in ("conversation.item.done", "error")
                            and (e.get("item") or {}).get("id", item_id) == item_id, PROBE_S)
        if seen[-1].get("type") == "error":
            self.failures.append(f"bystander item {n} refused: {seen[-1]}")
            return
        # ... and deletes it again: a long run stays under the session's item limit.
        await ws.send(json.dumps({"type": "conversation.item.delete", "item_id": item_id}))
        seen = await _until(ws, lambda e: e.get("type") in ("conversation.item.deleted",
                                                            "error"), PROBE_S)
        if seen[-1].get("type") == "error":
            self.failures.append(f"bystander item {n} not deleted: {seen[-1]}")
            return
        self.checks += 1

    async def _reply(self, ws: ClientConnection) -> None:
        """A real turn: a question as text, a reply (text) from the LLM."""
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Say hello in three words."}]}}))
        await ws.send(json.dumps({"type": "response.create", "response": {
            "output_modalities": ["text"], "max_output_tokens": 24}}))
        seen = await _until(ws, lambda e: e.get("type") == "response.done", 120.0)
        done = seen[-1]["response"]
        text = "".join(e.get("delta", "") for e in seen
                       if e.get("type") == "response.output_text.delta")
        self.checks += 1
        self.turn = text.strip()
        # A reply cut at its max_output_tokens is still a real, answered turn.
        cut = (done.get("status_details") or {}).get("reason") == "max_output_tokens"
        if not (done.get("status") == "completed" or cut) or not self.turn:
            self.failures.append(f"bystander reply {done.get('status')}: "
                                 f"{done.get('status_details')} text={text!r}")
