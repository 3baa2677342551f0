"""Part "soak": memory per session, its growth, and leaks, over a long run.

One ``cascade serve`` (memory store) on fake stages (``fake_stages.py``), loaded by
``loadgen.py`` with ``CASCADE_SOAK_SESSIONS`` sessions (default 50) for
``CASCADE_SOAK_S`` seconds (default 1800) after a ``CASCADE_SOAK_WARMUP_S`` warm-up
(default 120): turns, barge-ins and reconnects with the resume token all along. Every
``CASCADE_SOAK_EVERY_S`` (default 10) it samples the orchestrator's RSS
(``/proc/<pid>/status``), open fds and sockets (``/proc/<pid>/fd``, each socket matched to
its TCP row), threads, asyncio tasks and live sessions (``/metrics``).

Figures: RSS per session (mean soak RSS minus the idle RSS before the first session,
divided by the sessions); drift (mean RSS of the last ``window`` minus the first, window =
5 min, or a third of a shorter soak; criterion within +-10 %); leaks (after every session
closed and ``settle`` seconds: asyncio tasks, fds and sockets against the idle baseline
taken before the first session; the LLM client's pool connections are counted apart: httpx
keeps the idle ones of its busiest moment, up to 100, until its next request closes those
past their keep-alive, so one more session runs and they must drop to at most 20, or they
were leaked). ``--quick``: 5 sessions, 30 s, conversations bounded to 4 items. The
orchestrator is pinned to one CPU as in
the load part; ``CASCADE_SOAK_PIN=0`` leaves it free (more sessions than one core holds:
the soak judges memory and leaks, not lag). ``CASCADE_SOAK_FRAME_MS`` (default 20): the
audio per append event (the load part's capacity figures are for 20 ms).
``CASCADE_SOAK_KEEP_ITEMS`` (default 0: keep all): each session deletes its oldest items
between turns beyond this many. A conversation keeps every item it was given, so with 0
the RSS grows with the conversations themselves (~5 turns a minute per session); with a
bound, what still grows is the server's own.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from benchmarks.reliability.load import cpu_split, summarize
from benchmarks.reliability.loadgen import LoadGen
from benchmarks.reliability.procs import CpuMeter, Rig, fds, rss_mb, socket_peers, threads
from benchmarks.reliability.rows import Row, command

DRIFT_MAX = 0.10
KEEPALIVE_MAX = 20  # httpx's default max_keepalive_connections (the LLM client's pool)


def reproduce() -> str:
    """This run's command, with the settings it was given."""
    return command("soak", "CASCADE_SOAK_")


async def sample(rig: Rig, client_live: int, t0: float) -> dict[str, Any]:
    assert rig.orch is not None
    pid = rig.orch.pid
    scrape = await rig.scrape()
    open_fds, sockets = fds(pid)
    peers = {rig.stage_ports.get(int(k[3:]), k) if k.startswith("to:") else k: v
             for k, v in socket_peers(pid).items()}
    return {"t": round(time.monotonic() - t0, 1), "rss_mb": round(rss_mb(pid), 2),
            "fds": open_fds, "sockets": sockets, "peers": peers, "threads": threads(pid),
            "tasks": scrape.tasks, "sessions": scrape.sessions, "client_live": client_live}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


async def run(quick: bool) -> list[Row]:
    env = os.environ
    sessions = 5 if quick else int(env.get("CASCADE_SOAK_SESSIONS", "50"))
    duration = 30.0 if quick else float(env.get("CASCADE_SOAK_S", "1800"))
    warmup = 6.0 if quick else float(env.get("CASCADE_SOAK_WARMUP_S", "120"))
    every = 3.0 if quick else float(env.get("CASCADE_SOAK_EVERY_S", "10"))
    settle = 6.0 if quick else 15.0
    frame_ms = 20 if quick else int(env.get("CASCADE_SOAK_FRAME_MS", "20"))
    keep_items = 4 if quick else int(env.get("CASCADE_SOAK_KEEP_ITEMS", "0"))
    window = min(300.0, duration / 3)
    orch_cpus, other_cpus = cpu_split(quick, "CASCADE_SOAK_PIN")
    rig = Rig(orchestrator_cpus=orch_cpus, others_cpus=other_cpus)
    samples: list[dict[str, Any]] = []
    try:
        await rig.start(max_sessions=sessions + 20)
        assert rig.orch is not None
        await asyncio.sleep(2.0)
        t0 = time.monotonic()
        idle = await sample(rig, 0, t0)
        gen = LoadGen(rig.ws_url, seed=29, frame_ms=frame_ms, keep_items=keep_items)
        try:
            await gen.add(sessions, spread_s=min(10.0, 0.1 * sessions))
            await asyncio.sleep(warmup)
            gen.reset()
            cpu = CpuMeter(rig.orch.pid)
            cpu.start()
            lag_before = (await rig.scrape()).lag
            start = time.monotonic()
            while time.monotonic() - start < duration and rig.alive():
                await asyncio.sleep(every)
                samples.append(await sample(rig, gen.live, start))
            lag = (await rig.scrape()).lag.since(lag_before)
            orch_cpu = cpu.read()
        finally:
            await gen.stop()
        stats = gen.reset()
        await asyncio.sleep(settle)
        end = await sample(rig, 0, t0)
        # The LLM client's pool keeps idle connections until its next request, which
        # closes those idle past keepalive_expiry (5 s): one more session shows whether
        # the connections left are idle ones or leaked (checked out for good).
        probe = LoadGen(rig.ws_url, seed=31, frame_ms=frame_ms)
        await probe.add(1, spread_s=0.0)
        await asyncio.sleep(10.0)
        await probe.stop()
        await asyncio.sleep(settle)
        reused = await sample(rig, 0, t0)
        alive = rig.alive()
    finally:
        await rig.stop()
    live = min((s["client_live"] for s in samples), default=0)  # the fewest connected
    turns = summarize(sessions, live, stats, tasks=end["tasks"], sockets=end["sockets"],
                      cpu={"orchestrator": round(orch_cpu, 3)}, rss=end["rss_mb"],
                      lag_p50=lag.quantile(0.5) * 1000, lag_p99=lag.quantile(0.99) * 1000,
                      lag_samples=lag.count, alive=alive)
    turns["frame_ms"] = frame_ms
    turns["keep_items"] = keep_items
    return rows(sessions, duration, window, idle, samples, end, turns, rig.pinned, reused)


