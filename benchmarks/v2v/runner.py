"""The benchmark's schedule: modes compared turn by turn, conversations, barge-in, then a
concurrency sweep.

Compare phase: one session at a time; every round speaks every clip once per mode and
transport (WebSocket, WebRTC), the mode and transport order alternating between rounds,
so machine noise (another process, a thermal dip) hits every mode and transport alike.
Only the compare phase (and its warm-up) runs over WebRTC; the others use the WebSocket.
Conversation phase: per round and mode one connection with
several turns and streamed silence between them (order alternating the same way).
Sweep phase: N simultaneous sessions (each speaking its own sequence of clips, starts
staggered across the first second) for each level N.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from benchmarks.v2v.client import PreparedClip, TurnOptions, run_turn
from benchmarks.v2v.conversation import run_conversation
from benchmarks.v2v.records import Phase, Transport, TurnRecord

STAGGER_S = 1.0  # sweep sessions start spread over this window, not in lockstep

Progress = Callable[[TurnRecord], None]


@dataclass(frozen=True)
class Schedule:
    modes: tuple[str, ...]
    rounds: int
    concurrency: tuple[int, ...] = ()  # sweep levels; empty: no sweep
    sweep_modes: tuple[str, ...] = ()
    sweep_turns: int = 2  # turns per session at each level
    warmup: int = 1  # untimed turns first (model caches, allocator, JIT-ish first calls)
    barge_in_rounds: int = 1  # barge-in turns per mode
    conversation_rounds: int = 0  # connections per mode in the conversation phase
    conversation_turns: int = 0  # user turns per connection
    conversation_gaps: tuple[float, ...] = ()  # seconds of silence before turns 2, 3, ...
    transports: tuple[Transport, ...] = ("ws",)  # compare phase

    def total_turns(self, clips: int) -> int:
        compare = self.rounds * clips * len(self.modes) * len(self.transports)
        conversation = self.conversation_rounds * self.conversation_turns * len(self.modes)
        barge_in = self.barge_in_rounds * len(self.modes)
        sweep = sum(self.concurrency) * self.sweep_turns * len(self.sweep_modes)
        return compare + conversation + barge_in + sweep

    def mode_order(self, round_: int) -> tuple[str, ...]:
        """The modes in the order round ``round_`` runs them (alternating)."""
        return self.modes if round_ % 2 == 0 else tuple(reversed(self.modes))

    def transport_order(self, round_: int) -> tuple[Transport, ...]:
        """The transports in the order round ``round_`` runs them (alternating)."""
        return self.transports if round_ % 2 == 0 else tuple(reversed(self.transports))


async def turn(opts: TurnOptions, clip: PreparedClip, mode: str, transport: Transport, *,
               phase: Phase, round_: int = 0, t0: float = 0.0) -> TurnRecord:
    """One turn over ``transport`` (aiortc is imported only when WebRTC is measured)."""
    if transport == "webrtc":
        from benchmarks.v2v.webrtc_client import run_webrtc_turn

        return await run_webrtc_turn(opts, clip, mode, phase=phase, round_=round_, t0=t0)
    return await run_turn(opts, clip, mode, phase=phase, round_=round_, t0=t0)


async def compare(opts: TurnOptions, clips: Sequence[PreparedClip], schedule: Schedule,
                  t0: float, progress: Progress) -> list[TurnRecord]:
    records = []
    for r in range(schedule.rounds):
        for clip in clips:
            for mode in schedule.mode_order(r):
                for transport in schedule.transport_order(r):
                    rec = await turn(opts, clip, mode, transport, phase="compare", round_=r,
                                     t0=t0)
                    records.append(rec)
                    progress(rec)
    return records


async def barge_in(opts: TurnOptions, clips: Sequence[PreparedClip],
                   interrupt: PreparedClip, schedule: Schedule, t0: float,
                   progress: Progress) -> list[TurnRecord]:
    """The user talks over the reply: each round asks one clip per mode, then interrupts."""
    records = []
    for r in range(schedule.barge_in_rounds):
        for mode in schedule.mode_order(r):
            rec = await run_turn(opts, clips[r % len(clips)], mode, phase="barge_in",
                                 round_=r, t0=t0, interrupt=interrupt)
            records.append(rec)
            progress(rec)
    return records


def connection_id(mode: str, round_: int) -> str:
    return f"{mode}-{round_ + 1}"


async def conversations(opts: TurnOptions, clips: Sequence[PreparedClip], schedule: Schedule,
                        t0: float, progress: Progress) -> list[TurnRecord]:
    """Per round and mode one connection holding a conversation (see conversation.py)."""
    records: list[TurnRecord] = []
    if schedule.conversation_turns < 1:
        return records
    for r in range(schedule.conversation_rounds):
        for mode in schedule.mode_order(r):
            records += await run_conversation(
                opts, clips, mode, turns=schedule.conversation_turns,
                gaps=schedule.conversation_gaps, round_=r,
                connection_id=connection_id(mode, r), t0=t0, progress=progress)
    return records


async def _sweep_session(opts: TurnOptions, clips: Sequence[PreparedClip], mode: str,
                         level: int, index: int, turns: int, t0: float,
                         progress: Progress) -> list[TurnRecord]:
    await asyncio.sleep(STAGGER_S * index / level)
    out = []
    for turn in range(turns):
        clip = clips[(index + turn) % len(clips)]
        rec = await run_turn(opts, clip, mode, phase="sweep", concurrency=level,
                             session_index=index, round_=turn, t0=t0)
        out.append(rec)
        progress(rec)
    return out


async def sweep(opts: TurnOptions, clips: Sequence[PreparedClip], schedule: Schedule,
                t0: float, progress: Progress) -> list[TurnRecord]:
    records: list[TurnRecord] = []
    for level in schedule.concurrency:
        for mode in schedule.sweep_modes:
            sessions = await asyncio.gather(*(
                _sweep_session(opts, clips, mode, level, i, schedule.sweep_turns, t0, progress)
                for i in range(level)))
            records.extend(r for s in sessions for r in s)
    return records


async def run(opts: TurnOptions, clips: Sequence[PreparedClip], schedule: Schedule,
              progress: Progress, interrupt: PreparedClip | None = None) -> list[TurnRecord]:
    t0 = time.perf_counter()
    for transport in schedule.transports:  # each transport's first call is slower
        for i in range(schedule.warmup):
            await turn(opts, clips[i % len(clips)], schedule.modes[i % len(schedule.modes)],
                       transport, phase="compare", t0=t0)
    records = await compare(opts, clips, schedule, t0, progress)
    records += await conversations(opts, clips, schedule, t0, progress)
    if interrupt is not None:
        records += await barge_in(opts, clips, interrupt, schedule, t0, progress)
    records += await sweep(opts, clips, schedule, t0, progress)
    return records


def levels_up_to(limit: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``limit`` (which is included even if not a power of two)."""
    if limit < 1:
        return ()
    out = []
    n = 1
    while n < limit:
        out.append(n)
        n *= 2
    out.append(limit)
    return tuple(out)
