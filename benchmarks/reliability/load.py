"""Part "load": how many live sessions one orchestrator process holds.

One ``cascade serve`` (memory store) talks to timing-faithful fake stages
(``fake_stages.py``), so only the orchestrator's own work is loaded: per session the
WebSocket, JSON/base64 of 50 append events a second, resampling, Silero VAD on every
frame, turn logic, LLM/ASR/TTS client streams and paced reply audio. ``loadgen.py`` adds
sessions in steps (``CASCADE_LOAD_STEPS``, default 25,50,100,150,200,250,300,400), each
held ``CASCADE_LOAD_HOLD_S`` seconds (default 45; the first third is warm-up and not
measured). A step passes when the orchestrator's event-loop lag p99 < 20 ms, no reply
audio underran (gaps >= 40 ms on the client's audio clock) and every finished turn was
answered. The ramp stops at the first failing step (``CASCADE_LOAD_ALL_STEPS=1``: it goes
on while the orchestrator lives, to see how it degrades).

With two or more cores the orchestrator is pinned to CPU 0 and the generator and the
fakes to the other CPUs (``os.sched_setaffinity``; ``CASCADE_LOAD_PIN=0``: not), so its
CPU figure is its own; every process's CPU is reported. ``--quick`` (CI): 4 sessions for
~20 s, unpinned; it checks that turns are answered and lag is measured, and reports the
timing figures without judging them.
"""

from __future__ import annotations

import asyncio
import math
import os
from typing import Any

from benchmarks.reliability.loadgen import LoadGen, Stats, quantile
from benchmarks.reliability.procs import CpuMeter, Rig, rss_mb
from benchmarks.reliability.rows import Row, command

LAG_P99_MAX_MS = 20.0
QUICK_SESSIONS = 4


def reproduce() -> str:
    """This run's command, with the settings it was given."""
    return command("load", "CASCADE_LOAD_")


def _steps() -> list[int]:
    raw = os.environ.get("CASCADE_LOAD_STEPS", "25,50,100,150,200,250,300,400")
    return [int(x) for x in raw.split(",") if x.strip()]


def cpu_split(quick: bool = False, pin_var: str = "CASCADE_LOAD_PIN"
              ) -> tuple[set[int] | None, set[int] | None]:
    """(the orchestrator's CPUs, everyone else's); (None, None): no pinning (one core,
    ``pin_var`` = 0, or a quick run on a shared CI machine, where a pinned process
    would queue behind unrelated work on its one core)."""
    cpus = sorted(os.sched_getaffinity(0))
    if quick or os.environ.get(pin_var, "1") == "0" or len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


async def measure_step(rig: Rig, gen: LoadGen, sessions: int, hold_s: float,
                       warmup_s: float) -> dict[str, Any]:
    """Bring the generator to ``sessions``, wait ``warmup_s``, measure ``hold_s``."""
    assert rig.orch is not None and rig.fakes is not None
    if sessions > gen.sessions:
        await gen.add(sessions - gen.sessions, spread_s=min(5.0, 0.05 * sessions))
    await asyncio.sleep(warmup_s)
    gen.reset()
    meters = {name: CpuMeter(pid) for name, pid in
              (("orchestrator", rig.orch.pid), ("fakes", rig.fakes.pid),
               ("generator", os.getpid()))}
    for meter in meters.values():
        meter.start()
    before = await rig.scrape()
    await asyncio.sleep(hold_s)
    after = await rig.scrape()
    stats = gen.reset()
    lag = after.lag.since(before.lag)
    return summarize(sessions, gen.live, stats, tasks=after.tasks, sockets=after.sockets,
                     cpu={k: round(m.read(), 3) for k, m in meters.items()},
                     rss=rss_mb(rig.orch.pid), lag_p50=lag.quantile(0.5) * 1000,
                     lag_p99=lag.quantile(0.99) * 1000, lag_samples=lag.count,
                     alive=rig.alive())


def summarize(sessions: int, live: int, stats: Stats, *, tasks: float, sockets: float,
              cpu: dict[str, float], rss: float, lag_p50: float, lag_p99: float,
              lag_samples: float, alive: bool) -> dict[str, Any]:
    finished = stats.answered + stats.unanswered
    return {
        "sessions": sessions, "live": live, "alive": alive,
        "lag_p50_ms": round(lag_p50, 2), "lag_p99_ms": round(lag_p99, 2),
        "lag_samples": lag_samples,
        "rss_mb": round(rss, 1), "cpu": cpu,
        "tasks": tasks, "sockets": sockets,
        "turns": stats.turns, "answered": stats.answered, "unanswered": stats.unanswered,
        "finished": finished, "completed": stats.completed, "failed": stats.failed,
        "barge_ins": stats.barge_ins, "reconnects": stats.reconnects,
        "reconnect_failures": stats.reconnect_failures,
        "connect_failures": stats.connect_failures, "errors": stats.errors,
        "gaps": len(stats.gaps_ms), "gap_max_ms": round(max(stats.gaps_ms, default=0.0), 1),
        "first_audio_p50_ms": round(quantile(stats.first_audio_ms, 0.5), 1),
        "first_audio_p95_ms": round(quantile(stats.first_audio_ms, 0.95), 1),
        "late_frames": stats.late_frames, "frames": stats.frames,
        "sessions_lost": stats.ended, "items_deleted": stats.deleted,
    }


