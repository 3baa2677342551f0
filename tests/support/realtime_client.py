"""A raw-WebSocket Realtime client for end-to-end tests against real processes.

One connection; a reader task stamps every server event on arrival; the user speaks piper
speech as 20 ms ``input_audio_buffer.append`` frames; every wait is bounded so a
regression fails instead of hanging. Used by the stage-fault and replica-failover tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from orchestrator import audio_codecs
from orchestrator.launcher import CascadeProcess
from tests.support.speech import piper_clip

RATE = 24_000  # the session's default input format: audio/pcm, 24 kHz
TURN_S = 90.0  # a whole turn, speech to response.done, when nothing is wrong
SETTLE_S = 1.0  # after a reply: the client's queued audio plays out (no barge-in)

Event = dict[str, Any]
Stamped = tuple[float, Event]  # (time.monotonic() at arrival, event)


class Client:
    """One Realtime connection; a reader task stamps every server event on arrival."""

    def __init__(self, ws: ClientConnection, logs: Callable[[], str]) -> None:
        self.ws = ws
        self._logs = logs
        self.close_code: int | None = None
        self._inbox: asyncio.Queue[Stamped | None] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self._inbox.put_nowait((time.monotonic(), json.loads(raw)))
        except ConnectionClosed as closed:
            self.close_code = None if closed.rcvd is None else closed.rcvd.code
        finally:
            self._inbox.put_nowait(None)

    def drain(self) -> list[Stamped]:
        """Events that arrived since the last wait (left over from the previous turn)."""
        out: list[Stamped] = []
        while not self._inbox.empty():
            got = self._inbox.get_nowait()
            if got is None:
                self._inbox.put_nowait(None)
                break
            out.append(got)
        return out

    async def until(self, *types: str, limit_s: float) -> list[Stamped]:
        """Every event up to and including the first of one of ``types``."""
        seen: list[Stamped] = []

        async def read() -> None:
            while True:
                got = await self._inbox.get()
                if got is None:
                    self._inbox.put_nowait(None)
                    raise AssertionError(f"connection closed ({self.close_code}) while "
                                         f"waiting for {types}; saw {kinds(seen)}")
                seen.append(got)
                if got[1]["type"] in types:
                    return

        try:
            await asyncio.wait_for(read(), limit_s)
        except TimeoutError:
            raise AssertionError(f"no {types} within {limit_s:g} s; saw {kinds(seen)}\n"
                                 f"{self._logs()}") from None
        return seen

    async def configure(self, session: dict[str, Any]) -> None:
        await self.ws.send(json.dumps({"type": "session.update",
                                       "session": {"type": "realtime", **session}}))
        await self.until("session.updated", limit_s=10)

    async def speak(self, text: str, speedup: float = 2.0) -> None:
        """``text`` as piper speech, 20 ms appends at ``speedup`` x real time, then 1.5 s
        of silence (the endpoint comes after 0.5 s of it)."""
        pcm = piper_clip(text, RATE)
        audio = np.concatenate([np.zeros(RATE // 5, np.int16), pcm,
                                np.zeros(RATE * 3 // 2, np.int16)])
        frame = RATE // 50
        for i in range(0, audio.size, frame):
            payload = audio_codecs.encode_base64(audio[i:i + frame], "audio/pcm")
            await self.ws.send(json.dumps({"type": "input_audio_buffer.append",
                                           "audio": payload}))
            await asyncio.sleep(0.02 / speedup)

    def start_speaking(self, text: str, speedup: float = 2.0) -> asyncio.Task[None]:
        return asyncio.create_task(self.speak(text, speedup), name="speak")

    def logs(self) -> str:
        """The server's (and its stages') log tails, for failure messages."""
        return self._logs()


def ws_url(proc: CascadeProcess, **query: str) -> str:
    """The Realtime WebSocket URL of a ``cascade serve`` process, with extra query
    parameters (``session_id``, ``resume_token``, ...)."""
    q = "&".join(f"{k}={v}" for k, v in {"model": "cascade", **query}.items())
    return f"ws://127.0.0.1:{proc.port}/v1/realtime?{q}"


def kinds(events: list[Stamped]) -> list[str]:
    return [e["type"] for _, e in events]


def of(events: list[Stamped], kind: str) -> list[Event]:
    return [e for _, e in events if e["type"] == kind]


def arrival(events: list[Stamped], kind: str) -> float:
    """When the first event of ``kind`` arrived."""
    return next(t for t, e in events if e["type"] == kind)


async def finished(task: asyncio.Task[None]) -> None:
    """The speaking task ends (it only sends; bounded like every wait)."""
    await asyncio.wait_for(task, 60)


@contextlib.asynccontextmanager
async def speaking(client: Client, text: str, speedup: float = 2.0
                   ) -> AsyncIterator[asyncio.Task[None]]:
    """The user speaks ``text`` in the background; a failed test stops the speech, so
    it cannot spill into the next test's turn."""
    task = client.start_speaking(text, speedup)
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


TRANSCRIBED = "conversation.item.input_audio_transcription.completed"
NOT_TRANSCRIBED = "conversation.item.input_audio_transcription.failed"


def answered(response: Event) -> bool:
    """The reply was given: ``completed``, or cut at the session's ``max_output_tokens``
    (``SHORT`` keeps replies brief, and a small LLM sometimes runs past it)."""
    details = response["status_details"] or {}
    return response["status"] == "completed" or (
        response["status"] == "incomplete" and details.get("reason") == "max_output_tokens")


async def answered_turn(client: Client, text: str) -> list[Stamped]:
    """A spoken turn that must be transcribed and answered with audio, error-free."""
    client.drain()
    async with speaking(client, text) as speech:
        events = await client.until("response.done", limit_s=TURN_S)
        await finished(speech)
    transcripts = of(events, TRANSCRIBED)
    assert transcripts and transcripts[0]["transcript"].strip(), (kinds(events), client.logs())
    response = events[-1][1]["response"]
    assert answered(response), (
        f"{response['status']}: {response['status_details']}\n{client.logs()}")
    assert of(events, "response.output_audio.delta"), kinds(events)
    assert not of(events, "error"), of(events, "error")
    await asyncio.sleep(SETTLE_S)
    return events


def assert_failed_response(events: list[Stamped], codes: set[str] | None = None) -> str:
    """The response ended ``failed`` with a reason, after an ``error`` event with the same
    code (a name, like every Realtime error code); returns the code."""
    done = events[-1][1]
    assert done["type"] == "response.done"
    response = done["response"]
    assert response["status"] == "failed", response
    error = response["status_details"]["error"]
    code: str = error["code"]
    assert error["message"], error
    assert re.fullmatch(r"[a-z][a-z0-9_]*", code), f"not an error code name: {error}"
    if codes is not None:
        assert code in codes, error
    assert code in [e["error"]["code"] for e in of(events, "error")], kinds(events)
    return code