def rows(sessions: int, duration: float, window: float, idle: dict[str, Any],
         samples: list[dict[str, Any]], end: dict[str, Any], turns: dict[str, Any],
         pinned: bool, reused: dict[str, Any] | None = None) -> list[Row]:
    minutes = f"{duration / 60:g}-min"
    first = [s["rss_mb"] for s in samples if s["t"] <= window]
    last = [s["rss_mb"] for s in samples if s["t"] >= samples[-1]["t"] - window] if samples \
        else []
    mean_rss = _mean([s["rss_mb"] for s in samples])
    per_session = (mean_rss - idle["rss_mb"]) / sessions
    drift = (_mean(last) - _mean(first)) / _mean(first) if first and last else float("nan")
    memory = Row(
        section="soak", name=f"memory per session and its growth, {sessions} sessions, "
        f"{minutes} soak",
        result=(f"RSS idle {idle['rss_mb']:.0f} MB, loaded {mean_rss:.0f} MB: "
                f"{per_session:.2f} MB per session; drift {drift * 100:+.1f} % (mean of the "
                f"last {window:.0f} s vs the first; criterion +-{DRIFT_MAX * 100:.0f} %); "
                + (f"each conversation bounded to its last {turns['keep_items']} items"
                   if turns.get("keep_items") else "conversations kept whole")),
        passed=bool(samples) and abs(drift) <= DRIFT_MAX, command=reproduce(),
        figures={"idle": idle, "samples": samples, "per_session_mb": round(per_session, 3),
                 "drift": round(drift, 4), "window_s": window, "pinned": pinned},
        note="" if samples else "no samples: the orchestrator died")
    llm_idle = idle["peers"].get("llm", 0)
    llm_end = end["peers"].get("llm", 0)
    other_sockets_idle = idle["sockets"] - llm_idle
    other_sockets_end = end["sockets"] - llm_end
    fds_idle = idle["fds"] - llm_idle
    fds_end = end["fds"] - llm_end
    leaks = {"tasks": end["tasks"] - idle["tasks"], "fds": fds_end - fds_idle,
             "sockets": other_sockets_end - other_sockets_idle,
             "threads": end["threads"] - idle["threads"], "sessions": end["sessions"]}
    # The LLM pool's idle connections: left by the busiest moment (httpx keeps up to
    # max_connections, 100, until its next request), closed by that next request once
    # past keepalive_expiry: one more session must bring them down to a handful.
    llm_reused = llm_end if reused is None else reused["peers"].get("llm", 0)
    leak_ok = (leaks["tasks"] <= 0 and leaks["fds"] <= 0 and leaks["sockets"] <= 0
               and end["sessions"] == 0 and llm_reused <= KEEPALIVE_MAX)
    pool = (f"idle LLM pool connections {llm_idle} -> {llm_end}"
            + ("" if reused is None else f", {llm_reused} after one more session"))
    leak = Row(
        section="soak", name=f"leaks after the {minutes} soak (all sessions closed)",
        result=(f"asyncio tasks {idle['tasks']:.0f} -> {end['tasks']:.0f}, fds "
                f"{idle['fds']} -> {end['fds']}, sockets {idle['sockets']} -> "
                f"{end['sockets']} (of which {pool}), threads {idle['threads']} -> "
                f"{end['threads']}, live sessions {end['sessions']:.0f}"),
        passed=leak_ok, command=reproduce(),
        figures={"idle": idle, "end": end, "reused": reused, "leaks": leaks},
        note=("threads are reported, not judged: the VAD batch thread starts with the first "
              "session and stays" if leak_ok else f"not back to the idle baseline: {leaks}, "
              f"LLM pool connections after one more session {llm_reused}"))
    why = []
    if turns["unanswered"] or turns["failed"]:
        why.append(f"{turns['unanswered']} unanswered, {turns['failed']} failed")
    if turns["reconnect_failures"] or turns["connect_failures"]:
        why.append(f"{turns['reconnect_failures']} resumes failed")
    if not turns["alive"]:
        why.append("the orchestrator died")
    if turns["finished"] == 0:
        why.append("no turn finished")
    if turns.get("sessions_lost"):
        lost = sum(turns["sessions_lost"].values())
        why.append(f"{lost} sessions lost before the end: {turns['sessions_lost']}")
    activity = Row(
        section="soak", name=f"turns during the {minutes} soak",
        result=(f"{turns['answered']}/{turns['finished']} turns answered "
                f"({turns.get('frame_ms', 20)} ms appends), "
                f"{turns['barge_ins']} barge-ins, {turns['reconnects']} resumes, reply gaps "
                f"{turns['gaps']}; loop lag p50 {turns['lag_p50_ms']:.1f} / p99 "
                f"{turns['lag_p99_ms']:.1f} ms; orchestrator CPU "
                f"{turns['cpu']['orchestrator']:.2f} cores"),
        passed=not why, command=reproduce(), figures=turns, note="; ".join(why))
    return [memory, leak, activity]
