"""One Realtime API session: client events in, server events out.

The transport-independent core. Its ports: events in (:meth:`RealtimeSession.handle`,
called by one task at a time in arrival order), events out (the ``send`` callable), audio
in (:meth:`RealtimeSession.push_audio`, pcm at a known rate; the WebSocket's append
events feed the same path) and audio out (``media``: absent for the WebSocket, whose audio
travels in events; a WebRTC call's ``MediaPort`` otherwise, which owns pacing, clearing
and the played position). The WebSocket (``server.py``) and WebRTC (``webrtc/``)
transports are adapters over it. The session owns the conversation (mirrored to the
store, so another process can resume it), the input audio path (decode -> resample once
to 16 kHz -> turn controller) and the active response. Turn timing lives in ``turn.py``
and ``policy.py``; streaming a reply to the client in ``responder.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import TypeAdapter, ValidationError

from orchestrator import audio_codecs, metrics, tracing
from orchestrator.backends import Backends
from orchestrator.context import ContextOverflow, estimate_tools_tokens, fit_messages
from orchestrator.limits import TENANT_FIELD, check_resume_owner
from orchestrator.playout import AudioOut, MediaPort
from orchestrator.policy import SEMANTIC_EAGERNESS, OverlapPolicy
from orchestrator.protocol import (
    ContentPart,
    ConversationItem,
    ConversationItemAddedEvent,
    ConversationItemCreateEvent,
    ConversationItemDeletedEvent,
    ConversationItemDeleteEvent,
    ConversationItemDoneEvent,
    ConversationItemRetrievedEvent,
    ConversationItemRetrieveEvent,
    ConversationItemTruncatedEvent,
    ConversationItemTruncateEvent,
    ErrorDetail,
    ErrorEvent,
    EventEncoder,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputAudioBufferAppendEvent,
    InputAudioBufferClearedEvent,
    InputAudioBufferClearEvent,
    InputAudioBufferCommitEvent,
    InputAudioBufferCommittedEvent,
    InputAudioBufferSpeechStartedEvent,
    InputAudioBufferSpeechStoppedEvent,
    InputAudioTranscriptionCompletedEvent,
    InputAudioTranscriptionDeltaEvent,
    InputAudioTranscriptionFailedEvent,
    MessageItem,
    OutputAudioBufferClearEvent,
    ProtocolError,
    ResponseCancelEvent,
    ResponseConfig,
    ResponseCreateEvent,
    SessionCreatedEvent,
    SessionUpdatedEvent,
    SessionUpdateEvent,
    error_event,
    new_item_id,
    parse_client_event,
)
from orchestrator.protocol.server_events import (
    CascadeTurnTimingsEvent,
    ServerEventBase,
    TranscriptionDurationUsage,
    TranscriptionError,
)
from orchestrator.protocol.session import ServerVad, Session, SessionConfig, apply_update
from orchestrator.reply import ReplyRun
from orchestrator.responder import Responder
from orchestrator.settings import ServeSettings
from orchestrator.store import LeaseKeeper, LeaseLost, SessionStore, StoreError
from orchestrator.store.write_behind import WriteBehind
from orchestrator.turn import (
    BargeIn,
    ReplyCancelled,
    ReplyReleased,
    SpeechStarted,
    SpeechStopped,
    TranscriptDelta,
    TranscriptDone,
    TurnController,
    TurnEvent,
    VadLike,
)
from stages.common.aiter import closing
from stages.common.audio import (
    ASR_RATE,
    AudioFormatError,
    Pcm16StreamResampler,
)
from stages.llm.types import (
    ChatMessage,
    FunctionCall,
    FunctionSpec,
    LlmRequest,
    ToolCall,
    ToolSpec,
)
from stages.vad.batch import BatchedVadStream, batcher_for
from stages.vad.model import SileroVadModel

log = logging.getLogger(__name__)


DEFAULT_INSTRUCTIONS = "You are a helpful voice assistant. Answer briefly."


@dataclass
class TurnTiming:
    """Wall-clock (time.monotonic) milestones of one user turn, for metrics and the log."""

    eos: float | None = None  # the last voiced sample arrived
    endpoint: float | None = None
    first_delta: float | None = None
    final: float | None = None
    speculative_hit: bool | None = None
    # Speculative replies started in this turn (kept or not) and the work of those
    # thrown away.
    speculations: int = 0
    wasted_llm_tokens: int = 0
    wasted_tts_ms: float = 0.0
    # Why the turn ended ("silence", "semantic", "max_turn"; None: committed by the client)
    # and semantic_vad's last end-of-turn probability.
    endpoint_reason: str | None = None
    turn_probability: float | None = None


@dataclass
class UserTurn:
    """The session's side of one user turn (``turn.TurnController`` numbers them): its
    conversation item, whether the item was committed, and its timing."""

    item_id: str = field(default_factory=new_item_id)
    committed: bool = False
    timing: TurnTiming = field(default_factory=TurnTiming)


MAX_OPEN_TURNS = 8  # turns awaiting their transcript (normally one or two)
_ITEM = TypeAdapter(ConversationItem)
DEFAULT_MAX_TOKENS = 256
CLOSE_TAKEN_OVER = 1008  # policy: the session belongs to a newer connection now
CLOSE_RESTART = 1012  # service restart: resume the session on another server


async def _ignore(_item: MessageItem | FunctionCallItem) -> None:
    """Out-of-band responses (``conversation: "none"``) stay out of the conversation."""


class RealtimeSession:
    def __init__(self, *, backends: Backends, vad: SileroVadModel | None, store: SessionStore,
                 settings: ServeSettings, send: Callable[[str], Awaitable[None]],
                 beta: bool = False, make_vad: Callable[[], VadLike] | None = None,
                 close: Callable[[int, str], None] | None = None,
                 media: MediaPort | None = None) -> None:
        self._backends = backends
        if make_vad is None:
            if vad is None:
                raise ValueError("RealtimeSession needs a VAD model (or make_vad)")
            model = vad
            # Every session's frames share batched runs of the one model (stages/vad/batch.py).
            make_vad = lambda: BatchedVadStream(batcher_for(model))  # noqa: E731
        self._make_vad = make_vad
        self._store = store
        self._settings = settings
        self._send_text = send
        self._close = close  # ends the connection (after flushing what was sent)
        self._taking_over = False
        self._context_window: int | None = None  # LLM context in tokens (None: unknown)
        self._lease_watch: asyncio.Task[None] | None = None
        self._encoder = EventEncoder(beta)
        self.session = Session()
        self.session_id = ""
        self.items: list[ConversationItem] = []
        self._controller: TurnController | None = None
        self._media = media
        self._resamplers: dict[int, Pcm16StreamResampler] = {}  # input rate -> pipeline rate
        self._input_format = ""
        self._responder: Responder | None = None
        self._turns: dict[int, UserTurn] = {}  # open user turns by the controller's number
        self._manual_ms = 0.0  # manual turns: input audio since the last commit or clear
        self._audio_clock_start: float | None = None
        self._audio_received_ms = 0.0
        self._closed = False
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._prime_task: asyncio.Task[None] | None = None
        self._primed: str | None = None  # the instructions last sent to warm the LLM
        self._turn_prime: asyncio.Task[None] | None = None  # the user's words so far
        self._turn_prime_next: tuple[int, str] | None = None
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"
        self._lease: LeaseKeeper | None = None
        self._writes: WriteBehind | None = None  # item writes, in order, off the turn's path
        # The API key's name (limits.py) that owns the session, stored with its config; the
        # transport sets it before start (None: not recorded, as in tests).
        self.tenant: str | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self, *, resume_id: str | None = None,
                    resume_token: str | None = None,
                    configs: Sequence[SessionConfig] = ()) -> None:
        """Create (or resume) the session and announce it. ``configs`` (an ephemeral key's
        session, a WebRTC call's) are applied in order to a new session before it is
        announced; a resumed session keeps its stored config."""
        # The connection holds the session's lease while it lives; a reconnect with the
        # token takes it over (the old connection may be dead without having released it).
        if resume_id:
            if self.tenant is not None:  # another key's session: refused as a wrong token
                await check_resume_owner(self._store, resume_id, self.tenant)
            snapshot = await self._store.resume(resume_id, resume_token or "",
                                                owner=self._owner, takeover=True)
            self.session_id = resume_id
            stored = dict(snapshot.config)
            self.tenant = stored.pop(TENANT_FIELD, self.tenant)
            self.session = Session.model_validate(stored)
            self.items = [_ITEM.validate_python(item) for item in snapshot.items]
            token = resume_token or ""
        else:
            pipeline = self._settings.pipeline
            self.session = self.session.model_copy(update={
                "cascade": self.session.cascade.model_copy(update={"pipeline": pipeline})})
            for config in configs:
                try:
                    self.session = apply_update(self.session, config)
                except ValidationError as exc:
                    raise ProtocolError("invalid_value", str(exc), None, "session") from exc
            created = await self._store.create_session(self._stored_config(), owner=self._owner)
            self.session_id, token = created.session_id, created.resume_token
            self.session = self.session.model_copy(update={"id": self.session_id})
            await self._store.update_config(self.session_id, self._stored_config(),
                                        owner=self._owner)
        self._context_window = await self._llm_context_window()
        self._lease = LeaseKeeper(self._store, self.session_id, self._owner,
                                  self._settings.store_settings().lease_ttl_s)
        await self._lease.__aenter__()
        self._writes = WriteBehind(self.session_id, on_error=self._write_failed,
                                   on_lease_lost=lambda: self._spawn(self._taken_over()))
        self._lease_watch = asyncio.create_task(self._watch_lease(self._lease),
                                                name=f"lease-watch-{self.session_id}")
        self._configure_audio()
        shown = self.session.model_copy(update={
            "cascade": self.session.cascade.model_copy(update={"resume_token": token})})
        await self._send(SessionCreatedEvent(session=shown))
        self._prime_llm()

    async def _llm_context_window(self) -> int | None:
        """The LLM's context window: configured, else what the stage reports (the engine's
        n_ctx, a server's ``max_model_len``), else unknown (the prompt is not trimmed)."""
        if self._settings.llm_context_window:
            return self._settings.llm_context_window
        try:
            async with asyncio.timeout(self._settings.asr_open_timeout_s):
                return await self._backends.llm.context_window()
        except Exception as exc:  # a stage that cannot say is not a reason to refuse
            log.warning("LLM context window unknown: %r", exc)
            return None

    async def _watch_lease(self, lease: LeaseKeeper) -> None:
        """The renewal found the lease gone: tell the client now, not at its next frame (a
        connection that only listens would otherwise never learn it was taken over)."""
        await lease.lost.wait()
        await self._taken_over()

    async def aclose(self) -> None:
        """Connection gone: stop work now; the conversation stays in the store (the writes
        still queued, a cancelled reply's last item state included, are applied before the
        lease is released, so a resume finds them)."""
        self._closed = True
        if self._lease_watch is not None and not self._lease_watch.done():
            self._lease_watch.cancel()
        if self._responder is not None:
            await self._responder.cancel("client_cancelled")
        if self._controller is not None:
            await self._controller.aclose()
        if self._writes is not None:
            await self._writes.drain(self._settings.store_settings().lease_ttl_s / 2)
            await self._writes.aclose()
        if self._lease is not None:
            await self._lease.stop(release=True)
        for prime in (self._prime_task, self._turn_prime):
            if prime is not None and not prime.done():
                prime.cancel()
        self._prime_task = self._turn_prime = None

    def _prime_llm(self) -> None:
        """Let the LLM read this session's instructions now, in the background, so the first
        reply reuses them from its prompt cache (llama.cpp slot / vLLM prefix cache) instead
        of evaluating them after the user's first endpoint. Once per instructions text."""
        text = self.session.instructions or DEFAULT_INSTRUCTIONS
        if not self._settings.llm_prime_instructions or text == self._primed or self._closed:
            return
        self._primed = text
        if self._prime_task is not None and not self._prime_task.done():
            self._prime_task.cancel()
        self._prime_task = asyncio.create_task(self._prime(text), name="llm-prime")

    async def _prime(self, text: str) -> None:
        await self._read_prompt(LlmRequest(messages=[ChatMessage(role="system", content=text)],
                                           prefill_only=True, affinity=self.session_id or None))

    def _prime_turn(self, number: int, words: str) -> None:
        """The turn controller's hook (policy step 1): the user's stable words grew. The
        LLM reads the prompt the reply will have, up to these words, in the background;
        one primer at a time, then the newest words if they grew meanwhile."""
        if self._closed or not words:
            return
        self._turn_prime_next = (number, words)
        if self._turn_prime is None or self._turn_prime.done():
            self._turn_prime = asyncio.create_task(self._prime_turns(), name="llm-prime-turn")

    async def _prime_turns(self) -> None:
        while self._turn_prime_next is not None and not self._closed:
            number, words = self._turn_prime_next
            self._turn_prime_next = None
            request, failure = self._reply_request(
                words, skip_item=self._user_turn(number).item_id)
            if failure is None:
                await self._read_prompt(request.model_copy(update={"prefill_only": True}))

    async def _read_prompt(self, request: LlmRequest) -> None:
        """A prefill-only request: only the LLM's cache changes; failures are the turns'."""
        try:
            async with asyncio.timeout(self._settings.llm_first_token_timeout_s):
                async with closing(self._backends.llm.stream(request)) as deltas:
                    async for _ in deltas:
                        pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # only a cache warm-up: the turns will see real errors
            log.debug("session %s: priming the LLM failed: %s", self.session_id, exc)

    # ------------------------------------------------------------------ input
    async def handle(self, raw: str | bytes) -> None:
        """One client frame. Bad input is answered with an ``error`` event, never raised.

        A binary frame is raw input audio in the session's input format (a cascade
        extension: the same as an ``input_audio_buffer.append`` without base64/JSON)."""
        event_id: str | None = None
        if self._lease is not None and self._lease.lost.is_set():
            await self._taken_over()
            return
        try:
            if isinstance(raw, bytes | bytearray | memoryview):
                self._audio_in_events(None)
                samples = audio_codecs.decode(raw, self._input_format)
                await self._append_samples(samples, self._input_rate(), None)
                return
            event = parse_client_event(raw, self._settings.max_event_bytes)
            event_id = event.event_id
            await self._dispatch(event)
        except (ProtocolError, StoreError) as err:
            await self._report(err, event_id)
        except AudioFormatError as err:
            await self._error("invalid_audio", str(err), event_id, "audio")
        except Exception as exc:  # a bug: this event fails, the session carries on
            log.exception("session %s: event failed", self.session_id)
            await self._error("server_error", f"the event could not be processed: "
                              f"{type(exc).__name__}", event_id, type="server_error")

    async def push_audio(self, samples: npt.NDArray[np.int16], rate: int) -> None:
        """The audio-in port: mono pcm16 at ``rate`` (a WebRTC call's decoded track)."""
        if self._closed or (self._lease is not None and self._lease.lost.is_set()):
            return
        try:
            await self._append_samples(samples, rate, None)
        except (ProtocolError, StoreError) as err:
            await self._report(err, None)

    def _audio_in_events(self, event_id: str | None) -> None:
        """Audio inside events is the WebSocket's; a WebRTC call's audio is its track."""
        if self._media is not None:
            raise ProtocolError("invalid_event_for_transport", "input audio travels on the "
                                "WebRTC call's audio track; input_audio_buffer.append (and "
                                "binary audio frames) are for WebSocket sessions", event_id,
                                "type")

    def _input_rate(self) -> int:
        return audio_codecs.sample_rate(self._input_format)

    async def _taken_over(self) -> None:
        """Another connection resumed this session: say so once, stop, and close."""
        if self._closed or self._taking_over:
            return
        self._taking_over = True
        await self._error("session_taken_over", "another connection resumed this session; "
                          "this one no longer owns it and is closed", None)
        if self._responder is not None and not self._responder.done:
            await self._responder.cancel("client_cancelled")
        self._closed = True
        if self._close is not None:
            self._close(CLOSE_TAKEN_OVER, "session taken over")

    @property
    def idle(self) -> bool:
        """Nothing the user would miss if the connection ended now: no user turn being
        spoken or finished, no reply being generated or still playing at the client."""
        if self._closed:
            return True
        responder = self._responder
        if responder is not None and (not responder.done or responder.playout.queued_ms() > 0):
            return False
        controller = self._controller
        return controller is None or (not controller.busy and controller.reply_playing is None)

    async def end_for_drain(self) -> None:
        """The server is shutting down: tell the client how to go on, then close (1012).
        The conversation is in the store; any replica resumes it."""
        if self._closed or self._taking_over:
            return
        self._taking_over = True
        await self._error("server_draining", "This server is shutting down. Reconnect (any "
                          f"server) with session_id={self.session_id} and your resume_token "
                          "to go on with the same conversation.", None, type="server_error")
        if self._responder is not None and not self._responder.done:
            await self._responder.cancel("client_cancelled")
        self._closed = True
        if self._close is not None:
            self._close(CLOSE_RESTART, "server draining: resume the session")

    async def _dispatch(self, event: Any) -> None:
        if isinstance(event, InputAudioBufferAppendEvent):
            await self._append(event)
        elif isinstance(event, SessionUpdateEvent):
            await self._session_update(event)
        elif isinstance(event, InputAudioBufferCommitEvent):
            await self._commit(event.event_id)
        elif isinstance(event, InputAudioBufferClearEvent):
            await self._clear_input()
        elif isinstance(event, ConversationItemCreateEvent):
            await self._create_item(event)
        elif isinstance(event, ConversationItemDeleteEvent):
            await self._delete_item(event)
        elif isinstance(event, ConversationItemRetrieveEvent):
            item = await self._find(event.item_id, event.event_id)
            if item is not None:
                await self._send(ConversationItemRetrievedEvent(item=item))
        elif isinstance(event, ConversationItemTruncateEvent):
            await self._truncate(event)
        elif isinstance(event, ResponseCreateEvent):
            await self._response_create(event)
        elif isinstance(event, ResponseCancelEvent):
            await self._response_cancel(event.event_id)
        elif isinstance(event, OutputAudioBufferClearEvent):
            if self._responder is not None and not self._responder.done:
                await self._responder.cancel("client_cancelled")
            elif self._responder is not None:  # done, but its audio may still be playing
                self._responder.playout.clear()

    async def _session_update(self, event: SessionUpdateEvent) -> None:
        try:
            updated = apply_update(self.session, event.session)
        except ValidationError as exc:
            raise ProtocolError("invalid_value", str(exc), event.event_id, "session") from exc
        if (self._responder is not None and not self._responder.done
                and updated.output_format != self.session.output_format):
            await self._error("conversation_already_has_active_response",
                              "the output audio format cannot change during a response",
                              event.event_id, "session.audio.output.format")
            return
        self.session = updated
        await self._store.update_config(self.session_id, self._stored_config(),
                                        owner=self._owner)
        self._configure_audio()
        await self._send(SessionUpdatedEvent(session=self.session))
        self._prime_llm()

    def _configure_audio(self) -> None:
        """(Re)build the input path and the turn controller from the session config."""
        self._input_format = self.session.input_format.type
        # The operator's switch for policy step 1 (a paid API bills every primer).
        policy = replace(self._policy(), prefill_while_speaking=self._settings.llm_prime_turns)
        auto = self.session.turn_detection is not None
        if self._controller is None:
            self._controller = TurnController(
                vad=self._make_vad(), asr=self._backends.asr,
                make_reply=self._turn_reply, emit=self._on_turn_event, policy=policy,
                auto_turns=auto, deadlines=self._settings.deadlines(),
                turn_model=self._backends.turn, prime=self._prime_turn)
        else:
            self._controller.policy = policy
            self._controller.auto_turns = auto

    def _policy(self) -> OverlapPolicy:
        td = self.session.turn_detection
        serial = self.session.cascade.pipeline == "serial"
        max_turn = self._settings.max_buffer_ms
        if isinstance(td, ServerVad):
            return OverlapPolicy(
                threshold=td.threshold or 0.5,
                prefix_padding_ms=td.prefix_padding_ms or 0,
                silence_duration_ms=td.silence_duration_ms or 500,
                create_response=bool(td.create_response),
                interrupt_response=bool(td.interrupt_response), serial=serial,
                max_turn_ms=max_turn)
        if td is not None:  # semantic_vad: the end-of-turn model decides (policy.py, step 4)
            rule = SEMANTIC_EAGERNESS[td.eagerness or "auto"]
            return OverlapPolicy(create_response=bool(td.create_response),
                                 interrupt_response=bool(td.interrupt_response), serial=serial,
                                 max_turn_ms=max_turn, semantic=rule,
                                 speculative_pause_ms=min(200, rule.first_check_ms))
        return OverlapPolicy(serial=serial, create_response=False, max_turn_ms=max_turn)

    async def _append(self, event: InputAudioBufferAppendEvent) -> None:
        self._audio_in_events(event.event_id)
        samples = audio_codecs.decode_base64(event.audio, self._input_format)
        await self._append_samples(samples, self._input_rate(), event.event_id)

    async def _append_samples(self, samples: npt.NDArray[np.int16], rate: int,
                              event_id: str | None) -> None:
        """Input audio (mono pcm16 at ``rate``) into the turn logic, resampled once to
        the pipeline rate by a stream resampler kept per input rate.

        Buffer rules: with turn detection, only the current turn's audio is "buffered"
        (silence between turns is scored by the VAD and dropped, keeping just
        ``prefix_padding_ms`` for the next turn), and a turn that reaches
        ``max_buffer_ms`` is ended by the server; so any mix of speech and silence works
        for the session's whole life. With manual turns (turn_detection null) the client
        owns the buffer: everything since the last commit/clear counts, and an append
        past ``max_buffer_ms`` is refused until it commits or clears."""
        ms = samples.size * 1000.0 / rate
        limits = self._settings
        if ms > limits.max_append_ms:
            await self._error("audio_too_large", f"one append carries {ms:.0f} ms of audio; "
                              f"the limit is {limits.max_append_ms} ms", event_id, "audio")
            return
        assert self._controller is not None
        manual = not self._controller.auto_turns
        if manual and self._manual_ms + ms > limits.max_buffer_ms:
            await self._error("input_audio_buffer_full",
                              f"the uncommitted input audio would exceed {limits.max_buffer_ms}"
                              " ms; commit or clear it", event_id, "audio")
            return
        now = time.monotonic()
        if self._audio_clock_start is None:
            self._audio_clock_start = now
        allowed_ms = (now - self._audio_clock_start) * 1000.0 * limits.max_audio_rate + 5000.0
        if self._audio_received_ms + ms > allowed_ms:
            await self._error("audio_rate_exceeded",
                              f"audio is arriving more than {limits.max_audio_rate:g}x faster "
                              "than real time", event_id, "audio")
            return
        self._audio_received_ms += ms
        if manual:
            self._manual_ms += ms
        resampler = self._resamplers.get(rate)
        if resampler is None:
            resampler = self._resamplers[rate] = Pcm16StreamResampler(rate, ASR_RATE)
        await self._controller.push_audio(resampler.process(samples).tobytes())

    def _buffered_ms(self) -> float:
        """Uncommitted input audio, by the buffer rules of ``_append_samples``."""
        controller = self._controller
        if controller is None:
            return 0.0
        return self._manual_ms if not controller.auto_turns else controller.turn_audio_ms

    async def _commit(self, event_id: str | None) -> None:
        buffered = self._buffered_ms()
        if buffered < 100:
            await self._error("input_audio_buffer_commit_empty",
                              f"buffer too small: expected at least 100 ms of audio, got "
                              f"{buffered:.0f} ms", event_id)
            return
        assert self._controller is not None
        turn = await self._controller.commit()
        self._manual_ms = 0.0
        if turn is not None:
            # The transcript follows from the background (TranscriptDone).
            await self._user_turn_committed(turn)

    async def _clear_input(self) -> None:
        if self._controller is not None:
            await self._controller.clear()
        self._manual_ms = 0.0
        # Turns not yet committed lose their audio; committed ones keep their item.
        self._turns = {n: t for n, t in self._turns.items() if t.committed}
        await self._send(InputAudioBufferClearedEvent())

    # ------------------------------------------------------------------ turn events
    def _user_turn(self, number: int) -> UserTurn:
        turn = self._turns.get(number)
        if turn is None:
            turn = self._turns[number] = UserTurn()
            tracing.turn_opened(self._controller, number, session_id=self.session_id,
                                item_id=turn.item_id, pipeline=self.session.cascade.pipeline)
            while len(self._turns) > MAX_OPEN_TURNS:  # bounded: forget the oldest
                del self._turns[min(self._turns)]
        return turn

    async def _on_turn_event(self, event: TurnEvent) -> None:
        """Turn events never raise into the turn controller: a failure here (the item
        limit, a store error) is the client's ``error`` event, and turn-taking goes on."""
        try:
            await self._turn_event(event)
        except (ProtocolError, StoreError) as err:
            await self._report(err, None)

    async def _report(self, err: ProtocolError | StoreError, event_id: str | None) -> None:
        """A refused request (protocol or store limit) as the client's ``error`` event; a
        lost lease ends the connection."""
        if isinstance(err, LeaseLost):
            await self._taken_over()
        elif isinstance(err, ProtocolError):
            metrics.ERROR_EVENTS.labels(err.code).inc()
            await self._send(error_event(err))
        else:
            await self._error(err.code, str(err), event_id)

    async def _turn_event(self, event: TurnEvent) -> None:
        if isinstance(event, SpeechStarted):
            turn = self._user_turn(event.turn)
            await self._send(InputAudioBufferSpeechStartedEvent(
                audio_start_ms=event.audio_start_ms, item_id=turn.item_id))
        elif isinstance(event, ReplyCancelled):
            if event.reason in ("user_resumed", "transcript_changed"):
                metrics.SPECULATIVE_MISSES.inc()
            timing = self._user_turn(event.turn).timing
            timing.speculations += 1
            timing.wasted_llm_tokens += event.llm_tokens
            timing.wasted_tts_ms += event.tts_ms
            metrics.SPECULATIVE_WASTED_TOKENS.inc(event.llm_tokens)
            metrics.SPECULATIVE_WASTED_AUDIO.inc(event.tts_ms / 1000.0)
        elif isinstance(event, BargeIn):
            metrics.BARGE_INS.inc()
            if self._responder is not None and not self._responder.done:
                await self._responder.cancel("turn_detected")  # announces the truncation
        elif isinstance(event, TranscriptDelta):
            turn = self._user_turn(event.turn)
            if event.text:
                if turn.timing.first_delta is None:
                    turn.timing.first_delta = time.monotonic()
                await self._send(InputAudioTranscriptionDeltaEvent(
                    item_id=turn.item_id, delta=event.text))
        elif isinstance(event, SpeechStopped):
            now = time.monotonic()
            assert self._controller is not None
            behind_ms = self._controller.samples * 1000 / ASR_RATE - event.audio_end_ms
            timing = self._user_turn(event.turn).timing
            timing.eos, timing.endpoint = now - behind_ms / 1000.0, now
            timing.endpoint_reason, timing.turn_probability = event.reason, event.probability
            await self._send(InputAudioBufferSpeechStoppedEvent(
                audio_end_ms=event.audio_end_ms, item_id=self._user_turn(event.turn).item_id))
            await self._user_turn_committed(event.turn)
        elif isinstance(event, TranscriptDone):
            self._user_turn(event.turn).timing.final = time.monotonic()
            await self._user_turn_committed(event.turn)
            await self._user_transcript_done(event.turn, event.text, event.error)
        elif isinstance(event, ReplyReleased):
            timing = self._user_turn(event.turn).timing
            self._turns.pop(event.turn, None)  # the turn is complete
            timing.speculative_hit = event.speculative_hit
            if event.speculative_hit:
                timing.speculations += 1
                metrics.SPECULATIVE_HITS.inc()
            await self._start_response(event.run, timing)

    async def _user_turn_committed(self, number: int) -> None:
        """speech_stopped / commit: the user's audio becomes a conversation item."""
        turn = self._user_turn(number)
        if turn.committed:
            return
        turn.committed = True
        previous = self._last_item_id()
        await self._send(InputAudioBufferCommittedEvent(previous_item_id=previous,
                                                        item_id=turn.item_id))
        item = MessageItem(id=turn.item_id, role="user", status="completed",
                           object="realtime.item",
                           content=[ContentPart(type="input_audio", transcript=None)])
        await self._add_item(item, previous)

    async def _user_transcript_done(self, number: int, text: str, error: str | None) -> None:
        turn = self._user_turn(number)
        if error is not None and not text:
            metrics.ERROR_EVENTS.labels("transcription_failed").inc()
            await self._send(InputAudioTranscriptionFailedEvent(
                item_id=turn.item_id, error=TranscriptionError(
                    type="server_error", code="transcription_failed", message=error)))
            await self._error("transcription_failed", f"the user's turn could not be "
                              f"transcribed: {error}", None, type="server_error")
            self._turns.pop(number, None)
            tracing.turn_ended(self._controller, number, "error", "transcription_failed")
            return
        await self._send(InputAudioTranscriptionCompletedEvent(
            item_id=turn.item_id, transcript=text,
            usage=TranscriptionDurationUsage(seconds=0.0)))
        item = MessageItem(id=turn.item_id, role="user", status="completed",
                           object="realtime.item",
                           content=[ContentPart(type="input_audio", transcript=text)])
        await self._replace_item(item)
        await self._send(ConversationItemDoneEvent(previous_item_id=self._previous_of(turn.item_id),
                                                   item=item))
        controller = self._controller
        if (controller is None or not controller.auto_turns or not text
                or not controller.policy.create_response):
            self._turns.pop(number, None)  # no reply will claim the turn's timing
            tracing.turn_ended(self._controller, number, "no_reply")

    # ------------------------------------------------------------------ responses
    def _turn_reply(self, turn: int, transcript: str) -> ReplyRun:
        """The reply to user turn ``turn`` whose words are ``transcript`` (its item, if it
        is in the conversation already, is replaced by these words)."""
        return self._make_reply(transcript, skip_item=self._user_turn(turn).item_id)

    def _make_reply(self, transcript: str | None, config: ResponseConfig | None = None,
                    skip_item: str | None = None) -> ReplyRun:
        """A reply to the conversation so far (+ ``transcript`` as the user's last words,
        when the turn's item is not in the conversation yet: a speculative start).
        ``config`` (from ``response.create``) overrides the session for this reply; its
        ``input`` replaces the conversation as context, ``conversation: "none"`` too."""
        request, failure = self._reply_request(transcript, config, skip_item)
        rate = (self._media.output_rate if self._media is not None
                else audio_codecs.sample_rate(self.session.output_format.type))
        return ReplyRun(self._backends.llm,
                        self._backends.tts if self._wants_audio(config) else None, request,
                        sample_rate=rate, serial=self.session.cascade.pipeline == "serial",
                        deadlines=self._settings.deadlines(), failure=failure)

    def _reply_request(self, transcript: str | None, config: ResponseConfig | None = None,
                       skip_item: str | None = None
                       ) -> tuple[LlmRequest, tuple[str, str] | None]:
        """The LLM request of ``_make_reply`` (the same one for a turn's primers, so the
        LLM's cache holds exactly the prompt the reply will send), and why the reply
        must fail instead (the history does not fit), if it must."""
        cfg = config or ResponseConfig()
        instructions = cfg.instructions if cfg.instructions is not None else (
            self.session.instructions)
        messages = [ChatMessage(role="system", content=instructions or DEFAULT_INSTRUCTIONS)]
        context: list[ConversationItem] = (
            list(cfg.input) if cfg.input is not None
            else [] if cfg.conversation == "none" else self.items)
        for item in context:
            if isinstance(item, MessageItem):
                if item.id is not None and item.id == skip_item:
                    continue
                text = item.text()
                if text:
                    messages.append(ChatMessage(role=item.role, content=text))
            elif isinstance(item, FunctionCallItem):
                messages.append(ChatMessage(role="assistant", tool_calls=[ToolCall(
                    id=item.call_id or item.id or "",
                    function=FunctionCall(name=item.name, arguments=item.arguments))]))
            elif isinstance(item, FunctionCallOutputItem):
                messages.append(ChatMessage(role="tool", content=item.output,
                                            tool_call_id=item.call_id))
        if transcript is not None:
            messages.append(ChatMessage(role="user", content=transcript))
        limit = (cfg.max_output_tokens if cfg.max_output_tokens is not None
                 else self.session.max_output_tokens)
        max_tokens = DEFAULT_MAX_TOKENS if limit == "inf" else int(limit)
        session_tools = cfg.tools if cfg.tools is not None else self.session.tools
        tools = [ToolSpec(function=FunctionSpec(name=t.name, description=t.description,
                                                parameters=t.parameters))
                 for t in session_tools] or None
        choice = cfg.tool_choice if cfg.tool_choice is not None else self.session.tool_choice
        failure: tuple[str, str] | None = None
        if self._context_window is not None:  # the history must fit the model (context.py)
            try:
                fitted = fit_messages(messages, window_tokens=self._context_window,
                                      max_output_tokens=max_tokens,
                                      truncation=self.session.truncation,
                                      reserved_tokens=estimate_tools_tokens(tools))
                if fitted.dropped:
                    log.debug("session %s: %d oldest messages left out of the prompt (~%d "
                              "tokens)", self.session_id, fitted.dropped, fitted.tokens)
                messages = fitted.messages
            except ContextOverflow as exc:
                failure = (exc.code, str(exc))
        request = LlmRequest(
            messages=messages,
            temperature=cfg.temperature if cfg.temperature is not None
            else self.session.temperature,
            max_tokens=max_tokens,
            tools=tools,
            tool_choice=None if tools is None else (
                choice if isinstance(choice, str)
                else {"type": "function", "function": {"name": choice.name}}),
            affinity=self.session_id or None)  # one LLM replica holds this conversation
        return request, failure

    def _wants_audio(self, cfg: ResponseConfig | None) -> bool:
        modalities = (cfg.output_modalities if cfg is not None and cfg.output_modalities
                      else self.session.output_modalities)
        return modalities != ["text"]

    async def _start_response(self, run: ReplyRun, timing: TurnTiming | None = None,
                              config: ResponseConfig | None = None) -> None:
        if self._responder is not None and not self._responder.done:
            await self._responder.cancel("turn_detected")
        out_of_band = config is not None and config.conversation == "none"
        responder = Responder(run, send=self._send,
                              on_item_added=_ignore if out_of_band else self._assistant_item_added,
                              on_item_done=_ignore if out_of_band else self._replace_item,
                              audio_format=self.session.output_format.type,
                              audio=self._wants_audio(config), audio_out=self._audio_out())
        if config is not None and config.metadata is not None:
            responder.response = responder.response.model_copy(
                update={"metadata": config.metadata})
        self._responder = responder
        if self._controller is not None:
            self._controller.set_reply_playing(run)
        task = responder.start()
        task.add_done_callback(lambda _t: self._reply_finished(responder))
        if timing is not None and timing.eos is not None:
            task.add_done_callback(lambda _t: self._turn_done(timing, responder))

    def _audio_out(self) -> Callable[[str], AudioOut] | None:
        """The transport's audio-out port for a new response (None: audio in events)."""
        media = self._media
        if media is None:
            return None
        return lambda response_id: media.playout(response_id, self._emit_soon)

    def _emit_soon(self, event: ServerEventBase) -> None:
        """Send from synchronous code (the media track): queued in order, never awaited."""
        self._spawn(self._send(event))

    def _reply_finished(self, responder: Responder) -> None:
        """The reply stops counting as playing (for barge-in) once the listener has heard
        the audio still queued at the client."""
        controller = self._controller
        if controller is None or controller.reply_playing is not responder.run:
            return
        queued_s = responder.playout.queued_ms() / 1000.0

        def stop() -> None:
            if controller.reply_playing is responder.run:
                controller.set_reply_playing(None)

        if queued_s <= 0:
            stop()
        else:
            asyncio.get_running_loop().call_later(queued_s, stop)

    def _turn_done(self, timing: TurnTiming, responder: Responder) -> None:
        record = self._record_turn(timing, responder)
        if not self.session.cascade.timings or self._closed:
            return
        fields = {k: v for k, v in record.items() if k.endswith("_ms")}
        event = CascadeTurnTimingsEvent.model_validate(
            {"response_id": responder.response.id, "pipeline": record["pipeline"],
             "speculative_hit": record["speculative_hit"], "status": record["status"],
             "speculations": timing.speculations,
             "endpoint_reason": timing.endpoint_reason,
             "turn_probability": (None if timing.turn_probability is None
                                  else round(timing.turn_probability, 3)),
             "wasted_llm_tokens": timing.wasted_llm_tokens,
             "wasted_tts_ms": round(timing.wasted_tts_ms, 1), **fields})
        self._spawn(self._send(event))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in its own task, kept until it ends."""
        task = asyncio.get_running_loop().create_task(work)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def _record_turn(self, timing: TurnTiming, responder: Responder) -> dict[str, object]:
        """Per-turn histograms (all from the end of speech) and one structured log line."""
        eos = timing.eos
        assert eos is not None
        pipeline = self.session.cascade.pipeline
        run = responder.run
        marks = {
            "endpoint": (metrics.TURN_ENDPOINT_DELAY, timing.endpoint),
            "first_transcript_delta": (metrics.TURN_FIRST_TRANSCRIPT_DELTA, timing.first_delta),
            "final_transcript": (metrics.TURN_FINAL_TRANSCRIPT, timing.final),
            "reply_started": (metrics.TURN_REPLY_STARTED, run.timings.started),
            "llm_first_token": (metrics.TURN_LLM_FIRST_TOKEN, run.timings.first_token),
            "first_audio": (metrics.TURN_FIRST_AUDIO, responder.first_audio_at),
        }
        record: dict[str, object] = {"event": "turn", "session": self.session_id,
                                     "pipeline": pipeline,
                                     "speculative_hit": timing.speculative_hit,
                                     "endpoint_reason": timing.endpoint_reason,
                                     "status": responder.response.status}
        for name, (histogram, at) in marks.items():
            if at is None:
                record[f"{name}_ms"] = None
                continue
            seconds = max(0.0, at - eos)
            histogram.labels(pipeline).observe(seconds)
            record[f"{name}_ms"] = round(seconds * 1000.0, 1)
        tracing.turn_done(responder, timing)  # the same marks as spans of the turn's trace
        log.info(json.dumps(record))
        return record

    async def _assistant_item_added(self, item: MessageItem | FunctionCallItem) -> None:
        await self._add_item(item, self._last_item_id())

    async def _response_create(self, event: ResponseCreateEvent) -> None:
        if self._responder is not None and not self._responder.done:
            await self._error("conversation_already_has_active_response",
                              "a response is already in progress; cancel it first",
                              event.event_id)
            return
        run = self._make_reply(None, event.response)
        run.start()
        run.release()
        await self._start_response(run, config=event.response)

    async def _response_cancel(self, event_id: str | None) -> None:
        if self._responder is None or self._responder.done:
            await self._error("response_cancel_not_active", "there is no active response",
                              event_id)
            return
        await self._responder.cancel("client_cancelled")

    # ------------------------------------------------------------------ conversation
    async def _create_item(self, event: ConversationItemCreateEvent) -> None:
        item = event.item
        if item.id is not None and any(i.id == item.id for i in self.items):
            await self._error("item_already_exists", f"item {item.id} already exists",
                              event.event_id, "item.id")
            return
        previous = event.previous_item_id
        if previous is not None and previous != "root" and not any(
                i.id == previous for i in self.items):
            await self._error("item_not_found", f"previous_item_id {previous} does not exist",
                              event.event_id, "previous_item_id")
            return
        item = item.model_copy(update={"id": item.id or new_item_id(),
                                       "object": "realtime.item",
                                       "status": item.status or "completed"})
        if previous is None:
            previous = self._last_item_id()
        await self._add_item(item, previous, wait=True)
        await self._send(ConversationItemDoneEvent(previous_item_id=previous, item=item))

    async def _delete_item(self, event: ConversationItemDeleteEvent) -> None:
        if await self._find(event.item_id, event.event_id) is None:
            return
        await self._write(partial(self._store.delete_item, self.session_id, event.item_id,
                                  owner=self._owner),
                          f"deleting item {event.item_id}", wait=True)
        self.items = [i for i in self.items if i.id != event.item_id]
        await self._send(ConversationItemDeletedEvent(item_id=event.item_id))

    async def _truncate(self, event: ConversationItemTruncateEvent) -> None:
        item = await self._find(event.item_id, event.event_id)
        if item is None:
            return
        responder = self._responder
        if (not isinstance(item, MessageItem) or item.role != "assistant"
                or responder is None or responder.item_id != item.id):
            await self._error("invalid_value", "only the latest assistant audio item can be "
                              "truncated", event.event_id, "item_id")
            return
        sent = responder.playout.sent_ms
        if event.audio_end_ms > sent + 1:
            await self._error("invalid_value", f"audio_end_ms {event.audio_end_ms} is beyond "
                              f"the {sent:.0f} ms of audio sent", event.event_id, "audio_end_ms")
            return
        if not responder.done:
            await responder.cancel("client_cancelled", audio_end_ms=event.audio_end_ms)
        heard = responder.playout.heard_text(event.audio_end_ms)
        truncated = item.model_copy(update={
            "content": [part.model_copy(update={"transcript": heard}) for part in item.content]})
        await self._replace_item(truncated, wait=True)
        await self._send(ConversationItemTruncatedEvent(
            item_id=event.item_id, content_index=event.content_index,
            audio_end_ms=event.audio_end_ms))

    async def _find(self, item_id: str, event_id: str | None) -> ConversationItem | None:
        """The item, or None after sending an ``item_not_found`` error."""
        for item in self.items:
            if item.id == item_id:
                return item
        await self._error("item_not_found", f"item {item_id} does not exist", event_id,
                          "item_id")
        return None

    def _last_item_id(self) -> str | None:
        return self.items[-1].id if self.items else None

    def _previous_of(self, item_id: str) -> str | None:
        for i, item in enumerate(self.items):
            if item.id == item_id:
                return self.items[i - 1].id if i else None
        return None

    async def _write(self, write: Callable[[], Awaitable[object]], what: str, *,
                     wait: bool) -> None:
        """A store write in the session's order (store/write_behind.py): ``wait`` for its
        outcome when the client must see its error (its own item.create/delete/truncate);
        otherwise only queue it (the turn's items: the reply must not wait for a store)."""
        writes = self._writes
        try:
            if writes is None:  # not started: nothing queued could come before it
                await write()
            elif wait:
                await writes.run(write, what)
            else:
                await writes.put(write, what)
        except LeaseLost:
            self._spawn(self._taken_over())  # from any task: a reply's hooks included
            raise

    async def _write_failed(self, what: str, err: StoreError) -> None:
        """A queued write the store refused (after retries): the client hears of it."""
        await self._error(err.code, f"{what} could not be saved: {err}", None,
                          type="server_error")

    async def _add_item(self, item: ConversationItem, previous: str | None, *,
                        wait: bool = False) -> None:
        if len(self.items) >= self._settings.max_items:
            raise ProtocolError("conversation_too_long", f"the conversation holds "
                                f"{len(self.items)} items (limit {self._settings.max_items})",
                                None, "item")
        data = item.model_dump(mode="json")
        await self._write(partial(self._store.append_item, self.session_id, data,
                                  previous_item_id=previous, owner=self._owner),
                          f"item {item.id}", wait=wait)
        if previous == "root":
            self.items.insert(0, item)
            previous = None
        else:
            index = next((i + 1 for i, it in enumerate(self.items) if it.id == previous),
                         len(self.items))
            self.items.insert(index, item)
        await self._send(ConversationItemAddedEvent(previous_item_id=previous, item=item))

    async def _replace_item(self, item: ConversationItem, *, wait: bool = False) -> None:
        for i, existing in enumerate(self.items):
            if existing.id == item.id:
                self.items[i] = item
                data, item_id = item.model_dump(mode="json"), item.id or ""
                await self._write(partial(self._store.update_item, self.session_id, item_id,
                                          data, owner=self._owner),
                                  f"item {item_id}", wait=wait)
                return

    # ------------------------------------------------------------------ output
    def _stored_config(self) -> dict[str, Any]:
        config = self.session.model_dump(mode="json")
        if self.tenant is not None:
            config[TENANT_FIELD] = self.tenant
        return config

    async def _send(self, event: ServerEventBase) -> None:
        if self._closed:
            return
        text = self._encoder.encode(event)
        if text is not None:
            with contextlib.suppress(Exception):
                await self._send_text(text)

    async def _error(self, code: str, message: str, event_id: str | None,
                     param: str | None = None, type: str = "invalid_request_error") -> None:
        metrics.ERROR_EVENTS.labels(code).inc()
        await self._send(ErrorEvent(error=ErrorDetail(
            type=type, code=code, message=message, param=param, event_id=event_id)))