def verdict(step: dict[str, Any], capacity: bool = True) -> list[str]:
    """Why a step fails (empty: it passes). ``capacity``: also the timing criteria (lag
    p99, reply gaps), which a quick run on a shared CI machine reports but cannot hold."""
    why: list[str] = []
    if not step["alive"]:
        why.append("the orchestrator died")
    if math.isnan(step["lag_p99_ms"]) or step["lag_samples"] == 0:
        why.append("no loop-lag samples")
    elif capacity and step["lag_p99_ms"] >= LAG_P99_MAX_MS:
        why.append(f"loop lag p99 {step['lag_p99_ms']:.1f} ms >= {LAG_P99_MAX_MS:.0f} ms")
    if capacity and step["gaps"]:
        why.append(f"{step['gaps']} reply gaps (max {step['gap_max_ms']:.0f} ms)")
    if step["unanswered"] or step["failed"]:
        why.append(f"{step['unanswered']} turns unanswered, {step['failed']} failed")
    if step["finished"] == 0:
        why.append("no turn finished")
    if step["live"] < step["sessions"]:
        why.append(f"only {step['live']}/{step['sessions']} sessions connected")
    if step.get("sessions_lost"):
        why.append(f"sessions lost: {step['sessions_lost']}")
    if step["connect_failures"] or step["reconnect_failures"]:
        why.append(f"{step['connect_failures']} connects and {step['reconnect_failures']} "
                   "resumes failed")
    return why


def step_text(step: dict[str, Any]) -> str:
    cpu = step["cpu"]
    return (f"lag p50 {step['lag_p50_ms']:.1f} / p99 {step['lag_p99_ms']:.1f} ms; turns "
            f"{step['answered']}/{step['finished']} answered (first audio p50 "
            f"{step['first_audio_p50_ms']:.0f} ms), {step['barge_ins']} barge-ins, "
            f"{step['reconnects']} resumes, gaps {step['gaps']}; RSS {step['rss_mb']:.0f} MB; "
            f"CPU orchestrator {cpu['orchestrator']:.2f} / fakes {cpu['fakes']:.2f} / "
            f"generator {cpu['generator']:.2f} cores")


async def run(quick: bool) -> list[Row]:
    steps = [QUICK_SESSIONS] if quick else _steps()
    hold_s = 15.0 if quick else float(os.environ.get("CASCADE_LOAD_HOLD_S", "45"))
    warmup_s = 5.0 if quick else hold_s / 3
    orch_cpus, other_cpus = cpu_split(quick)
    all_steps = os.environ.get("CASCADE_LOAD_ALL_STEPS", "0") == "1"
    rig = Rig(orchestrator_cpus=orch_cpus, others_cpus=other_cpus)
    rows: list[Row] = []
    results: list[dict[str, Any]] = []
    try:
        await rig.start(max_sessions=max(steps) + 50)
        assert rig.orch is not None
        idle_rss = rss_mb(rig.orch.pid)
        gen = LoadGen(rig.ws_url, seed=13)
        try:
            for sessions in steps:
                step = await measure_step(rig, gen, sessions, hold_s, warmup_s)
                step["why"] = verdict(step, capacity=not quick)
                results.append(step)
                rows.append(Row(
                    section="load", name=f"{sessions} sessions, one orchestrator process",
                    result=step_text(step), passed=not step["why"], command=reproduce(),
                    figures=step, note="; ".join(step["why"])))
                if not rig.alive() or (step["why"] and not all_steps):
                    break
        finally:
            await gen.stop()
    finally:
        await rig.stop()
    rows.append(summary_row(results, idle_rss, rig.pinned, quick))
    return rows


def summary_row(results: list[dict[str, Any]], idle_rss: float, pinned: bool,
                quick: bool) -> Row:
    held = [s for s in results if not s["why"]]
    best = held[-1] if held else None
    broke = next((s for s in results if s["why"]), None)
    parts: list[str] = []
    if best is not None:
        per = (best["rss_mb"] - idle_rss) / max(1, best["sessions"])
        cpu_ms = 1000.0 * best["cpu"]["orchestrator"] / max(1, best["sessions"])
        parts.append(f"{best['sessions']} sessions held (lag p99 {best['lag_p99_ms']:.1f} ms, "
                     f"orchestrator CPU {best['cpu']['orchestrator']:.2f} cores, "
                     f"{per:.2f} MB RSS per session over {idle_rss:.0f} MB idle); "
                     f"{cpu_ms:.0f} ms of CPU per session-second: 200 sessions would need "
                     f"{0.2 * cpu_ms:.1f} cores of this machine")
    else:
        parts.append("no step held")
    if broke is not None:
        parts.append(f"breaks at {broke['sessions']}: {'; '.join(broke['why'])}")
    elif not quick:
        parts.append("did not break within the steps tried")
    note = ("orchestrator pinned to its own core" if pinned else
            "not pinned: the generator and fakes share the orchestrator's cores")
    if not quick:
        note += ("; the ceiling is the one event loop per process (one core): each 20 ms "
                 "append is a WebSocket message, a JSON/base64 parse, a resample, a Silero "
                 "VAD window and a coalesced ASR push, and each reply an LLM token stream "
                 "and paced audio events; `python -m benchmarks.reliability.profile "
                 "--sessions N` shows the loop's time by what it ran. Past one process's "
                 "ceiling, sessions scale out over orchestrator replicas sharing Redis")
    passed = best is not None if quick else (best is not None and best["sessions"] >= 200)
    return Row(section="load", name="sessions one orchestrator process holds (target >= 200)",
               result="; ".join(parts), passed=passed, command=reproduce(),
               figures={"steps": results, "idle_rss_mb": idle_rss, "pinned": pinned},
               note=note)
