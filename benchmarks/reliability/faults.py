"""Faults survived, with real processes: ``python -m benchmarks.reliability faults``.

One fleet on loopback: ``redis-server`` (append-only file on, restartable on its port), the
fake ASR/LLM/TTS stages in their own process (``fake_stages.py``: the real protocols, no
models, so a loaded machine can run it), and two ``cascade serve`` processes on that Redis:

- ``A`` talks to the stages directly;
- ``C`` reaches two LLM and two TTS "replicas", each a ``FaultProxy`` in front of the same
  stage, with short stage deadlines (``CASCADE_*_TIMEOUT_S``).

Scenarios (one row each; the quick variant runs a, b1, c1, d1, d2 and d3 small):

a. ``A`` is killed (SIGKILL) with N live sessions holding items, some mid-reply: every
   client resumes on ``C`` with its token; items lost, order, recovery time per client.
b. Redis is killed and restarted on its port (b1), or stopped for a few seconds (b2,
   SIGSTOP): writes during the outage complete or are refused with an ``error`` event, a
   reply during the outage is answered, a new session is refused clearly or works; after
   it, what each client saw is what Redis holds (in order, no duplicate) and what a
   resume shows.
c. A stage replica reset mid-reply (c1), hung (c2 LLM, c4 TTS), slowed (c3) or killed
   (c5) through the proxies: the reply moves or fails with an ``error`` event within its
   deadline, and the next turn of the same session is answered.
d. Clients that vanish mid-reply (d1), stop reading (d2) or reconnect in a loop (d3):
   live sessions and fds back to their baseline, orchestrator RSS bounded, a bystander
   session unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import connect

from benchmarks.reliability.fault_fleet import (
    HEADERS,
    FakeStagesProcess,
    Probe,
    RedisProcess,
    open_client,
    serve,
)
from benchmarks.reliability.fault_proxy import FaultProxy
from benchmarks.reliability.rows import Row
from orchestrator.launcher import CascadeProcess
from orchestrator.store.redis_store import RedisStore
from orchestrator.store.settings import StoreSettings
from tests.support.realtime_client import Client, Stamped, kinds, of, ws_url

COMMAND = "python -m benchmarks.reliability faults"
LLM_FIRST_TOKEN_S = 3.0
TTS_S = 3.0
DEADLINES = {"CASCADE_ASR_OPEN_TIMEOUT_S": "3", "CASCADE_ASR_FINALIZE_TIMEOUT_S": "3",
             "CASCADE_LLM_FIRST_TOKEN_TIMEOUT_S": f"{LLM_FIRST_TOKEN_S:g}",
             "CASCADE_LLM_STALL_TIMEOUT_S": "3", "CASCADE_TTS_TIMEOUT_S": f"{TTS_S:g}"}
MID_REPLY_S = 0.5  # a: the kill comes this long after the first audio of a reply
MARGIN_S = 5.0  # slack on a deadline for a loaded 2-core machine
WAIT_S = 30.0  # bound on any single wait
REQUESTS = 300  # d2: retrieves of a 200 KB item sent by the client that stopped reading
SLOW_READER_LIMIT_S = 120.0  # d2 as a whole: every step of it is bounded well below
SLOW_CLIENTS = r'cascade_rejected_connections_total\{reason="slow_client"\}'
# Fake stages: a reply of ~24 words, ~7 s of audio played at real time.
FAKE_TIMING = {"llm_reply_tokens": 24, "llm_tokens_per_s": 40}


@dataclass(frozen=True)
class Sizes:
    quick: bool
    sessions: int  # a: live sessions on the killed orchestrator
    items: int  # items created in each session before a fault
    mid_reply: int  # a: of which mid-reply at the kill
    redis_sessions: int  # b: live sessions through a Redis outage
    outage_s: float  # b2: Redis stopped this long
    reconnects: int  # d3: connect/resume/close cycles


FULL = Sizes(False, sessions=10, items=5, mid_reply=3, redis_sessions=4, outage_s=3.0,
             reconnects=200)
QUICK = Sizes(True, sessions=3, items=3, mid_reply=1, redis_sessions=2, outage_s=2.0,
              reconnects=20)


@dataclass
class Fleet:
    redis: RedisProcess
    stages: FakeStagesProcess
    llm: list[FaultProxy]
    tts: list[FaultProxy]
    a: CascadeProcess
    c: CascadeProcess
    store: RedisStore
    probe: Probe = field(init=False)

    def __post_init__(self) -> None:
        self.probe = Probe(self.c)

    def proxies(self) -> list[FaultProxy]:
        return [*self.llm, *self.tts]

    def heal(self) -> None:
        for p in self.proxies():
            p.heal()


@contextlib.asynccontextmanager
async def fleet() -> AsyncIterator[Fleet]:
    redis = RedisProcess()
    stages = FakeStagesProcess(**FAKE_TIMING)
    procs: list[Any] = [stages, redis]
    proxies: list[FaultProxy] = []
    store: RedisStore | None = None
    try:
        await asyncio.to_thread(redis.start)
        asr_port, llm_port, tts_port = await asyncio.to_thread(stages.wait_ready)
        proxies = [await FaultProxy(port).start()
                   for port in (llm_port, llm_port, tts_port, tts_port)]
        direct = [f"http://127.0.0.1:{p}" for p in (asr_port, llm_port, tts_port)]
        a = serve("serve-a", {}, "--redis-url", redis.url, "--asr-url", direct[0],
                  "--llm-url", direct[1], "--tts-url", direct[2])
        procs.insert(0, a)
        c = serve("serve-c", DEADLINES, "--redis-url", redis.url, "--asr-url", direct[0],
                  "--llm-url", ",".join(p.url for p in proxies[:2]),
                  "--tts-url", ",".join(p.url for p in proxies[2:]))
        procs.insert(0, c)
        await asyncio.gather(asyncio.to_thread(a.wait_ready, 180),
                             asyncio.to_thread(c.wait_ready, 180))
        store = RedisStore(StoreSettings(redis_url=redis.url))
        yield Fleet(redis, stages, proxies[:2], proxies[2:], a, c, store)
    finally:
        if store is not None:
            await store.aclose()
        for proxy in proxies:
            await proxy.aclose()
        for proc in procs:
            with contextlib.suppress(Exception):
                (proc.close if hasattr(proc, "close") else proc.stop)()


# --------------------------------------------------------------------------- client steps
def user_item(text: str, item_id: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "message", "role": "user",
                            "content": [{"type": "input_text", "text": text}]}
    if item_id is not None:
        item["id"] = item_id
    return item


async def send(client: Client, event: dict[str, Any]) -> None:
    await client.ws.send(json.dumps(event))


async def create_item(client: Client, text: str, item_id: str | None = None,
                      limit_s: float = WAIT_S) -> dict[str, Any]:
    """``conversation.item.create``; its ``conversation.item.done`` or the ``error``."""
    await send(client, {"type": "conversation.item.create", "item": user_item(text, item_id)})
    event: dict[str, Any] = (await client.until("conversation.item.done", "error",
                                                limit_s=limit_s))[-1][1]
    return event


async def reply(client: Client, limit_s: float = WAIT_S) -> list[Stamped]:
    """A user item and ``response.create``: every event up to ``response.done``."""
    client.drain()
    done = await create_item(client, "How is the weather today?")
    assert done["type"] == "conversation.item.done", done
    await send(client, {"type": "response.create"})
    return await client.until("response.done", limit_s=limit_s)


def status(events: list[Stamped]) -> str:
    response = events[-1][1]["response"]
    return str(response["status"])


def error_codes(events: list[Stamped]) -> list[str]:
    return [e["error"]["code"] for e in of(events, "error")]


def seen_items(events: list[Stamped]) -> list[str]:
    """Item ids the client was told of (added or done), in order."""
    ids: list[str] = []
    for _, e in events:
        if e["type"] in ("conversation.item.added", "conversation.item.done"):
            if e["item"]["id"] not in ids:
                ids.append(e["item"]["id"])
    return ids


async def session_of(client: Client) -> tuple[str, str]:
    created = (await client.until("session.created", limit_s=WAIT_S))[-1][1]["session"]
    return created["id"], created["cascade"]["resume_token"]


async def stored_ids(f: Fleet, sid: str) -> list[str]:
    return [item["id"] for item in await f.store.list_items(sid)]


def consistent(saw: list[str], stored: list[str]) -> tuple[int, bool, int]:
    """(items the client saw that are not stored, same order, duplicates in the store)."""
    lost = sum(i not in stored for i in saw)
    order = [i for i in stored if i in saw] == [i for i in saw if i in stored]
    return lost, order, len(stored) - len(set(stored))


async def retrieve_missing(client: Client, ids: list[str]) -> list[str]:
    missing = []
    for item_id in ids:
        await send(client, {"type": "conversation.item.retrieve", "item_id": item_id})
        got = (await client.until("conversation.item.retrieved", "error",
                                  limit_s=WAIT_S))[-1][1]
        if got["type"] == "error":
            missing.append(item_id)
    return missing


def pct(values: list[float]) -> str:
    if not values:
        return "-"
    return f"p50 {statistics.median(values):.2f} s / max {max(values):.2f} s"


def failed_row(name: str, exc: BaseException) -> Row:
    return Row(section="faults", name=name, result="error: " + str(exc)[:200], passed=False,
               command=COMMAND, note=repr(exc)[:2000])


# --------------------------------------------------------------------------- a
async def orchestrator_kill(f: Fleet, s: Sizes) -> Row:
    name = f"orchestrator SIGKILL with {s.sessions} live sessions ({s.mid_reply} mid-reply)"
    async with contextlib.AsyncExitStack() as stack:
        clients: list[tuple[Client, str, str, list[Stamped]]] = []
        for i in range(s.sessions):
            client = await stack.enter_async_context(open_client(f.a))
            sid, token = await session_of(client)
            events: list[Stamped] = []
            for k in range(s.items):
                done = await create_item(client, f"Session {i}, note {k}.", f"a{i}n{k}")
                events.append((0.0, done))
            clients.append((client, sid, token, events))
        for client, _, _, events in clients[:s.mid_reply]:
            await send(client, {"type": "response.create"})
            events += await client.until("response.output_audio.delta", limit_s=WAIT_S)
        # Into the reply, not at its first millisecond: a crash loses the writes queued in
        # its last few milliseconds (store/write_behind.py), the reply's item included.
        await asyncio.sleep(MID_REPLY_S)
        f.a.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.to_thread(f.a.proc.wait, 10)
        for client, _, _, events in clients:
            events += client.drain()

    async def resume(sid: str, token: str, saw: list[str]
                     ) -> tuple[float, list[str], bool, int]:
        async with open_client(f.c, session_id=sid, resume_token=token) as client:
            await client.until("session.created", limit_s=WAIT_S)
            back = time.monotonic() - killed
            missing = await retrieve_missing(client, saw)
            stored = await stored_ids(f, sid)
            _, order, dups = consistent(saw, stored)
            done = await create_item(client, "After the failover.")
            stored = await stored_ids(f, sid)
            goes_on = (done["type"] == "conversation.item.done"
                       and done["previous_item_id"] == stored[-2])
            lost = sorted(set(missing) | {i for i in saw if i not in stored})
            return back, lost, order and goes_on, dups

    results = await asyncio.gather(*(resume(sid, token, seen_items(events))
                                     for _, sid, token, events in clients))
    seen = sum(len(seen_items(events)) for *_, events in clients)
    recovery = [r[0] for r in results]
    lost_ids = [i for r in results for i in r[1]]
    lost = len(lost_ids)
    ordered = all(r[2] for r in results)
    dups = sum(r[3] for r in results)
    passed = lost == 0 and ordered and dups == 0 and len(results) == s.sessions
    return Row(section="faults", name=name,
               result=(f"{len(results)}/{s.sessions} resumed on the other orchestrator, "
                       f"items lost {lost}/{seen}, order kept {ordered}, recovery "
                       f"{pct(recovery)} after the kill"),
               passed=passed, command=COMMAND,
               note=(f"lost: {lost_ids}. " if lost_ids else "") + (
                   f"The kill comes {MID_REPLY_S:g} s into the replies: killed at their first "
                   "audio delta, an assistant item announced a few ms before could be missing "
                   "(1 of 10 items once), the write-behind window the README states"),
               figures={"sessions": s.sessions, "items_seen": seen, "items_lost": lost,
                        "duplicates": dups, "order_kept": ordered,
                        "recovery_s": [round(r, 3) for r in recovery]})


# --------------------------------------------------------------------------- b
async def redis_outage(f: Fleet, s: Sizes, kind: str) -> Row:
    """kind "restart": SIGKILL then start again on the port (AOF); "stop": SIGSTOP for
    ``s.outage_s`` then SIGCONT."""
    name = ("Redis SIGKILL + restart (append-only file)" if kind == "restart"
            else f"Redis unreachable {s.outage_s:g} s (SIGSTOP)")
    async with contextlib.AsyncExitStack() as stack:
        clients: list[tuple[Client, str, str]] = []
        for i in range(s.redis_sessions):
            client = await stack.enter_async_context(open_client(f.c))
            sid, token = await session_of(client)
            for k in range(s.items):
                await create_item(client, f"Before the outage {k}.", f"b{kind[0]}{i}n{k}")
            clients.append((client, sid, token))
        saw: dict[str, list[str]] = {sid: seen_items(c.drain()) for c, sid, _ in clients}

        async def during(client: Client, sid: str, i: int) -> tuple[str, float]:
            started = time.monotonic()
            got = await create_item(client, "During the outage.", f"b{kind[0]}{i}d",
                                    limit_s=60)
            saw[sid] += seen_items([(0.0, got)])
            outcome = "stored" if got["type"] == "conversation.item.done" else (
                "refused: " + got["error"]["code"])
            return outcome, time.monotonic() - started

        async def turn(client: Client, sid: str) -> str:
            await send(client, {"type": "response.create"})
            events = await client.until("response.done", limit_s=60)
            saw[sid] += seen_items(events)
            return f"{status(events)} {error_codes(events) or ''}".strip()

        async def new_session() -> str:
            try:
                async with open_client(f.c) as client:
                    first = (await client.until("session.created", "error",
                                                limit_s=60))[-1][1]
                    return ("created" if first["type"] == "session.created"
                            else "refused: " + first["error"]["code"])
            except Exception as exc:  # a refusal in the handshake is clear too
                return f"refused in handshake: {exc!r:.60}"

        began = time.monotonic()
        if kind == "restart":
            f.redis.kill()
        else:
            f.redis.signal(signal.SIGSTOP)
        writes = [asyncio.create_task(during(c, sid, i))
                  for i, (c, sid, _) in enumerate(clients[1:], 1)]
        answer = asyncio.create_task(turn(clients[0][0], clients[0][1]))
        fresh = asyncio.create_task(new_session())
        await asyncio.sleep(0.3 if kind == "restart" else s.outage_s)
        if kind == "restart":
            await asyncio.to_thread(f.redis.start)
        else:
            f.redis.signal(signal.SIGCONT)
        back = time.monotonic()
        outcomes = await asyncio.gather(*writes)
        answered = await answer
        fresh_outcome = await fresh
        # After the outage every session writes again.
        after: list[float] = []
        for i, (client, sid, _) in enumerate(clients):
            got = await create_item(client, "After the outage.", f"b{kind[0]}{i}a")
            saw[sid] += seen_items([(0.0, got)])
            if got["type"] == "conversation.item.done":
                after.append(time.monotonic() - back)
        await asyncio.sleep(0.5)  # the write-behind of the last turn
        checks = []
        for _, sid, _ in clients:
            checks.append(consistent(saw[sid], await stored_ids(f, sid)))
    # What a resume shows (the clients closed above, releasing their leases).
    missing = 0
    for _, sid, token in clients:
        async with open_client(f.c, session_id=sid, resume_token=token) as client:
            await client.until("session.created", limit_s=WAIT_S)
            missing += len(await retrieve_missing(client, saw[sid]))
    lost = sum(c[0] for c in checks)
    ordered = all(c[1] for c in checks)
    dups = sum(c[2] for c in checks)
    refusals = [o for o, _ in outcomes if o != "stored"]
    passed = (lost == 0 and missing == 0 and ordered and dups == 0
              and len(after) == len(clients) and answered.startswith("completed"))
    note = ("finding fixed (6a33006): after a restart every idle pooled Redis connection "
            "was dead and its next call failed, refusing new sessions and resumes although "
            "Redis was back; reads and idempotent writes now run once more on a fresh one"
            if kind == "restart" else "")
    if refusals:
        note += f"; writes refused during the outage: {refusals}"
    return Row(section="faults", name=name,
               result=(f"{len(clients)} live sessions: writes during it "
                       f"{sum(o == 'stored' for o, _ in outcomes)}/{len(outcomes)} stored "
                       f"({pct([t for _, t in outcomes])}), a reply {answered}, new session "
                       f"{fresh_outcome}; after: all writing again {len(after)}/{len(clients)}, "
                       f"items lost {lost + missing}, duplicates {dups}, order kept {ordered}"),
               passed=passed, command=COMMAND, note=note,
               figures={"outage_s": round(back - began, 3), "writes": outcomes,
                        "reply_during": answered, "new_session": fresh_outcome,
                        "items_lost": lost, "missing_on_resume": missing,
                        "duplicates": dups, "order_kept": ordered,
                        "first_write_after_s": [round(t, 3) for t in after]})


# --------------------------------------------------------------------------- c
Fault = Callable[[Fleet], Awaitable[None]]


async def stage_fault(f: Fleet, name: str, *, before: Fault | None = None,
                      at_audio: Fault | None = None, bound_s: float,
                      expect: set[str]) -> Row:
    """One reply with a proxy fault (``before`` the reply or ``at_audio``, its first
    audio), healed after it; then the next turn of the same session must be answered.
    ``expect``: the acceptable outcomes ("completed", or the failure's error code)."""
    try:
        async with open_client(f.c) as client:
            await session_of(client)
            warm = await reply(client)
            assert status(warm) == "completed", (kinds(warm), client.logs())
            client.drain()
            done = await create_item(client, "Tell me about the weather.")
            assert done["type"] == "conversation.item.done", done
            if before is not None:
                await before(f)
            started = time.monotonic()
            await send(client, {"type": "response.create"})
            events: list[Stamped] = []
            if at_audio is not None:
                events += await client.until("response.output_audio.delta", limit_s=WAIT_S)
                await at_audio(f)
                started = time.monotonic()
            events += await client.until("response.done", limit_s=bound_s + WAIT_S)
            took = events[-1][0] - started
            f.heal()
            for proxy in f.proxies():
                await proxy.refuse(False)
            codes = error_codes(events)
            outcome = status(events) if not codes else codes[0]
            clear = (status(events) == "completed" and not codes) or (
                status(events) == "failed" and bool(codes))
            await asyncio.sleep(0.5)
            nxt = await reply(client)
            next_ok = status(nxt) == "completed" and not error_codes(nxt)
    finally:
        f.heal()
        for proxy in f.proxies():
            await proxy.refuse(False)
    passed = clear and outcome in expect and took <= bound_s and next_ok
    return Row(section="faults", name=name,
               result=(f"reply {status(events)}{' (' + ', '.join(codes) + ')' if codes else ''}"
                       f" {took:.2f} s after the fault (bound {bound_s:g} s); next turn "
                       f"{status(nxt)}"),
               passed=passed, command=COMMAND,
               figures={"outcome": outcome, "seconds": round(took, 3), "bound_s": bound_s,
                        "next_turn": status(nxt)})


async def _reset_tts(f: Fleet) -> None:
    for proxy in f.tts:
        proxy.reset()


async def _hang_llm(f: Fleet) -> None:
    for proxy in f.llm:
        proxy.hang()


async def _hang_tts(f: Fleet) -> None:
    for proxy in f.tts:
        proxy.hang()


async def _slow_llm(f: Fleet) -> None:
    for proxy in f.llm:
        proxy.set_latency(0.3)


async def _kill_llm_replica(f: Fleet) -> None:
    await f.llm[0].refuse(True)
    f.llm[0].reset()


async def stage_faults(f: Fleet, s: Sizes) -> list[Row]:
    audio_s = 8.0  # the fake reply's audio, played at real time before a late failure
    cases: list[tuple[str, dict[str, Any]]] = [
        ("TTS replicas reset mid-reply (RST on every open stream)",
         {"at_audio": _reset_tts, "bound_s": audio_s + MARGIN_S,
          "expect": {"completed", "tts_failed", "tts_timeout"}}),
    ]
    if not s.quick:
        cases += [
            ("LLM replicas hung (no byte forwarded) before the reply",
             {"before": _hang_llm, "bound_s": LLM_FIRST_TOKEN_S + MARGIN_S,
              "expect": {"llm_timeout"}}),
            ("LLM replicas slowed (+0.3 s per chunk each way)",
             {"before": _slow_llm, "bound_s": audio_s + MARGIN_S, "expect": {"completed"}}),
            ("TTS replicas hung mid-reply",
             {"at_audio": _hang_tts, "bound_s": audio_s + TTS_S + MARGIN_S,
              "expect": {"tts_timeout", "tts_failed"}}),
            ("one LLM replica killed (connections reset, port refused)",
             {"before": _kill_llm_replica, "bound_s": audio_s + MARGIN_S,
              "expect": {"completed"}}),
        ]
    rows = []
    for name, kw in cases:
        try:
            rows.append(await stage_fault(f, name, **kw))
        except Exception as exc:
            rows.append(failed_row(name, exc))
    return rows


# --------------------------------------------------------------------------- d
class Bystander:
    """Another session on the same orchestrator creating an item every 0.2 s; its write
    round trips tell whether the faulty client disturbed it."""

    def __init__(self, f: Fleet) -> None:
        self.f = f
        self.latencies: list[float] = []
        self.errors = 0
        self.codes: dict[str, int] = {}  # the errors' codes, counted
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with open_client(self.f.c) as client:
            await session_of(client)
            created: list[str] = []
            n = 0
            while True:
                started = time.monotonic()
                got = await create_item(client, f"Bystander {n}.")
                if got["type"] == "conversation.item.done":
                    created.append(got["item"]["id"])
                else:
                    self.errors += 1
                    code = str(got.get("error", {}).get("code"))
                    self.codes[code] = self.codes.get(code, 0) + 1
                self.latencies.append(time.monotonic() - started)
                n += 1
                if len(created) >= 100:  # stay far under the session's item limit
                    for item_id in created:
                        await send(client, {"type": "conversation.item.delete",
                                            "item_id": item_id})
                        await client.until("conversation.item.deleted", "error",
                                           limit_s=WAIT_S)
                    created.clear()
                await asyncio.sleep(0.2)

    async def __aenter__(self) -> Bystander:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(1.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        if self._task.done():
            self._task.result()  # its failure is the row's
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def summary(self) -> str:
        codes = f" {self.codes}" if self.codes else ""
        return (f"bystander writes {pct(self.latencies)} ({len(self.latencies)} writes), "
                f"errors {self.errors}{codes}")


async def client_vanishes(f: Fleet, s: Sizes) -> Row:
    name = "client vanishes mid-reply (TCP reset, no close frame)"
    sessions, fds = await f.probe.sessions(), f.probe.fds()
    async with Bystander(f) as bystander:
        async with open_client(f.c) as client:
            await session_of(client)
            await create_item(client, "Tell me a story.")
            await send(client, {"type": "response.create"})
            await client.until("response.output_audio.delta", limit_s=WAIT_S)
            client.ws.transport.abort()
            gone = time.monotonic()
        cleaned = await f.probe.settle(sessions + 1, fds + 1, limit_s=20)  # + bystander
        after = time.monotonic() - gone
        async with open_client(f.c) as other:
            await session_of(other)
            nxt = await reply(other)
    passed = (cleaned is not None and bystander.errors == 0
              and status(nxt) == "completed")
    return Row(section="faults", name=name,
               result=(f"session cleaned up {after:.2f} s after the reset "
                       f"(live sessions and fds back to baseline: {cleaned is not None}); "
                       f"{bystander.summary()}; another session's reply {status(nxt)}"),
               passed=passed, command=COMMAND,
               figures={"cleanup_s": round(after, 3), "cleaned": cleaned is not None,
                        "bystander_latency_s": [round(x, 3) for x in bystander.latencies],
                        "bystander_errors": bystander.errors})


async def slow_reader(f: Fleet, s: Sizes) -> Row:
    """A client that stops reading while its session produces large events (a 200 KB
    item retrieved over and over): the server must drop it (close 1008) with its memory
    bounded, sampled every 20 ms."""
    name = "client stops reading (200 KB events requested, none read)"
    sessions, fds = await f.probe.sessions(), f.probe.fds()
    slow_before = max(0.0, await f.probe.metric(SLOW_CLIENTS))
    rss_before = f.probe.rss_mb()
    samples: list[float] = []

    async def sample() -> None:
        while True:
            samples.append(f.probe.rss_mb())
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    sent = 0
    dropped: float | None = None
    phases: dict[str, float] = {}  # seconds each step took: a stuck one is named
    phase, mark = "bystander", time.monotonic()

    def step(name: str) -> None:
        nonlocal phase, mark
        now = time.monotonic()
        phases[phase] = round(now - mark, 2)
        phase, mark = name, now

    try:
        async with asyncio.timeout(SLOW_READER_LIMIT_S), Bystander(f) as bystander:
            step("connect")
            async with connect(ws_url(f.c), additional_headers=HEADERS, max_size=2**24,
                               max_queue=1, open_timeout=20, close_timeout=2) as ws:
                first = json.loads(await ws.recv())
                assert first["type"] == "session.created", first
                step("create")
                await ws.send(json.dumps({"type": "conversation.item.create",
                                          "item": user_item("x" * 200_000, "big")}))
                while True:  # the last events it reads
                    got = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
                    if got["type"] == "error":
                        raise AssertionError(f"the item was refused: {got}")
                    if got["type"] == "conversation.item.done":
                        break
                step("requests")
                ws.transport.pause_reading()  # from now on nothing leaves its socket
                started = time.monotonic()

                async def closed_as_slow() -> bool:
                    return await f.probe.metric(SLOW_CLIENTS) > slow_before

                with contextlib.suppress(Exception):  # the server may close on us
                    for _ in range(REQUESTS):  # ~60 MB of answers
                        await asyncio.wait_for(ws.send(json.dumps(
                            {"type": "conversation.item.retrieve", "item_id": "big"})), 5)
                        sent += 1
                step("closed")
                while time.monotonic() - started < 30:
                    if await closed_as_slow():
                        dropped = time.monotonic() - started
                        break
                    await asyncio.sleep(0.1)
                step("abort")
                ws.transport.abort()
            step("settle")
            cleaned = await f.probe.settle(sessions + 1, fds + 1, limit_s=20)
            step("bystander_exit")
        step("done")
    except TimeoutError:
        raise AssertionError(f"stuck in {phase!r} for {time.monotonic() - mark:.1f} s "
                             f"(the row's bound is {SLOW_READER_LIMIT_S:g} s); steps "
                             f"before it took {phases}") from None
    finally:
        sampler.cancel()
    growth = max(samples, default=rss_before) - rss_before
    rss_after = f.probe.rss_mb()
    passed = (dropped is not None and cleaned is not None and growth < 64
              and bystander.errors == 0)
    when = f"{dropped:.1f} s" if dropped is not None else "not within 30 s"
    return Row(section="faults", name=name,
               result=(f"closed by the server as too slow {when} after it stopped reading "
                       f"({sent} requests sent); orchestrator RSS +{growth:.0f} MB at peak, "
                       f"{rss_after - rss_before:+.0f} MB after; cleaned up "
                       f"{cleaned is not None}; {bystander.summary()}; steps {phases}"),
               passed=passed, command=COMMAND,
               note=("before the fix (6f58ed0, outbox bounded in events only) the same "
                     "client held ~90 MB in its queue, kept after the close"),
               figures={"rss_before_mb": round(rss_before), "rss_peak_growth_mb": round(growth),
                        "rss_after_mb": round(rss_after),
                        "disconnect_s": None if dropped is None else round(dropped, 2),
                        "requests_sent": sent, "bystander_errors": bystander.errors,
                        "steps_s": phases})


async def reconnect_loop(f: Fleet, s: Sizes) -> Row:
    name = f"client reconnecting in a loop ({s.reconnects} connect/resume/close cycles)"
    async with open_client(f.c) as client:
        sid, token = await session_of(client)
        await create_item(client, "Keep me.", "keep")
    await asyncio.sleep(0.5)
    sessions, fds, rss_before = await f.probe.sessions(), f.probe.fds(), f.probe.rss_mb()
    refused = 0
    async with Bystander(f) as bystander:
        started = time.monotonic()
        for _ in range(s.reconnects):
            async with open_client(f.c, session_id=sid, resume_token=token) as client:
                got = (await client.until("session.created", "error", limit_s=WAIT_S))[-1][1]
                refused += got["type"] == "error"
        took = time.monotonic() - started
        cleaned = await f.probe.settle(sessions + 1, fds + 1, limit_s=20)
    async with open_client(f.c, session_id=sid, resume_token=token) as client:
        await client.until("session.created", limit_s=WAIT_S)
        kept = not await retrieve_missing(client, ["keep"])
    growth = f.probe.rss_mb() - rss_before
    passed = refused == 0 and cleaned is not None and kept and bystander.errors == 0
    return Row(section="faults", name=name,
               result=(f"{s.reconnects / took:.0f} cycles/s, refused {refused}; live sessions "
                       f"and fds back to baseline {cleaned is not None}, RSS "
                       f"{growth:+.0f} MB; the session's items kept {kept}; "
                       f"{bystander.summary()}"),
               passed=passed, command=COMMAND,
               figures={"cycles": s.reconnects, "seconds": round(took, 2), "refused": refused,
                        "rss_growth_mb": round(growth, 1), "kept": kept,
                        "bystander_errors": bystander.errors})


# --------------------------------------------------------------------------- run
async def run(quick: bool) -> list[Row]:
    s = QUICK if quick else FULL
    rows: list[Row] = []
    async with fleet() as f:
        steps: list[tuple[str, Callable[[], Awaitable[Row | list[Row]]]]] = [
            ("orchestrator kill", lambda: orchestrator_kill(f, s)),
            ("redis restart", lambda: redis_outage(f, s, "restart")),
        ]
        if not quick:
            steps.append(("redis stop", lambda: redis_outage(f, s, "stop")))
        steps.append(("stage faults", lambda: stage_faults(f, s)))
        steps.append(("client vanishes", lambda: client_vanishes(f, s)))
        steps.append(("slow reader", lambda: slow_reader(f, s)))
        steps.append(("reconnect loop", lambda: reconnect_loop(f, s)))
        for label, step in steps:
            try:
                got = await step()
            except Exception as exc:
                got = failed_row(label, exc)
            rows += got if isinstance(got, list) else [got]
    return rows
