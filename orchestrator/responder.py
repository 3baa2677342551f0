"""Streams one released ``ReplyRun`` to the client as Realtime response events.

Event order follows OpenAI's: response.created -> output_item.added -> (conversation item
added) -> content_part.added -> per phrase: output_audio_transcript.delta with the phrase's
text, then its audio as paced output_audio.delta slices -> the *.done events ->
output_item.done -> response.done. Text-only sessions get output_text.delta instead.

Cancellation (barge-in, response.cancel) keeps the words the listener heard: the item's
transcript is cut to ``Playout.heard_text()`` and the response ends ``cancelled``.

Failure: a stage that fails or misses its deadline (``ReplyDone.error``) ends the response
``failed`` with the reason, after an ``error`` event. Any other failure while streaming
(the conversation's item limit, a store error while announcing the item, a bug) does the
same: the run is cancelled and the client always gets its ``response.done``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypedDict

import numpy as np

from orchestrator import audio_codecs
from orchestrator.playout import AudioOut, Playout
from orchestrator.protocol import (
    ContentPart,
    ConversationItem,
    ConversationItemTruncatedEvent,
    ErrorDetail,
    ErrorEvent,
    FunctionCallItem,
    MessageItem,
    Part,
    Response,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseDoneEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseOutputAudioDeltaEvent,
    ResponseOutputAudioDoneEvent,
    ResponseOutputAudioTranscriptDeltaEvent,
    ResponseOutputAudioTranscriptDoneEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputTextDeltaEvent,
    ResponseOutputTextDoneEvent,
    StatusDetails,
    Usage,
    new_item_id,
)
from orchestrator.protocol.response import StatusError
from orchestrator.protocol.server_events import ServerEventBase
from orchestrator.reply import ReplyAudio, ReplyDone, ReplyRun, ReplyText, ReplyToolCall
from stages.llm.types import ToolCallDelta

log = logging.getLogger(__name__)

@dataclass
class _Call:
    item: FunctionCallItem
    index: int
    arguments: str = ""


def new_call_id() -> str:
    return "call_" + secrets.token_hex(8)


class _Ids(TypedDict):
    response_id: str
    item_id: str
    output_index: int
    content_index: int


Status = Literal["completed", "cancelled", "incomplete", "failed"]
CancelReason = Literal["turn_detected", "client_cancelled"]
Send = Callable[[ServerEventBase], Awaitable[None]]
ItemHook = Callable[[MessageItem | FunctionCallItem], Awaitable[None]]


class Responder:
    """One response: owns the assistant item and the playout of its audio."""

    def __init__(self, run: ReplyRun, *, send: Send, on_item_added: ItemHook,
                 on_item_done: ItemHook, audio_format: str, audio: bool = True,
                 lead_ms: float = 300.0,
                 audio_out: Callable[[str], AudioOut] | None = None) -> None:
        self.run = run
        self._send = send
        self._on_item_added = on_item_added
        self._on_item_done = on_item_done
        self._format = audio_format
        self._audio = audio
        self.response = Response(output_modalities=["audio" if audio else "text"])
        # Where the audio goes: WebSocket events by default, or the transport's own port
        # (a WebRTC call's track), which then emits no output_audio.delta events.
        self.playout: AudioOut = (
            audio_out(self.response.id) if audio_out is not None
            else Playout(audio_codecs.sample_rate(audio_format), lead_ms=lead_ms))
        self.rate = self.playout.sample_rate
        self.item = MessageItem(id=new_item_id(), role="assistant", status="in_progress",
                                content=[], object="realtime.item")
        self._message_open = False  # the message item is announced with its first content
        self._calls: dict[int, _Call] = {}  # function calls by the LLM's tool-call index
        self._next_output = 0
        self._message_index = 0
        self.spoken = ""  # transcript of the audio sent so far
        self.text = ""
        self._task: asyncio.Task[None] | None = None
        self.cancel_reason: CancelReason = "client_cancelled"
        self._cut_ms: float | None = None

    @property
    def first_audio_at(self) -> float | None:
        """When the first reply audio went out (time.monotonic)."""
        return self.playout.first_audio_at

    @property
    def item_id(self) -> str:
        return self.item.id or ""

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._stream(), name=f"respond-{self.response.id}")
        return self._task

    @property
    def done(self) -> bool:
        return self._task is None or self._task.done()

    async def cancel(self, reason: CancelReason, audio_end_ms: float | None = None) -> None:
        """Stop now (``turn_detected`` or ``client_cancelled``); keeps what was heard up to
        ``audio_end_ms`` (default: the estimated playback position now). A barge-in
        (``turn_detected``) also announces the truncation, before ``response.done``."""
        self.cancel_reason = reason
        self._cut_ms = audio_end_ms
        self.playout.clear()  # what the server still holds is never played
        await self.run.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # ------------------------------------------------------------------ streaming
    def _ids(self) -> _Ids:
        return {"response_id": self.response.id, "item_id": self.item_id,
                "output_index": self._message_index, "content_index": 0}

    async def _open_message(self) -> None:
        if self._message_open:
            return
        self._message_open = True
        self._message_index = self._next_output
        self._next_output += 1
        await self._send(ResponseOutputItemAddedEvent(response_id=self.response.id,
                                                      output_index=self._message_index,
                                                      item=self.item))
        await self._on_item_added(self.item)
        part_type: Literal["audio", "text"] = "audio" if self._audio else "text"
        await self._send(ResponseContentPartAddedEvent(
            **self._ids(), part=Part(type=part_type, transcript="" if self._audio else None,
                                     text=None if self._audio else "")))

    async def _tool_call(self, deltas: list[ToolCallDelta]) -> None:
        for delta in deltas:
            call = self._calls.get(delta.index)
            if call is None:
                name = delta.function.name if delta.function and delta.function.name else ""
                call = _Call(FunctionCallItem(
                    id=new_item_id(), call_id=delta.id or new_call_id(), name=name,
                    arguments="", status="in_progress", object="realtime.item"),
                    self._next_output)
                self._next_output += 1
                self._calls[delta.index] = call
                await self._send(ResponseOutputItemAddedEvent(
                    response_id=self.response.id, output_index=call.index, item=call.item))
                await self._on_item_added(call.item)
            piece = delta.function.arguments if delta.function else None
            if piece:
                call.arguments += piece
                await self._send(ResponseFunctionCallArgumentsDeltaEvent(
                    response_id=self.response.id, item_id=call.item.id or "",
                    output_index=call.index, call_id=call.item.call_id or "", delta=piece))

    async def _finish_calls(self) -> None:
        for call in self._calls.values():
            item = call.item.model_copy(update={"arguments": call.arguments,
                                                "status": "completed"})
            call.item = item
            await self._send(ResponseFunctionCallArgumentsDoneEvent(
                response_id=self.response.id, item_id=item.id or "", output_index=call.index,
                call_id=item.call_id or "", name=item.name, arguments=call.arguments))
            await self._send(ResponseOutputItemDoneEvent(response_id=self.response.id,
                                                         output_index=call.index, item=item))
            await self._on_item_done(item)

    async def _stream(self) -> None:
        await self._send(ResponseCreatedEvent(response=self.response))
        usage: Usage | None = None
        status: Status = "completed"
        details: StatusDetails | None = None
        try:
            async for event in self.run.events():
                if isinstance(event, ReplyToolCall):
                    await self._tool_call(event.deltas)
                elif isinstance(event, ReplyText):
                    self.text += event.text
                    if not self._audio:
                        await self._open_message()
                        await self._send(ResponseOutputTextDeltaEvent(**self._ids(),
                                                                      delta=event.text))
                elif isinstance(event, ReplyAudio) and self._audio:
                    await self._open_message()
                    await self._send(ResponseOutputAudioTranscriptDeltaEvent(
                        **self._ids(), delta=event.chunk.text))
                    self.spoken += event.chunk.text
                    await self.playout.send(event.chunk, self._send_audio)
                elif isinstance(event, ReplyDone):
                    if event.usage is not None:
                        usage = Usage(input_tokens=event.usage.prompt_tokens,
                                      output_tokens=event.usage.completion_tokens,
                                      total_tokens=event.usage.total_tokens)
                    if event.error is not None:
                        status, details = await self._failed(
                            event.code or "stage_error", event.error)
                    elif event.finish_reason == "length":
                        status = "incomplete"
                        details = StatusDetails(type="incomplete", reason="max_output_tokens")
        except asyncio.CancelledError:
            status = "cancelled"
            details = StatusDetails(type="cancelled", reason=self.cancel_reason)
            await asyncio.shield(self._finish(status, details, usage))
            raise
        except Exception as exc:  # item limit, store error, a bug: fail this response only
            named = getattr(exc, "code", None)
            code = named if isinstance(named, str) and named else "server_error"
            await self.run.cancel()
            status, details = await self._failed(code, str(exc) or type(exc).__name__)
        await self._finish(status, details, usage)

    async def _failed(self, code: str, message: str) -> tuple[Status, StatusDetails]:
        """Tell the client why (an ``error`` event), and the ``failed`` status to end on."""
        log.warning("response %s failed: %s: %s", self.response.id, code, message)
        await self._send(ErrorEvent(error=ErrorDetail(type="server_error", code=code,
                                                      message=message, param=None,
                                                      event_id=None)))
        return "failed", StatusDetails(type="failed", error=StatusError(
            type="server_error", code=code, message=message))

    async def _send_audio(self, pcm16: bytes) -> None:
        samples = np.frombuffer(pcm16, dtype="<i2")
        await self._send(ResponseOutputAudioDeltaEvent(
            **self._ids(), delta=audio_codecs.encode_base64(samples, self._format)))

    async def _finish(self, status: Status, details: StatusDetails | None,
                      usage: Usage | None) -> None:
        """The *.done events and ``response.done``, which the client always gets, even
        when recording the items fails."""
        cancelled = status == "cancelled"
        try:
            await self._finish_calls()
            if self._message_open:
                await self._finish_message(cancelled)
        except Exception as exc:
            log.warning("response %s: finishing its items failed: %r", self.response.id, exc)
            if status != "failed":
                named = getattr(exc, "code", None)
                status, details = await self._failed(
                    named if isinstance(named, str) and named else "server_error", str(exc))
        outputs: list[ConversationItem] = [c.item for c in self._calls.values()]
        if self._message_open:
            outputs.insert(0, self.item)
        self.response = self.response.model_copy(update={
            "status": status, "status_details": details, "output": outputs, "usage": usage})
        await self._send(ResponseDoneEvent(response=self.response))
        self.playout.finish()

    async def _finish_message(self, cancelled: bool) -> None:
        transcript = self.spoken
        if cancelled:
            cut_ms = self.playout.played_ms() if self._cut_ms is None else self._cut_ms
            transcript = self.playout.heard_text(cut_ms)
            if self.cancel_reason == "turn_detected" and self._audio:
                await self._send(ConversationItemTruncatedEvent(
                    item_id=self.item_id, content_index=0, audio_end_ms=int(cut_ms)))
        if self._audio:
            await self._send(ResponseOutputAudioDoneEvent(**self._ids()))
            await self._send(ResponseOutputAudioTranscriptDoneEvent(
                **self._ids(), transcript=transcript))
            content = ContentPart(type="output_audio", transcript=transcript)
            part = Part(type="audio", transcript=transcript)
        else:
            text = self.text
            await self._send(ResponseOutputTextDoneEvent(**self._ids(), text=text))
            content = ContentPart(type="output_text", text=text)
            part = Part(type="text", text=text)
        await self._send(ResponseContentPartDoneEvent(**self._ids(), part=part))
        self.item = self.item.model_copy(update={
            "content": [content], "status": "incomplete" if cancelled else "completed"})
        await self._send(ResponseOutputItemDoneEvent(response_id=self.response.id,
                                                     output_index=self._message_index,
                                                     item=self.item))
        await self._on_item_done(self.item)
